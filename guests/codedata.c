/* codedata: integer arithmetic checks whose data lives on the pages of
 * the code that computes it. A result table, counters and a checksum are
 * placed in .text between the functions (the way small kernels, boot code
 * and programs whose .data follows .text without page alignment have
 * them), so nearly every store shares a 4 KiB page with translated code
 * and some share a 64-byte chunk with it. Two functions are patched while
 * the program runs (an immediate operand rewritten, then called): real
 * self-modifying code, which must take effect at once.
 *
 * codedata-split.c is the same program with the data on pages of its own:
 * the two must print the same, and popek should run them in about the
 * same time (docs/performance.md; issue 24). paging=1 on the command line
 * (the default in codedata-paged.c) runs it all with paging on: the same
 * addresses, identity-mapped with 4 MiB pages. */
#include "rt/rt.h"

#ifdef SPLIT
/* Data on pages without code. */
#define DATA_SECTION ".pushsection .data\n.balign 4096\n"
#define DATA_END ".balign 4096\n.popsection\n"
#else
/* Data among the code. */
#define DATA_SECTION ".pushsection .text\n.balign 4\n"
#define DATA_END ".popsection\n"
#endif

#define ROUNDS 250
#define N 256

__asm__(DATA_SECTION
        ".global results, counters, checksum, jit\n"
        "results: .fill 1024, 1, 0\n"
        "counters: .fill 64, 1, 0\n"
        "checksum: .long 0\n"
        ".balign 64\n"
        "jit: .fill 128, 1, 0xcc\n"
        ".balign 16\n"
        "stack: .fill 2048, 1, 0\n"
        "stack_top:\n"
        DATA_END);

extern u8 stack_top[];

extern u32 results[N];
extern volatile u32 counters[16];
extern volatile u32 checksum;
extern volatile u8 jit[128];

/* A little JIT: one byte-store loop writes "mov $imm, %eax; add $k, %eax;
 * ret" into one of two 64-byte halves of `jit` (among the code, or on a
 * data page of its own in codedata-split), and the function is called.
 * Each half is rewritten while an older translation of it exists, so the
 * store (by then a hot one, see docs/architecture.md) must be seen as
 * code written every time. */
static u32 jit_call(u32 half, u32 imm, u32 k)
{
    u8 code[11] = {0xB8, (u8)imm, (u8)(imm >> 8), (u8)(imm >> 16), (u8)(imm >> 24),
                   0x05, (u8)k,   (u8)(k >> 8),   (u8)(k >> 16),   (u8)(k >> 24), 0xC3};
    volatile u8 *dst = jit + 64 * half;
    for (u32 b = 0; b < sizeof code; b++)
        dst[b] = code[b];
    return ((u32(*)(void))(u32)dst)();
}

/* Two patchable functions, each "mov $imm32, %eax; ret" with a data word
 * right after it (in the same 64-byte chunk: a store there overlaps no
 * instruction). */
__asm__(".text\n"
        ".balign 64\n"
        ".global patch_a, patch_a_imm, near_a, patch_b, patch_b_imm, near_b\n"
        "patch_a: .byte 0xB8\n"
        "patch_a_imm: .long 1\n"
        "    ret\n"
        "near_a: .long 0\n"
        ".balign 64\n"
        "patch_b: .byte 0xB8\n"
        "patch_b_imm: .long 2\n"
        "    ret\n"
        "near_b: .long 0\n");

extern u32 patch_a(void), patch_b(void);
extern volatile u32 patch_a_imm, patch_b_imm, near_a, near_b;

/* Recursion whose stack (PUSH, CALL, stores through ESP) shares pages
 * with the code, as a small kernel's stack in .bss right after its code
 * does. */
static u32 fib(u32 k)
{
    return k < 2 ? k : fib(k - 1) + fib(k - 2);
}

