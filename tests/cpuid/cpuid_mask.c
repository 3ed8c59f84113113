/*
 * cpuid_mask: run a program as if this x86-64 CPU had no AVX-512, VNNI or AMX.
 *
 *   LD_PRELOAD=libcpuid_mask.so python -m pytest ...
 *
 * ONNX Runtime (MLAS), NumPy and the C library pick their kernels from the CPUID
 * instruction and offer no switch. Linux can make CPUID fault in user space
 * (arch_prctl(ARCH_SET_CPUID, 0), on CPUs with CPUID faulting: the "cpuid_fault" flag of
 * /proc/cpuinfo). This library, loaded first, turns that on and answers each faulting CPUID
 * itself from a SIGSEGV handler: the real answer with the AVX-512, VNNI (AVX-512 and AVX),
 * AVX-512 BF16/FP16 and AMX feature bits cleared, so that every library loaded after it
 * (the dynamic loader's own early choices excepted) chooses the kernels of an AVX2 CPU such
 * as AMD Zen 2 or Intel Haswell-Skylake client parts, at native speed. Other SIGSEGVs go to
 * whatever handler the program installed (Python's faulthandler under pytest), or end the
 * program as they would have. The setting is per thread and inherited by threads and
 * children; exec resets it, so LD_PRELOAD (inherited through the environment) re-arms it.
 *
 * DDPM_RT_CPUID_MASK_REPORT=1 prints one line to stderr when it is armed.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static struct sigaction app_segv; /* the program's own SIGSEGV disposition */
static int armed;

static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static void mask(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c,
                 unsigned *d) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24,
           AMX-INT8 25 */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23; EDX: AVX-VNNI-INT8 4,
           AVX-NE-CONVERT 5, AVX10 19 */
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        *d &= ~((1u << 4) | (1u << 5) | (1u << 19));
    } else if (leaf == 0x24) { /* AVX10 leaf */
        *a = *b = *c = *d = 0;
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        __cpuid_count(leaf, sub, a, b, c, d);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        mask(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a;
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        return;
    }
    if ((app_segv.sa_flags & SA_SIGINFO) && app_segv.sa_sigaction) {
        app_segv.sa_sigaction(sig, info, ctx);
    } else if (app_segv.sa_handler != SIG_DFL && app_segv.sa_handler != SIG_IGN) {
        app_segv.sa_handler(sig);
    } else { /* as without this library: the fault ends the program */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
    }
}

/* The program's SIGSEGV handler is remembered and called for other faults; ours stays. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !armed)
        return real_sigaction(sig, act, old);
    if (old)
        *old = app_segv;
    if (act)
        app_segv = *act;
    return 0;
}

/* signal() and bsd_signal() reach the kernel through glibc's internal sigaction, not the
   one above: they are routed through it too (cc1 installs its crash handler with signal). */
sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    if (sigaction(sig, &act, &old) != 0)
        return SIG_ERR;
    return old.sa_handler;
}

sighandler_t bsd_signal(int sig, sighandler_t handler) { return signal(sig, handler); }

__attribute__((constructor)) static void arm(void) {
    real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, &app_segv) != 0)
        return;
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        real_sigaction(SIGSEGV, &app_segv, NULL);
        if (getenv("DDPM_RT_CPUID_MASK_REPORT"))
            fprintf(stderr, "cpuid_mask: this CPU or kernel has no CPUID faulting: not armed\n");
        return;
    }
    armed = 1;
    if (getenv("DDPM_RT_CPUID_MASK_REPORT"))
        fprintf(stderr, "cpuid_mask: armed (AVX-512, VNNI, AMX hidden)\n");
}
