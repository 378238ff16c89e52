/* segments: segment limits and expand-down segments, as the Intel SDM
 * defines them (Vol. 3 §5.3). QEMU's TCG does not check data segment
 * limits, so this guest is not compared with QEMU: each line carries the
 * SDM's expected outcome and the guest prints "ok" or "WRONG". */
#include "rt/rt.h"

u32 fault_at, resume_at;
static volatile u32 got_vector, got_error;

#define TRY(insn, ...)                                                     \
    __asm__ volatile("movl $1f, fault_at\n\tmovl $2f, resume_at\n"         \
                     "1:\t" insn "\n2:\n" __VA_ARGS__)

static void on_fault(struct frame *f)
{
    got_vector = f->vector;
    got_error = f->error;
    f->eip = resume_at;
}

static u32 failures;

static void expect(const char *what, u32 vector, u32 error)
{
    int ok = got_vector == vector && (vector == 0xFFFF || got_error == error);
    if (!ok)
        failures++;
    if (vector == 0xFFFF)
        printf("%s: no fault -> %s\n", what, ok ? "ok" : "WRONG");
    else
        printf("%s: vector %u error %x -> %s\n", what, got_vector, got_error, ok ? "ok" : "WRONG");
    got_vector = 0xFFFF;
    got_error = 0;
}

static u8 buf[8192];

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    idt_set(12, on_fault, 0, 0);
    idt_set(13, on_fault, 0, 0);
    idt_load();
    got_vector = 0xFFFF;

    gdt_set(6, (u32)buf, 0xFF, 0x92, 0x4);          /* 0x30: 256 bytes, expand-up */
    gdt_set(7, (u32)buf, 0xFFF, 0x96, 0x4);         /* 0x38: expand-down, valid 0x1000..0xFFFFFFFF */
    __asm__ volatile("movw $0x30, %%ax; movw %%ax, %%fs" : : : "eax");
    TRY("movl %%fs:0xFC, %%eax", : : : "eax");
    expect("read of the last dword inside the limit", 0xFFFF, 0);
    TRY("movl %%fs:0xFD, %%eax", : : : "eax");
    expect("read crossing the limit", 13, 0);
    TRY("movb $1, %%fs:0x100", : : : "memory");
    expect("write one past the limit", 13, 0);
    __asm__ volatile("movw $0x38, %%ax; movw %%ax, %%gs" : : : "eax");
    TRY("movl %%gs:0xFFC, %%eax", : : : "eax");
    expect("expand-down: read below the limit", 13, 0);
    TRY("movl %%gs:0x1000, %%eax", : : : "eax");
    expect("expand-down: read above the limit", 0xFFFF, 0);
    /* a null selector in DS faults on use, not on load */
    TRY("movw %%ax, %%fs\n\tmovl %%fs:0, %%eax", : : "a"(0) : "memory");
    expect("access through a null FS", 13, 0);
    /* a read-only data segment */
    gdt_set(6, (u32)buf, 0xFF, 0x90, 0x4);
    __asm__ volatile("movw $0x30, %%ax; movw %%ax, %%fs" : : : "eax");
    TRY("movb $1, %%fs:0x10", : : : "memory");
    expect("write to a read-only segment", 13, 0);
    /* a stack segment limit fault is #SS; the limit (1 MiB + 64 KiB) still
     * covers the stack, so the #SS itself can be delivered */
    gdt_set(6, 0, 0x10F, 0x92, 0xC);
    TRY("movw $0x30, %%ax\n\tmovw %%ax, %%ss\n\tmovl %%ss:0x200000, %%eax", : : : "eax");
    __asm__ volatile("movw $0x10, %%ax; movw %%ax, %%ss" : : : "eax");
    expect("SS-relative read beyond the SS limit", 12, 0);
    printf("segments: %s\n", failures ? "FAIL" : "PASS");
    return failures;
}
