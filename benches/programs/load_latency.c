/*
 * How long a dependent load takes on this host, addressed three ways:
 * natively (`mov rax, [rax + 8]`, as a guest's own code does on the
 * host), the way translated code reaches guest memory (GS override, the
 * guest's register and displacement, 32-bit address size:
 * `mov eax, gs:[eax + 8]`), with a base register instead of GS
 * (`mov eax, [r12 + rax + 8]`), and through GS with a base of 0 (the
 * window at host address 0; the chain in low memory, MAP_FIXED_NOREPLACE,
 * skipped if that address is taken). A pointer chase through a random cycle of
 * 256 cache lines (16 KiB, inside L1), so each load waits for the one
 * before: the time per load is the load-to-use latency. Build:
 * gcc -O2 load_latency.c (x86-64 Linux). Written for popek's
 * docs/performance.md (benches/perf_report.py).
 */
#include <asm/prctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LINES 256
#define LOADS 200000000L

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void)
{
    /* A 4 GiB-aligned window, as popek's: 32-bit offsets from its base. */
    size_t span = 1ull << 33;
    char *r = mmap(0, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED)
        return 1;
    char *w = (char *)(((uintptr_t)r + (1ull << 32) - 1) & ~((1ull << 32) - 1));
    if (mprotect(w, 1 << 20, PROT_READ | PROT_WRITE))
        return 1;
    /* A random cycle through LINES lines: each holds the next's offset
     * from the window (first half) or its address (second half), 8 bytes
     * into the line. */
    uint32_t order[LINES];
    for (int i = 0; i < LINES; i++)
        order[i] = i;
    srand(1);
    for (int i = LINES - 1; i > 0; i--) {
        int j = rand() % (i + 1);
        uint32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    const uint32_t half = 1 << 19;
    for (int i = 0; i < LINES; i++) {
        *(uint32_t *)(w + order[i] * 64 + 8) = order[(i + 1) % LINES] * 64;
        *(uint64_t *)(w + half + order[i] * 64 + 8) =
            (uint64_t)w + half + order[(i + 1) % LINES] * 64;
    }
    if (syscall(SYS_arch_prctl, ARCH_SET_GS, (unsigned long)w))
        return 1;
    uint64_t base = (uint64_t)w;
    double best[3] = {1e9, 1e9, 1e9};
    for (int round = 0; round < 3; round++) {
        double t[4];
        uint64_t x = (uint64_t)w + half + order[0] * 64;
        long k = LOADS;
        t[0] = now();
        __asm__ volatile("1: movq 8(%0), %0\n\tdec %1\n\tjnz 1b" : "+r"(x), "+r"(k));
        t[1] = now();
        x = 0;
        k = LOADS;
        __asm__ volatile("1: movl %%gs:8(%k0), %k0\n\tdec %1\n\tjnz 1b" : "+r"(x), "+r"(k));
        t[2] = now();
        x = 0;
        k = LOADS;
        __asm__ volatile("1: movl 8(%2,%0), %k0\n\tdec %1\n\tjnz 1b"
                         : "+r"(x), "+r"(k)
                         : "r"(base));
        t[3] = now();
        for (int i = 0; i < 3; i++) {
            double ns = (t[i + 1] - t[i]) * 1e9 / LOADS;
            if (ns < best[i])
                best[i] = ns;
        }
    }
    /* GS base 0: the same chain of 32-bit addresses at a low address. */
    double low = -1;
    char *z = mmap((void *)0x10000000, 1 << 20, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (z == (char *)0x10000000 && !syscall(SYS_arch_prctl, ARCH_SET_GS, 0UL)) {
        for (int i = 0; i < LINES; i++)
            *(uint32_t *)(z + order[i] * 64 + 8) =
                (uint32_t)(uintptr_t)(z + order[(i + 1) % LINES] * 64);
        for (int round = 0; round < 3; round++) {
            uint64_t x = (uint64_t)(uintptr_t)(z + order[0] * 64);
            long k = LOADS;
            double t0 = now();
            __asm__ volatile("1: movl %%gs:8(%k0), %k0\n\tdec %1\n\tjnz 1b" : "+r"(x), "+r"(k));
            double ns = (now() - t0) * 1e9 / LOADS;
            if (low < 0 || ns < low)
                low = ns;
        }
    }
    printf("native [reg+8]: %.3f ns\n", best[0]);
    if (low >= 0)
        printf("translated, window at 0 gs:[reg+8]: %.3f ns\n", low);
    printf("translated gs:[reg+8]: %.3f ns\n", best[1]);
    printf("base register [base+reg+8]: %.3f ns\n", best[2]);
    return 0;
}
