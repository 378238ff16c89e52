/* sensitive: what each sensitive instruction shows a ring-0 kernel, one
 * line per instruction, and a few privileged ones for contrast. On real
 * hardware (QEMU) and under popek's interp and bt every line is the
 * kernel's own state. Under --engine trap (the kernel deprivileged to CPL 3
 * by a classic trap-and-emulate monitor) the privileged lines stay right
 * (they trap and are emulated) while every sensitive line shows the real,
 * ring-3 machine instead: the Popek-Goldberg violations, line by line.
 * `popek demo popek-goldberg` prints the engines side by side. */
#include "rt/rt.h"

struct dtr {
    u16 limit;
    u32 base;
} __attribute__((packed));

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    idt_load();

    /* privileged: trap under a monitor, which emulates them */
    u32 cr0;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    printf("privileged mov cr0: %08x\n", cr0);
    outb(0x3FF, 0x5A);                      /* UART scratch register */
    printf("privileged out/in: %02x\n", inb(0x3FF));
    __asm__ volatile("cli");
    /* sensitive: no trap */
    printf("sensitive pushf after cli: IF=%u\n", (read_eflags() >> 9) & 1);
    write_eflags(read_eflags() | EFL_IOPL);
    printf("sensitive popf IOPL=3, pushf: IOPL=%u\n", (read_eflags() >> 12) & 3);
    write_eflags(read_eflags() & ~EFL_IOPL);
    struct dtr g, i;
    __asm__ volatile("sgdt %0" : "=m"(g));
    __asm__ volatile("sidt %0" : "=m"(i));
    printf("sensitive sgdt: base=%08x limit=%04x\n", g.base, g.limit);
    printf("sensitive sidt: base=%08x limit=%04x\n", i.base, i.limit);
    u32 ldt = 0xFFFFFFFF, tr = 0xFFFFFFFF, msw = 0xFFFFFFFF;
    __asm__ volatile("sldt %0" : "=r"(ldt));
    __asm__ volatile("str %0" : "=r"(tr));
    __asm__ volatile("smsw %0" : "=r"(msw));
    printf("sensitive sldt: %04x\n", ldt & 0xFFFF);
    printf("sensitive str: %04x\n", tr & 0xFFFF);
    printf("sensitive smsw: %04x\n", msw & 0xFFFF);
    u32 cs, ss, pushed;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    __asm__ volatile("mov %%ss, %0" : "=r"(ss));
    __asm__ volatile("push %%cs; pop %0" : "=r"(pushed));
    printf("sensitive mov from cs: RPL=%u\n", cs & 3);
    printf("sensitive mov from ss: RPL=%u\n", ss & 3);
    printf("sensitive push cs: RPL=%u\n", pushed & 3);
    u32 ok, rights = 0, limit = 0;
    __asm__ volatile("lar %2, %1; setz %b0; movzbl %b0, %0" : "=&q"(ok), "+r"(rights) : "r"(KCODE) : "cc");
    printf("sensitive lar kernel cs: ZF=%u\n", ok);
    __asm__ volatile("lsl %2, %1; setz %b0; movzbl %b0, %0" : "=&q"(ok), "+r"(limit) : "r"(KDATA) : "cc");
    printf("sensitive lsl kernel ds: ZF=%u\n", ok);
    __asm__ volatile("verr %w1; setz %b0; movzbl %b0, %0" : "=&q"(ok) : "r"(KDATA) : "cc");
    printf("sensitive verr kernel ds: ZF=%u\n", ok);
    __asm__ volatile("verw %w1; setz %b0; movzbl %b0, %0" : "=&q"(ok) : "r"(KDATA) : "cc");
    printf("sensitive verw kernel ds: ZF=%u\n", ok);
    __asm__ volatile("sti");
    return 0;
}
