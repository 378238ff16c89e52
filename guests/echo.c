/* echo: reads the serial line through received-data interrupts (IRQ4)
 * until a newline or about one second of timer ticks (IRQ0 at 1 kHz),
 * then prints what it got in capitals. Bytes that arrived before it was
 * ready are discarded (QEMU's firmware may have read some already); it
 * says "ready" when it listens. With no input it prints "0 bytes"; with
 * input sent after "ready", to QEMU's -serial stdio or to popek's stdin,
 * it prints the same line. */
#include "rt/rt.h"

#define COM1 0x3F8

static volatile char buf[256];
static volatile u32 n, ticks;

static void com1_irq(struct frame *f)
{
    (void)f;
    while (inb(COM1 + 5) & 1) {          /* LSR.DR */
        char c = inb(COM1);
        if (n < sizeof(buf))
            buf[n++] = c;
    }
    outb(0x20, 0x20);
}

static void timer_irq(struct frame *f)
{
    (void)f;
    ticks++;
    outb(0x20, 0x20);
}

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    idt_set(0x20, timer_irq, 0, 0);
    idt_set(0x24, com1_irq, 0, 0);
    idt_load();
    pic_init(0x20, 0x28, 1 << 0 | 1 << 4);   /* IRQ0 and IRQ4 */
    outb(COM1 + 3, 0x03);               /* 8N1 */
    outb(COM1 + 4, 0x08);               /* OUT2: IRQ4 connected */
    while (inb(COM1 + 5) & 1)           /* discard what came too early */
        (void)inb(COM1);
    outb(COM1 + 1, 0x01);               /* received-data interrupt */
    printf("echo: ready\n");
    outb(0x43, 0x34);                   /* PIT channel 0, mode 2, 1 kHz */
    outb(0x40, 1193 & 0xFF);
    outb(0x40, 1193 >> 8);
    __asm__ volatile("cli");
    while (ticks < 1000 && !(n > 0 && buf[n - 1] == '\n'))
        __asm__ volatile("sti; hlt; cli");
    printf("echo: %u bytes:", n);
    for (u32 i = 0; i < n; i++) {
        char c = buf[i];
        if (c >= 'a' && c <= 'z')
            c -= 32;
        if (c != '\n')
            putchar(c);
    }
    printf("\n");
    exit(0);
}
