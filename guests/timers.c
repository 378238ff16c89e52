/* timers: the PC's clocks as a kernel programs them. The 8254's read-back
 * status and counter latch, channel 2 gated through port 0x61 the way
 * Linux calibrates the TSC, the MC146818's registers and CMOS memory
 * sizes, and its periodic interrupt on IRQ8 (through the slave 8259A),
 * counted over a window the PIT's IRQ0 measures. Every line states a fact
 * that does not depend on how fast the host is, so QEMU and popek print
 * the same. */
#include "rt/rt.h"

static volatile u32 pit_ticks, rtc_irqs, rtc_c_flags;

static u8 cmos(u8 i)
{
    outb(0x70, i);
    return inb(0x71);
}

static void cmos_write(u8 i, u8 v)
{
    outb(0x70, i);
    outb(0x71, v);
}

static void timer_irq(struct frame *f)
{
    (void)f;
    pit_ticks++;
    outb(0x20, 0x20);
}

static void rtc_irq(struct frame *f)
{
    (void)f;
    rtc_irqs++;
    rtc_c_flags |= cmos(0x0C);   /* acknowledge: read register C */
    outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

static const char *yn(int c) { return c ? "yes" : "no"; }

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    idt_set(0x20, timer_irq, 0, 0);
    idt_set(0x28, rtc_irq, 0, 0);
    idt_load();
    pic_init(0x20, 0x28, 1 << 0 | 1 << 2 | 1 << 8);

    /* 8254 channel 0: mode 2, count 1193 (1 kHz); read-back status. */
    outb(0x43, 0x34);
    outb(0x40, 1193 & 0xFF);
    outb(0x40, 1193 >> 8);
    outb(0x43, 0xE2);           /* read-back: status of channel 0 only */
    u8 status = inb(0x40);
    printf("pit: channel 0 status mode/access bits: %x\n", status & 0x3F);
    /* Counter latch: two latched reads 100 us apart go down. */
    outb(0x43, 0x00);
    u16 c1 = inb(0x40);
    c1 |= inb(0x40) << 8;
    for (volatile int i = 0; i < 2000; i++)
        ;
    outb(0x43, 0x00);
    u16 c2 = inb(0x40);
    c2 |= inb(0x40) << 8;
    printf("pit: latched counts within the count: %s\n", yn(c1 <= 1193 && c2 <= 1193));

    /* Channel 2 through port 0x61, as Linux's pit_calibrate_tsc does:
     * gate high, speaker off, mode 0 with a 10 ms count; OUT2 (0x61 bit
     * 5) is low until the count runs out. */
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);
    outb(0x43, 0xB0);
    outb(0x42, 11931 & 0xFF);
    outb(0x42, 11931 >> 8);
    int low_at_start = !(inb(0x61) & 0x20);
    u32 polls = 0;
    while (!(inb(0x61) & 0x20) && polls < 100000000)
        polls++;
    printf("pit: OUT2 low after the count is loaded: %s, high when it runs out: %s\n",
           yn(low_at_start), yn((inb(0x61) & 0x20) != 0));
    printf("pit: port 0x61 reads the gate back: %s\n", yn(inb(0x61) & 1));

    /* MC146818: registers A, B, D as the firmware leaves them; CMOS. */
    printf("rtc: register A %x, register B %x, register D %x\n",
           cmos(0x0A) & 0x7F, cmos(0x0B), cmos(0x0D));
    printf("rtc: CMOS base memory %u KiB, extended memory %u KiB, above 16 MiB %u x 64 KiB\n",
           cmos(0x15) | cmos(0x16) << 8, cmos(0x17) | cmos(0x18) << 8,
           cmos(0x34) | cmos(0x35) << 8);
    u8 sec = cmos(0x00), min = cmos(0x02), hour = cmos(0x04);
    printf("rtc: time in BCD: %s\n",
           yn((sec & 0xF) < 10 && sec < 0x60 && (min & 0xF) < 10 && min < 0x60 &&
              (hour & 0xF) < 10 && hour < 0x24));

    /* The periodic interrupt: rate 6 (1024 Hz), PIE on, for 100 PIT ticks. */
    cmos_write(0x0A, 0x26);
    cmos_write(0x0B, cmos(0x0B) | 0x40);
    (void)cmos(0x0C);
    __asm__ volatile("sti");
    while (pit_ticks < 100)
        __asm__ volatile("hlt");
    __asm__ volatile("cli");
    cmos_write(0x0B, cmos(0x0B) & ~0x40);
    printf("rtc: periodic interrupts over 100 ms: %s, register C showed IRQF and PF: %s\n",
           yn(rtc_irqs >= 20), yn((rtc_c_flags & 0xC0) == 0xC0));
    exit(0);
}
