/* nano: nanobenchmarks after Adams & Agesen (ASPLOS 2006, "A Comparison of
 * Software and Hardware Techniques for x86 Virtualization"): loops of one
 * sensitive or privileged operation at ring 0, timed with RDTSC (best of 5
 * runs of 10000 iterations, less the same loop with no operation). Prints
 * TSC ticks per operation. Timings differ from run to run, so no oracle
 * compares this output; benches/perf_report.py collects it. */
#include "rt/rt.h"

#define N 10000
#define RUNS 5

__asm__(".globl iret_stub\niret_stub:\n\tiret\n"
        ".globl ret_stub\nret_stub:\n\tret\n");
extern char iret_stub[], ret_stub[];

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static void skip_div(struct frame *f) { f->eip += 2; } /* div %ecx: F7 F1 */

/* Best time of RUNS loops of N iterations of `body`, in TSC ticks. */
#define TIME(body)                                                         \
    ({                                                                     \
        u64 best = ~0ull;                                                  \
        for (int r = 0; r < RUNS; r++) {                                   \
            u64 t0 = rdtsc();                                              \
            for (u32 i = 0; i < N; i++) {                                  \
                body;                                                      \
            }                                                              \
            u64 t = rdtsc() - t0;                                          \
            if (t < best)                                                  \
                best = t;                                                  \
        }                                                                  \
        best;                                                              \
    })

static u64 empty;

/* Ticks per iteration (32-bit division: no libgcc in a guest). */
static u32 per_op(u64 ticks)
{
    u64 d = ticks > empty ? ticks - empty : 0;
    return d > 0xFFFFFFFFull ? 0xFFFFFFFFu / N : (u32)d / N;
}

static void report(const char *name, u64 ticks)
{
    printf("%s: %u ticks\n", name, per_op(ticks));
}

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    idt_set(0, skip_div, 0, 0);
    idt_raw(0x41, (u32)iret_stub, KCODE, 0x8E);
    idt_load();
    empty = TIME(__asm__ volatile(""));
    printf("empty loop: %u ticks per iteration (subtracted below)\n", (u32)empty / N);
    report("call/ret", TIME(__asm__ volatile("call ret_stub" : : : "memory")));
    report("pushf/popf", TIME(__asm__ volatile("pushfl; popfl" : : : "cc")));
    report("cli/sti", TIME(__asm__ volatile("cli; sti")));
    report("in (UART scratch)", TIME(__asm__ volatile("inb %%dx, %%al" : : "d"(0x3FF) : "eax")));
    report("out (UART scratch)", TIME(__asm__ volatile("outb %%al, %%dx" : : "a"(0), "d"(0x3FF))));
    /* A hypercall (docs/hypercalls.md: call 1, NOP) beside the emulated
     * port I/O above, when popek's interface is there. */
    u32 sig;
    __asm__ volatile("cpuid" : "=b"(sig) : "a"(0x40000000) : "ecx", "edx");
    if (sig == 0x65706f50) /* "Pope" */
        report("vmcall (hypercall NOP)",
               TIME(__asm__ volatile("vmcall" : : "a"(1) : "memory")));
    report("mov cr0 (read, write)",
           TIME(__asm__ volatile("movl %%cr0, %%eax; movl %%eax, %%cr0" : : : "eax")));
    report("mov cr3 (reload)",
           TIME(__asm__ volatile("movl %%cr3, %%eax; movl %%eax, %%cr3" : : : "eax", "memory")));
    report("int/iret", TIME(__asm__ volatile("int $0x41" : : : "memory")));
    report("divzero (#DE round trip)",
           TIME(__asm__ volatile("divl %%ecx" : : "a"(1), "d"(0), "c"(0))));
    return 0;
}
