/* ptchurn: page-table microbenchmarks, each a pattern an operating
 * system's memory manager makes (after Adams and Agesen's PTE-update
 * microbenchmark, ASPLOS 2006), run one after another at ring 0 with
 * paging on, each printing a checksum of what it read:
 *   1 an entry rewritten and the page touched at once (INVLPG between)
 *   2 64 address spaces switched round robin (MOV CR3), 16 pages each
 *   3 a clock: 256 pages touched, their accessed and dirty bits read and
 *     cleared, INVLPG or a CR3 reload
 *   4 copies through two temporary windows remapped for every page, as
 *     a kernel's kmap does
 *   5 a page table built, hung into the directory, used and dropped
 *   6 demand-zero faults: 64 pages mapped by the #PF handler, then
 *     unmapped together
 *   7 entries written through a recursive mapping of the directory
 *   8 global pages (CR4.PGE) across switches between 8 directories
 * The command line may name one test (test=N) and its rounds (n=N) and
 * the spaces of test 2 (k=N). Its output is checked against QEMU's;
 * docs/performance.md times it against qemu-system-i386 (issue 16). */
#include "rt/rt.h"
#define P 1
#define W 2
#define U 4
#define A 0x20
#define D 0x40
#define PS 0x80
#define G 0x100
static u32 kpt[4][1024] __attribute__((aligned(4096)));
static u32 next = 0x1000000; /* frames from 16 MiB */
static u32 alloc(void) { u32 f = next; next += 4096; return f; }
static u32 *pa(u32 p) { return (u32 *)p; }
static void fill_page(u32 p, u32 byte)
{
    u32 n = 1024;
    __asm__ volatile("cld; rep stosl" : "+D"(p), "+c"(n) : "a"((byte & 0xff) * 0x01010101u) : "memory");
}
static void clear_page(u32 p) { fill_page(p, 0); }
static inline void invlpg(u32 va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }
static inline void wcr3(u32 v) { __asm__ volatile("mov %0,%%cr3" ::"r"(v) : "memory"); }
static inline u32 rcr3(void) { u32 v; __asm__ volatile("mov %%cr3,%0" : "=r"(v)); return v; }
static inline u32 rcr4(void) { u32 v; __asm__ volatile("mov %%cr4,%0" : "=r"(v)); return v; }
static inline void wcr4(u32 v) { __asm__ volatile("mov %0,%%cr4" ::"r"(v) : "memory"); }
static u32 newdir(int global)
{
    u32 d = alloc();
    clear_page(d);
    for (int i = 0; i < 4; i++) pa(d)[i] = (u32)kpt[i] | P | W | (global ? 0 : 0);
    for (int i = 4; i < 16; i++) pa(d)[i] = (i << 22) | P | W | PS | (global ? G : 0);
    for (int i = 16; i < 64; i++) pa(d)[i] = (i << 22) | P | W | PS;
    return d;
}
static u32 map(u32 dir, u32 va, u32 frame, u32 flags)
{
    u32 *pd = pa(dir);
    u32 pde = pd[va >> 22];
    if (!(pde & P)) { u32 t = alloc(); clear_page(t); pd[va >> 22] = t | P | W | U; pde = pd[va >> 22]; }
    u32 *pt = pa(pde & ~0xfff);
    pt[(va >> 12) & 1023] = frame | flags;
    return (u32)&pt[(va >> 12) & 1023];
}
static volatile u32 fault_count, fault_addr_sum;
static u32 cur_dir;
static void pf(struct frame *f)
{
    u32 a = read_cr2();
    fault_count++;
    fault_addr_sum += a ^ f->error;
    u32 fr = alloc();
    clear_page(fr);
    map(cur_dir, a & ~0xfff, fr, P | W | U);
}
static const u32 rounds[9] = {0, 20000, 4000, 1000, 10000, 10000, 200, 20000, 20000};

static u32 first_free, boot_dir;

