/* The C ABI's error paths, in plain C: each line is "case status message".
 *   cc errors.c -I CAPI -L CAPI -lddpm_rt -Wl,-rpath,CAPI -o errors && ./errors BUNDLE */
#include "ddpm_rt.h"

#include <stdio.h>

static void report(const char *name, int rc, ddpm_rt_handle *h) {
    printf("%s %d %s\n", name, rc, ddpm_rt_last_error(h));
}

int main(int argc, char **argv) {
    ddpm_rt_handle *h = NULL;
    uint8_t small[16];
    static uint8_t big[1 << 20];
    size_t written = 0;
    if (argc < 2) return 64;
    report("missing-bundle", ddpm_rt_open("/nonexistent/bundle", NULL, &h), NULL);
    report("bad-options", ddpm_rt_open(argv[1], "{\"threads\": ", &h), NULL);
    report("unknown-option", ddpm_rt_open(argv[1], "{\"colour\": 1}", &h), NULL);
    report("null-out", ddpm_rt_open(argv[1], NULL, NULL), NULL);
    int rc = ddpm_rt_open(argv[1], "{\"threads\": 1}", &h);
    report("open", rc, h);
    if (rc != DDPM_RT_OK) return 1;
    report("num-zero", ddpm_rt_generate(h, "red apple", 0, 1, 0, 0, NULL, NULL, small,
                                         sizeof small, &written), h);
    rc = ddpm_rt_generate(h, "red apple", 2, 1, 0, 0, NULL, NULL, small, sizeof small, &written);
    printf("too-small %d %zu %s\n", rc, written, ddpm_rt_last_error(h));
    report("null-prompt", ddpm_rt_generate(h, NULL, 1, 1, 0, 0, NULL, NULL, small, sizeof small,
                                            &written), h);
    report("bad-utf8", ddpm_rt_generate(h, "\xff\xfe", 1, 1, 0, 0, NULL, NULL, small,
                                         sizeof small, &written), h);
    report("guidance-huge", ddpm_rt_generate(h, "red apple", 1, 1, 0, 1e9, NULL, NULL, big,
                                              sizeof big, &written), h);
    report("null-handle", ddpm_rt_image_shape(NULL, NULL, NULL, NULL), NULL);
    ddpm_rt_close(h);
    ddpm_rt_close(NULL);
    printf("version %s\n", ddpm_rt_version());
    return 0;
}
