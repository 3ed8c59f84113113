/* The C ABI's error paths, in plain C: each line is "case status message".
 *   cc errors.c -I CAPI -L CAPI -lddpm_rt -Wl,-rpath,CAPI -o errors && ./errors BUNDLE [OUT]
 * With OUT: also an RGBA picture of 10x7 pixels (pixel (x, y), channel k: (x*37 + y*11 +
 * k*53) % 256) and a mask (repaint where x < 5: 255, else 0), 2 images of "a frog" from seed 3
 * at strength 0.6 and 4 steps, guidance 2, written raw to OUT ("from-image" line). */
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
    static uint8_t pic[10 * 7 * 4], mask[10 * 7];
    for (int y = 0; y < 7; y++)
        for (int x = 0; x < 10; x++) {
            for (int k = 0; k < 4; k++)
                pic[(y * 10 + x) * 4 + k] = (uint8_t)((x * 37 + y * 11 + k * 53) % 256);
            mask[y * 10 + x] = x < 5 ? 255 : 0;
        }
    report("img-null-rgb", ddpm_rt_generate_from_image(h, "a frog", 1, 1, 0, 0, 0.5, NULL, 10, 7,
                                                        3, NULL, NULL, NULL, big, sizeof big,
                                                        &written), h);
    report("img-channels", ddpm_rt_generate_from_image(h, "a frog", 1, 1, 0, 0, 0.5, pic, 10, 7,
                                                        2, NULL, NULL, NULL, big, sizeof big,
                                                        &written), h);
    report("img-zero-width", ddpm_rt_generate_from_image(h, "a frog", 1, 1, 0, 0, 0.5, pic, 0, 7,
                                                          3, NULL, NULL, NULL, big, sizeof big,
                                                          &written), h);
    report("img-too-big", ddpm_rt_generate_from_image(h, "a frog", 1, 1, 0, 0, 0.5, pic, 5000,
                                                       5000, 3, NULL, NULL, NULL, big,
                                                       sizeof big, &written), h);
    report("img-strength", ddpm_rt_generate_from_image(h, "a frog", 1, 1, 0, 0, 1.5, pic, 10, 7,
                                                        4, NULL, NULL, NULL, big, sizeof big,
                                                        &written), h);
    rc = ddpm_rt_generate_from_image(h, "a frog", 2, 1, 0, 0, 0.5, pic, 10, 7, 4, mask, NULL,
                                     NULL, small, sizeof small, &written);
    printf("img-too-small %d %zu %s\n", rc, written, ddpm_rt_last_error(h));
    if (argc > 2) {
        rc = ddpm_rt_generate_from_image(h, "a frog", 2, 3, 4, 2.0, 0.6, pic, 10, 7, 4, mask,
                                         NULL, NULL, big, sizeof big, &written);
        report("from-image", rc, h);
        FILE *f = fopen(argv[2], "wb");
        if (rc != DDPM_RT_OK || f == NULL || fwrite(big, 1, written, f) != written) return 1;
        fclose(f);
    }
    ddpm_rt_close(h);
    ddpm_rt_close(NULL);
    printf("version %s\n", ddpm_rt_version());
    return 0;
}
