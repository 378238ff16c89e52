/* popf: what POPF, PUSHF, CLI and STI do to the virtual IF and IOPL, at
 * ring 0 and at ring 3. At ring 3 POPF silently ignores IF and IOPL: no
 * trap, so a trap-and-emulate monitor never sees it. That is the reason x86
 * fails the Popek-Goldberg condition. */
#include "rt/rt.h"

static volatile u32 gp_count, gp_eip;

static void on_gp(struct frame *f)
{
    gp_count++;
    gp_eip = f->eip;
    f->eip += 1;                 /* skip the one-byte CLI/STI */
}

/* results recorded at ring 3, printed at ring 0 */
static volatile u32 u_flags0, u_after_popf_if, u_after_popf_iopl, u_after_cli, u_gp_before,
    u_gp_after;

static void user_code(void)
{
    u32 f = read_eflags();
    u_flags0 = f;
    write_eflags(f & ~EFL_IF);             /* try to clear IF */
    u_after_popf_if = read_eflags();
    write_eflags(f | EFL_IOPL);            /* try to raise IOPL to 3 */
    u_after_popf_iopl = read_eflags();
    u_gp_before = gp_count;
    __asm__ volatile("cli");               /* privileged: traps */
    u_gp_after = gp_count;
    u_after_cli = read_eflags();
    user_return();
}

static u32 iopl_user_flags;

static void user_code_iopl3(void)
{
    __asm__ volatile("cli");               /* allowed: CPL <= IOPL */
    iopl_user_flags = read_eflags();
    __asm__ volatile("sti");
    user_return();
}

static const char *yn(int b) { return b ? "yes" : "no"; }

static volatile u32 db_count, db_eip;

static void on_db(struct frame *f)
{
    db_count++;
    db_eip = f->eip;
    f->eflags &= ~EFL_TF;        /* one step is enough */
}

extern char after_one_step[];

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    idt_set(13, on_gp, 0, 0);
    idt_set(1, on_db, 0, 0);
    idt_load();

    u32 f = read_eflags();
    printf("ring0: IF at entry = %u, IOPL = %u\n", (f >> 9) & 1, (f >> 12) & 3);
    __asm__ volatile("sti");
    printf("ring0: after STI, PUSHF shows IF = %u\n", (read_eflags() >> 9) & 1);
    write_eflags(read_eflags() & ~EFL_IF);
    printf("ring0: POPF with IF=0 -> IF = %u\n", (read_eflags() >> 9) & 1);
    write_eflags(read_eflags() | EFL_IF);
    printf("ring0: POPF with IF=1 -> IF = %u\n", (read_eflags() >> 9) & 1);
    write_eflags(read_eflags() | EFL_IOPL);
    printf("ring0: POPF with IOPL=3 -> IOPL = %u\n", (read_eflags() >> 12) & 3);
    write_eflags(read_eflags() & ~EFL_IOPL);
    printf("ring0: POPF with IOPL=0 -> IOPL = %u\n", (read_eflags() >> 12) & 3);
    __asm__ volatile("cli");
    printf("ring0: after CLI, IF = %u\n", (read_eflags() >> 9) & 1);
    /* PUSHF/POPF with a 16-bit operand touch only FLAGS */
    u16 w;
    __asm__ volatile("pushfw; popw %0" : "=r"(w));
    printf("ring0: PUSHFW = %04x\n", w & 0xFFD7);
    /* Every bit through POPF and back through PUSHF at ring 0 (TF and IF
     * aside): reserved bits, RF, VM, VIF and VIP do not change. */
    u32 all = 0x3FFFFF & ~(EFL_TF | EFL_IF), seen;
    __asm__ volatile("pushfl; pushl %1; popfl; pushfl; popl %0; popfl" : "=r"(seen) : "r"(all) : "cc");
    printf("ring0: POPF %06x -> PUSHF %06x\n", all, seen);
    /* POPF setting TF: a single-step trap after the next instruction. */
    __asm__ volatile("pushfl; orl $0x100, (%%esp); popfl; nop\n"
                     ".globl after_one_step\nafter_one_step: nop" : : : "cc", "memory");
    printf("ring0: POPF with TF=1 -> #DB after one instruction: %s (%u)\n",
           yn(db_eip == (u32)after_one_step), db_count);

    run_user(user_code, EFL_IF);
    printf("ring3: PUSHF shows IF = %u, IOPL = %u\n", (u_flags0 >> 9) & 1, (u_flags0 >> 12) & 3);
    printf("ring3: POPF with IF=0 -> IF = %u (changed: %s, trapped: no)\n",
           (u_after_popf_if >> 9) & 1, yn(!(u_after_popf_if & EFL_IF)));
    printf("ring3: POPF with IOPL=3 -> IOPL = %u (changed: %s, trapped: no)\n",
           (u_after_popf_iopl >> 12) & 3, yn((u_after_popf_iopl & EFL_IOPL) != 0));
    printf("ring3: CLI trapped with #GP: %s, IF after = %u\n", yn(u_gp_after == u_gp_before + 1),
           (u_after_cli >> 9) & 1);

    run_user(user_code_iopl3, EFL_IF | EFL_IOPL);
    printf("ring3 with IOPL=3: CLI allowed, IF = %u\n", (iopl_user_flags >> 9) & 1);

    int violated = !(u_after_popf_if & EFL_IF) == 0 && (u_after_popf_iopl & EFL_IOPL) == 0;
    printf("verdict: POPF is sensitive but does not trap at ring 3 (Popek-Goldberg violated): %s\n",
           yn(violated));
    printf("#GP traps taken: %u\n", gp_count);
    return 0;
}