/* fib(k) on `stack_top`'s stack, back on ours after. */
static u32 fib_on_own_stack(u32 k)
{
    u32 r;
    __asm__ volatile("mov %%esp, %%ebx\n"
                     "mov %[top], %%esp\n"
                     "push %%ebx\n"
                     "push %[k]\n"
                     "call *%[f]\n"
                     "add $4, %%esp\n"
                     "pop %%esp"
                     : "=a"(r)
                     : [top] "r"(stack_top), [k] "r"(k), [f] "r"(fib)
                     : "ebx", "ecx", "edx", "memory");
    return r;
}

static u32 isqrt(u32 v)
{
    u32 r = 0, bit = 1u << 30;
    while (bit > v)
        bit >>= 2;
    while (bit) {
        if (v >= r + bit) {
            v -= r + bit;
            r = (r >> 1) + bit;
        } else
            r >>= 1;
        bit >>= 2;
    }
    return r;
}

static u32 gcd(u32 a, u32 b)
{
    while (b) {
        u32 t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* One value per (round, i), from multiplies, divides, shifts and a square
 * root; its check recomputes it another way. */
static u32 compute(u32 round, u32 i)
{
    u32 x = (round * 2654435761u) ^ (i * 40503u);
    u32 q = x / (i + 3), r = x % (i + 3);
    u32 s = isqrt(x >> 4);
    return q * 7 + r + s + gcd(x | 1, i + 1) + (x >> (i & 15));
}

static int check(u32 round, u32 i, u32 v)
{
    u32 x = (round * 2654435761u) ^ (i * 40503u);
    u32 d = i + 3;
    u32 q = 0, r = x;
    /* Long division by shifting, independent of DIV. */
    for (int b = 31; b >= 0; b--) {
        if ((r >> b) >= d) {
            r -= d << b;
            q |= 1u << b;
        }
    }
    u32 s = isqrt(x >> 4);
    return v == q * 7 + r + s + gcd(x | 1, i + 1) + (x >> (i & 15)) && s * s <= (x >> 4);
}

#ifndef PAGED
#define PAGED 0
#endif

/* Identity-mapped 0-64 MiB with 4 MiB pages (PSE), paging on. */
static u32 directory[1024] __attribute__((aligned(4096)));

static void paging_on(void)
{
    for (u32 i = 0; i < 16; i++)
        directory[i] = (i << 22) | 0x83; /* present, writable, 4 MiB */
    __asm__ volatile("mov %%cr4, %%eax\n or $0x10, %%eax\n mov %%eax, %%cr4\n"
                     "mov %0, %%cr3\n"
                     "mov %%cr0, %%eax\n or $0x80010000, %%eax\n mov %%eax, %%cr0"
                     :
                     : "r"(directory)
                     : "eax", "memory");
}

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    if (cmdline_number(mbi, "paging=", PAGED))
        paging_on();
    u32 bad = 0, patched = 0, jitted = 0;
    for (u32 round = 0; round < ROUNDS; round++) {
        for (u32 i = 0; i < N; i++) {
            u32 v = compute(round, i);
            results[i] = v;
            counters[i & 15]++;
            if (!check(round, i, results[i]))
                bad++;
        }
        u32 c = checksum;
        for (u32 i = 0; i < N; i++)
            c = (c << 5 | c >> 27) ^ results[i];
        checksum = c;
        /* Self-modifying code: rewrite the immediate, call, check. */
        patch_a_imm = round * 3 + 1;
        near_a = round;
        if (patch_a() != round * 3 + 1)
            bad++;
        if ((round & 7) == 0) {
            patch_b_imm = c;
            near_b = c;
            patched += patch_b() == c;
        }
        if (jit_call(round & 1, c, round) != c + round)
            bad++;
        else
            jitted++;
        /* fib(12) = 144, 465 calls deep to 12 frames. */
        if ((round & 3) == 0 && fib_on_own_stack(12) != 144)
            bad++;
    }
    printf("codedata: %u rounds of %u values, %u wrong\n", ROUNDS, N, bad);
    printf("checksum %x, counters", checksum);
    for (int i = 0; i < 16; i++)
        printf(" %u", counters[i]);
    printf("\npatched functions returned their new immediates %u times\n", patched);
    printf("jitted functions returned what they were written to %u times\n", jitted);
    exit(bad ? 1 : 0);
}
