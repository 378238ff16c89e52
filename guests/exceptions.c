/* exceptions: IDT handlers for CPU exceptions and software interrupts,
 * with IRET back to the interrupted code. Checks the vector, the error
 * code and the saved EIP (faults point at the faulting instruction, traps
 * after it), segment bases, not-present segments, page faults with CR2,
 * and a double fault. */
#include "rt/rt.h"

u32 fault_at, resume_at;
static volatile u32 got_vector, got_error, got_eip, got_count, got_cr2;
static volatile int fix_paging;

/* Run `insn` with labels: 1 = the instruction, 2 = just after it. */
#define TRY(insn, ...)                                                     \
    __asm__ volatile("movl $1f, fault_at\n\tmovl $2f, resume_at\n"         \
                     "1:\t" insn "\n2:\n" __VA_ARGS__)

static u32 page_dir[1024] __attribute__((aligned(4096)));
static u32 page_tables[2][1024] __attribute__((aligned(4096)));

static void on_exception(struct frame *f)
{
    got_vector = f->vector;
    got_error = f->error;
    got_eip = f->eip;
    got_count++;
    if (f->vector == 14) {
        got_cr2 = read_cr2();
        /* make the page present and writable, then restart the access */
        u32 a = got_cr2;
        page_tables[a >> 22][(a >> 12) & 1023] = (a & ~0xFFF) | 3;
        return;
    }
    if (f->vector == 0x40) {
        f->eax = 0x600D;
        return;
    }
    if (f->vector == 3 || f->vector == 4)
        return;                             /* traps: saved EIP is past the insn */
    f->eip = resume_at;                     /* faults: skip the faulting insn */
}

static void report(const char *what, u32 want_vector, int trap)
{
    const char *where = got_eip == fault_at ? "faulting instruction"
                        : got_eip == resume_at ? "next instruction"
                                               : "elsewhere";
    printf("%s: vector %u", what, got_vector);
    if (got_vector == 8 || (got_vector >= 10 && got_vector <= 14) || got_vector == 17)
        printf(", error %x", got_error);
    if (got_vector != 8)
        printf(", saved eip at %s", where);
    int ok = got_vector == want_vector &&
             (got_vector == 8 || (trap ? got_eip == resume_at : got_eip == fault_at));
    printf(" -> %s\n", ok ? "ok" : "WRONG");
    got_vector = 0xFFFF;
}

