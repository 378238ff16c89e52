/* trap_cost: what a real trap costs on this machine. A privileged
 * instruction (CLI) executed in a native 64-bit process at CPL 3 raises
 * #GP; the kernel delivers SIGSEGV, the handler steps RIP past the
 * instruction, and sigreturn resumes: the round trip a classic
 * trap-and-emulate VMM pays for every privileged instruction of a
 * deprivileged guest kernel. Prints TSC ticks per round trip (best of 5
 * runs) and, for scale, per CALL/RET. benches/perf_report.py builds
 * (gcc -O2) and runs it. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <x86intrin.h>

#define N 20000
#define RUNS 5

static void on_segv(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)info;
    ((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP] += 1; /* CLI is one byte */
}

__asm__(".globl ret_stub\nret_stub:\n\tret\n");

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, 0);
    unsigned long long trap = ~0ull, call = ~0ull, empty = ~0ull;
    for (int r = 0; r < RUNS; r++) {
        unsigned long long t0 = __rdtsc();
        for (int i = 0; i < N; i++)
            __asm__ volatile("cli" ::: "memory");
        unsigned long long t1 = __rdtsc();
        for (int i = 0; i < N; i++)
            __asm__ volatile("call ret_stub" ::: "memory");
        unsigned long long t2 = __rdtsc();
        for (int i = 0; i < N; i++)
            __asm__ volatile("" ::: "memory");
        unsigned long long t3 = __rdtsc();
        if (t1 - t0 < trap) trap = t1 - t0;
        if (t2 - t1 < call) call = t2 - t1;
        if (t3 - t2 < empty) empty = t3 - t2;
    }
    printf("trap round trip (CLI, #GP, SIGSEGV, resume): %llu ticks\n", (trap - empty) / N);
    printf("call/ret: %llu ticks\n", (call - empty) / N);
    return 0;
}
