/* preempt-paging: a preemptive kernel on its page tables. Twelve ring-3
 * processes, each in its own address space (MOV CR3 at every switch),
 * are switched by the timer (PIT at 1000 Hz, hz=N on the command line)
 * and make system calls through INT 0x40. Their data pages start
 * not present (demand-zero faults); every 4096 iterations a process asks
 * for a copy-on-write snapshot of its pages (the next write to each takes
 * a #PF and a copy, as after fork); at every tick the kernel clears the
 * accessed and dirty bits of the running process's pages (a clock, with
 * INVLPG) and at every fourth it swaps one of its pages out (not present,
 * its contents kept in the kernel) to be brought back by the next touch.
 * A page shared by all is mapped twice (an alias) and counted through
 * both.
 *
 * When the timer fires, and so which pages are swapped or copied when,
 * depends on timing; what the processes compute does not: each prints a
 * checksum of its own pages, and the shared counter is the sum of their
 * iterations. QEMU and popek must print the same bytes (issue 16). */
#include "rt/rt.h"
#define P 1
#define W 2
#define U 4
#define A 0x20
#define D 0x40
#define COW 0x200
#define SWP 0x400
#define NPROC 12
#define NP 8
#define UD 0x40000000u
#define SH 0x40800000u
static u32 kpt[8][1024] __attribute__((aligned(4096)));
static u32 shpt[1024] __attribute__((aligned(4096)));
static u32 next = 0x1000000;
static u32 freel[4096], nfree;
static u8 refc[8192];
static u32 alloc(void) { u32 f = nfree ? freel[--nfree] : (next += 4096) - 4096; refc[f >> 12] = 1; return f; }
static void unref(u32 f) { if (--refc[f >> 12] == 0) freel[nfree++] = f; }
static u32 *pa(u32 p) { return (u32 *)p; }
static inline void invlpg(u32 va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }
static inline void wcr3(u32 v) { __asm__ volatile("mov %0,%%cr3" ::"r"(v) : "memory"); }
struct proc { struct frame f; u32 dir, pt, done, result, iters; u8 stack[2048]; u32 swapslot[NP]; };
static struct proc procs[NPROC];
static int cur, alive;
u32 g_eax, g_ebx;
static volatile u32 ticks, faults, cows, swaps;
static u8 swapspace[64][4096];
static u32 swapused;
static void finish(void);
static void pagefault(struct frame *f)
{
    u32 a = read_cr2();
    struct proc *p = &procs[cur];
    faults++;
    if ((a >> 22) != (UD >> 22)) { printf("bad fault %x err %x eip %x\n", a, f->error, f->eip); exit(3); }
    u32 *e = &pa(p->pt)[(a >> 12) & 1023];
    if (*e & SWP) { /* swapped out: bring back */
        u32 slot = *e >> 12, fr = alloc();
        memcpy(pa(fr), swapspace[slot], 4096);
        swapused &= ~(1u << slot);
        *e = fr | P | W | U;
    } else if (!(*e & P)) { /* demand zero */
        u32 fr = alloc();
        memset(pa(fr), 0, 4096);
        *e = fr | P | W | U;
    } else if ((*e & COW) && (f->error & 2)) {
        u32 old = *e & ~0xfff;
        if (refc[old >> 12] > 1) { u32 fr = alloc(); memcpy(pa(fr), pa(old), 4096); unref(old); *e = fr | P | W | U; }
        else *e = old | P | W | U;
        cows++;
    } else { printf("unexpected fault %x err %x\n", a, f->error); exit(4); }
    invlpg(a);
}
static u32 snapshot_frames[NPROC][NP];
static void syscall(struct frame *f)
{
    struct proc *p = &procs[cur];
    if (f->eax == 1) { /* COW snapshot: share every present page with a hidden copy */
        for (int i = 0; i < NP; i++) {
            if (snapshot_frames[cur][i]) { unref(snapshot_frames[cur][i]); snapshot_frames[cur][i] = 0; }
            u32 *e = &pa(p->pt)[i];
            if (*e & P) { u32 fr = *e & ~0xfff; refc[fr >> 12]++; snapshot_frames[cur][i] = fr; *e = (*e & ~W) | COW; invlpg(UD + i * 4096); }
        }
    } else if (f->eax == 2) { /* exit */
        p->done = 1; p->result = f->ebx; alive--;
        if (!alive) finish();
        f->eax = 0;
        goto sched;
    }
    return;
sched:;
    int n = cur;
    do n = (n + 1) % NPROC; while (procs[n].done);
    procs[cur].f = *f; cur = n; *f = procs[cur].f; wcr3(procs[cur].dir);
}
static void timer(struct frame *f)
{
    ticks++;
    outb(0x20, 0x20);
    struct proc *p = &procs[cur];
    /* clock: clear accessed/dirty bits of the current process */
    for (int i = 0; i < NP; i++) { u32 *e = &pa(p->pt)[i]; if (*e & P) { *e &= ~(A | D); invlpg(UD + i * 4096); } }
    /* swap one page out now and then */
    if ((ticks & 3) == 0) {
        int i = ticks % NP; u32 *e = &pa(p->pt)[i];
        if ((*e & P) && !(*e & COW) && swapused != ~0u) {
            int slot = 0; while (swapused & (1u << slot)) slot++;
            swapused |= 1u << slot;
            memcpy(swapspace[slot], pa(*e & ~0xfff), 4096);
            unref(*e & ~0xfff);
            *e = (slot << 12) | SWP; invlpg(UD + i * 4096); swaps++;
        }
    }
    int n = cur;
    do n = (n + 1) % NPROC; while (procs[n].done);
    if (n != cur) { procs[cur].f = *f; cur = n; *f = procs[cur].f; wcr3(procs[cur].dir); }
}
static void user_main(void)
{
    u32 seed, iters;
    __asm__ volatile("" : "=a"(seed), "=b"(iters)); /* set by the kernel */
    u32 *d = (u32 *)UD;
    u32 h = seed;
    for (u32 it = 0; it < iters; it++) {
        u32 pg = (h >> 3) % NP, w = (h >> 8) & 1023;
        d[pg * 1024 + w] += h;
        h = h * 1664525u + 1013904223u + d[((h >> 5) % NP) * 1024 + ((h >> 13) & 1023)];
        __asm__ volatile("incl 0x40800000" ::: "memory");
        if ((it & 4095) == 0) __asm__ volatile("int $0x40" ::"a"(1) : "memory");
    }
    for (u32 i = 0; i < NP * 1024; i++) h = (h << 3 | h >> 29) ^ d[i];
    __asm__ volatile("int $0x40" ::"a"(2), "b"(h) : "memory");
    for (;;);
}
static void finish(void)
{
    outb(0x21, 0xff);
    printf("all done; shared counter %u (via alias %u)\n", pa(SH)[0], pa(SH + 4096)[0]);
    for (int i = 0; i < NPROC; i++) printf("proc %d: %x\n", i, procs[i].result);
    exit(0);
}
int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    u32 iters = cmdline_number(mbi, "n=", 20000);
    u32 hz = cmdline_number(mbi, "hz=", 1000);
    gdt_init();
    idt_set(14, pagefault, 0, 0);
    idt_set(0x20, timer, 0, 0);
    idt_set(0x40, syscall, 3, 0);
    idt_load();
    for (int t = 0; t < 8; t++)
        for (int i = 0; i < 1024; i++) kpt[t][i] = ((t * 1024 + i) << 12) | P | W | U;
    u32 shf = alloc(); memset(pa(shf), 0, 4096);
    shpt[0] = shf | P | W | U; shpt[1] = shf | P | W | U;
    for (int k = 0; k < NPROC; k++) {
        struct proc *p = &procs[k];
        p->dir = alloc(); memset(pa(p->dir), 0, 4096);
        for (int t = 0; t < 8; t++) pa(p->dir)[t] = (u32)kpt[t] | P | W | U;
        p->pt = alloc(); memset(pa(p->pt), 0, 4096);
        pa(p->dir)[UD >> 22] = p->pt | P | W | U;
        pa(p->dir)[SH >> 22] = (u32)shpt | P | W | U;
        p->f.eip = (u32)user_main; p->f.cs = UCODE; p->f.eflags = EFL_IF | 2;
        p->f.user_esp = (u32)(p->stack + sizeof p->stack); p->f.user_ss = UDATA; p->f.ds = UDATA;
        p->f.eax = 0x1234567 * (k + 1); p->f.ebx = iters + k * 1000;
    }
    alive = NPROC;
    wcr3(procs[0].dir);
    __asm__ volatile("mov %%cr0,%%eax; or $0x80010000,%%eax; mov %%eax,%%cr0" ::: "eax", "memory");
    pic_init(0x20, 0x28, 1 << 0);
    u32 cnt = 1193182 / hz;
    outb(0x43, 0x34); outb(0x40, cnt & 0xff); outb(0x40, cnt >> 8);
    /* start process 0 through an IRET frame */
    cur = 0;
    static u32 ir[5];
    struct frame *f = &procs[0].f;
    ir[0] = f->eip; ir[1] = f->cs; ir[2] = f->eflags; ir[3] = f->user_esp; ir[4] = f->user_ss;
    g_eax = f->eax; g_ebx = f->ebx;
    __asm__ volatile("mov %0,%%esp; mov $0x23,%%cx; mov %%cx,%%ds; mov %%cx,%%es; mov g_eax,%%eax; mov g_ebx,%%ebx; iret" :: "r"(ir) : "memory");
    return 0;
}