static u8 segbuf[512];

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    for (int v = 0; v < 20; v++)
        if (v != 2 && v != 15)
            idt_set(v, on_exception, 0, 0);
    idt_set(0x40, on_exception, 0, 1);
    idt_load();

    TRY("divl %%ecx", : : "a"(1), "d"(0), "c"(0));
    report("#DE divide by zero", 0, 0);
    TRY("idivl %%ecx", : : "a"(0x80000000), "d"(0xFFFFFFFF), "c"(-1));
    report("#DE idiv overflow", 0, 0);
    TRY("ud2");
    report("#UD ud2", 6, 0);
    TRY(".byte 0xf0, 0x90");
    report("#UD lock nop", 6, 0);
    TRY("int3");
    report("#BP int3", 3, 1);
    TRY("testl %%eax, %%eax\n\tinto", : : "a"(0x7FFFFFFF) : "cc");  /* OF clear: no trap */
    printf("INTO without OF: %s\n", got_vector == 0xFFFF ? "no trap" : "WRONG");
    TRY("addl $1, %%eax\n\tinto", : : "a"(0x7FFFFFFF) : "cc");
    fault_at += 3;                                          /* the into after the add */
    report("#OF into", 4, 1);
    {
        static s32 bounds[2] = {10, 20};
        TRY("boundl %%eax, (%%ebx)", : : "a"(21), "b"(bounds));
        report("#BR bound", 5, 0);
        TRY("boundl %%eax, (%%ebx)", : : "a"(15), "b"(bounds));
        printf("BOUND in range: %s\n", got_vector == 0xFFFF ? "no trap" : "WRONG");
    }
    {
        u32 eax = 0;
        TRY("int $0x40", : "=a"(eax) : "a"(1));
        report("INT 0x40", 0x40, 1);
        printf("INT 0x40 handler result via IRET: %x\n", eax);
    }

    /* segment faults */
    TRY("movw %%ax, %%ds\n\tmovw $0x10, %%ax\n\tmovw %%ax, %%ds", : : "a"(0x1000));
    report("#GP selector beyond GDT limit", 13, 0);
    __asm__ volatile("movw $0x10, %%ax; movw %%ax, %%ds" : : : "eax");
    gdt_set(6, 0, 0xFFFFF, 0x12 | 0x80 * 0, 0xC);          /* data, not present */
    TRY("movw %%ax, %%ds", : : "a"(0x30));
    report("#NP not-present data segment", 11, 0);
    __asm__ volatile("movw $0x10, %%ax; movw %%ax, %%ds" : : : "eax");
    gdt_set(7, (u32)segbuf, 0xFF, 0x92, 0x4);              /* 256-byte data segment */
    for (int i = 0; i < 256; i++)
        segbuf[i] = (u8)(i * 7);
    {
        u32 v = 0;
        __asm__ volatile("movw $0x38, %%ax; movw %%ax, %%fs; movl %%fs:0xFC, %0" : "=r"(v) : : "eax");
        u32 want = segbuf[0xFC] | segbuf[0xFD] << 8 | segbuf[0xFE] << 16 | (u32)segbuf[0xFF] << 24;
        printf("fs:[0xFC] = %08x, segment base honoured: %s\n", v, v == want ? "yes" : "no");
    }

    /* a double fault: the #NP handler's gate is not present */
    idt_raw(11, 0, KCODE, 0x0E);                           /* P = 0 */
    TRY("movw %%ax, %%ds", : : "a"(0x30));
    report("#DF (#NP while delivering #NP)", 8, 0);
    __asm__ volatile("movw $0x10, %%ax; movw %%ax, %%ds" : : : "eax");
    idt_set(11, on_exception, 0, 0);

    /* paging: identity-map 8 MiB with 4 KiB pages, leave one page out */
    for (int t = 0; t < 2; t++) {
        for (int i = 0; i < 1024; i++)
            page_tables[t][i] = ((t * 1024 + i) << 12) | 3;
        page_dir[t] = (u32)page_tables[t] | 3;
    }
    page_tables[1][0] = 0;                                 /* 0x400000 not present */
    page_tables[1][1] = 0x401000 | 1;                      /* 0x401000 read-only */
    *(volatile u32 *)0x400000 = 0;                         /* (paging still off) */
    *(volatile u32 *)0x400010 = 0x12345678;
    __asm__ volatile("mov %0, %%cr3; mov %%cr0, %%eax; or $0x80010000, %%eax; mov %%eax, %%cr0"
                     : : "r"(page_dir) : "eax", "memory");
    {
        u32 v = 0;
        TRY("movl 0x400010, %0", : "=r"(v));
        printf("#PF not present: vector %u, error %x, cr2 %x, restarted read %x\n", got_vector,
               got_error, got_cr2, v);
        got_vector = 0xFFFF;
        TRY("movl $0x5A5A, 0x401020");
        printf("#PF write to read-only page with CR0.WP: vector %u, error %x, cr2 %x, value %x\n",
               got_vector, got_error, got_cr2, *(volatile u32 *)0x401020);
        u32 pte = page_tables[1][1];
        printf("accessed and dirty bits set: %s\n", (pte & 0x60) == 0x60 ? "yes" : "no");
    }
    __asm__ volatile("mov %%cr0, %%eax; and $0x7FFFFFFF, %%eax; mov %%eax, %%cr0" : : : "eax");
    printf("exceptions taken: %u\n", got_count);
    return 0;
}