static void run_test(u32 test, u32 n, u32 k)
{
    /* Every test starts on the same frames (the boot directory's are
     * not among them: it is the one in use while they are reused). */
    wcr3(boot_dir);
    next = first_free;
    fault_count = fault_addr_sum = 0;
    u32 dir = newdir(test == 8);
    cur_dir = dir;
    wcr3(dir);
    u32 sum = 0;
    u32 VA = 0x40000000;
    if (test == 1) { /* PTE update microbenchmark */
        u32 pool[128];
        for (int i = 0; i < 128; i++) { pool[i] = alloc(); fill_page(pool[i], i); }
        for (u32 i = 0; i < n; i++) {
            u32 va = VA + (i % 64) * 4096;
            map(dir, va, pool[(i * 7) % 128], P | W);
            invlpg(va);
            pa(va)[i % 1024] += i;
            sum += pa(va)[(i * 3) % 1024];
        }
    } else if (test == 2) { /* many address spaces */
        u32 K = k;
        u32 dirs[512];
        for (u32 k = 0; k < K; k++) {
            dirs[k] = newdir(0);
            for (int p = 0; p < 16; p++) { u32 f = alloc(); fill_page(f, k + p); map(dirs[k], VA + p * 4096, f, P | W); }
        }
        for (u32 i = 0; i < n; i++) {
            wcr3(dirs[i % K]);
            for (int p = 0; p < 16; p++) { u32 *q = pa(VA + p * 4096); q[i % 1024] += p; sum += q[(i + p) % 1024]; }
        }
        wcr3(dir);
    } else if (test == 3) { /* accessed/dirty scan */
        u32 ptes[256];
        for (int p = 0; p < 256; p++) ptes[p] = map(dir, VA + p * 4096, alloc(), P | W);
        for (u32 i = 0; i < n; i++) {
            for (int p = 0; p < 256; p += 1 + (i % 3)) { if (p & 1) pa(VA + p * 4096)[i % 1024] = i; else sum += pa(VA + p * 4096)[0]; }
            for (int p = 0; p < 256; p++) { u32 *e = pa(ptes[p]); sum += (*e & (A | D)) * (p + 1); *e &= ~(A | D); }
            if (i & 1) wcr3(dir); else for (int p = 0; p < 256; p++) invlpg(VA + p * 4096);
        }
    } else if (test == 4) { /* kmap-style copies through temporary windows */
        u32 fr[64];
        for (int i = 0; i < 64; i++) { fr[i] = alloc(); fill_page(fr[i], i * 3); }
        u32 s = VA, d = VA + 4096;
        for (u32 i = 0; i < n; i++) {
            map(dir, s, fr[i % 64], P | W); invlpg(s);
            map(dir, d, fr[(i * 5 + 1) % 64], P | W); invlpg(d);
            pa(s)[i % 1024] ^= i;
            __asm__ volatile("cld; rep movsl" : : "S"(s), "D"(d), "c"(1024) : "memory");
            sum += pa(d)[(i * 7) % 1024];
        }
    } else if (test == 5) { /* page tables created, filled, used, dropped */
        for (u32 i = 0; i < n; i++) {
            u32 t = alloc();
            clear_page(t);
            for (int p = 0; p < 16; p++) pa(t)[p * 3] = (0x100000 + ((i + p) % 16) * 4096) | P | W;
            pa(dir)[(VA >> 22)] = t | P | W;
            wcr3(dir);
            for (int p = 0; p < 16; p++) sum += pa(VA + p * 3 * 4096)[i % 1024];
            pa(dir)[(VA >> 22)] = 0;
            wcr3(dir);
            next -= 4096;
        }
    } else if (test == 6) { /* demand-zero faults */
        map(dir, VA, 0, 0); /* the page table, made once */
        u32 frames = next;
        for (u32 i = 0; i < n; i++) {
            u32 base = VA;
            for (int p = 0; p < 64; p++) pa(base + p * 4096)[i % 1024] = i + p;
            for (int p = 0; p < 64; p++) sum += pa(base + p * 4096)[i % 1024];
            u32 *pt = pa(pa(dir)[VA >> 22] & ~0xfff);
            for (int p = 0; p < 64; p++) pt[p] = 0;
            wcr3(dir);
            next = frames;
        }
    } else if (test == 7) { /* recursive mapping: page tables written through the self-map */
        pa(dir)[1023] = dir | P | W;
        wcr3(dir);
        map(dir, VA, alloc(), P | W);
        u32 *self = (u32 *)(0xffc00000 + (VA >> 22) * 4096);
        u32 pool[32];
        for (int i = 0; i < 32; i++) { pool[i] = alloc(); fill_page(pool[i], i); }
        for (u32 i = 0; i < n; i++) {
            u32 slot = i % 32;
            self[slot] = pool[(i * 3) % 32] | P | W;
            invlpg(VA + slot * 4096);
            pa(VA + slot * 4096)[i % 1024] += i;
            sum += pa(VA + slot * 4096)[(i * 5) % 1024] + (self[slot] & (A | D));
        }
    } else if (test == 8) { /* global pages and CR3 switches */
        u32 dirs[8];
        for (int k = 0; k < 8; k++) { dirs[k] = newdir(1); map(dirs[k], VA, alloc(), P | W); }
        for (u32 i = 0; i < n; i++) {
            wcr3(dirs[i % 8]);
            pa(VA)[i % 1024] += i;
            for (int p = 0; p < 8; p++) sum += pa(0x400000 * (4 + p))[i % 64];
            sum += pa(VA)[(i * 3) % 1024];
        }
    }
    printf("test %u: %u rounds, checksum %x, page faults %u (%x)\n", test, n, sum, fault_count,
           fault_addr_sum);
}

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    u32 test = cmdline_number(mbi, "test=", 0);
    u32 n = cmdline_number(mbi, "n=", 0);
    u32 k = cmdline_number(mbi, "k=", 64);
    idt_set(14, pf, 0, 0);
    idt_load();
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < 1024; i++)
            kpt[t][i] = ((t * 1024 + i) << 12) | P | W;
    wcr4(rcr4() | 0x10 | 0x80); /* PSE, PGE */
    boot_dir = newdir(0);
    first_free = next;
    wcr3(boot_dir);
    __asm__ volatile("mov %%cr0,%%eax; or $0x80010000,%%eax; mov %%eax,%%cr0" ::: "eax", "memory");
    if (k > 512)
        k = 512;
    for (u32 t = 1; t <= 8; t++)
        if (test == 0 || test == t)
            run_test(t, n ? n : rounds[t], k ? k : 1);
    exit(0);
}
