/* clone: a guest for snapshots and clones. It fills 4 MiB of RAM with a
 * pattern, says "ready", then answers each line that arrives on the serial
 * line (received-data interrupts): the line in capitals, and a checksum of
 * the 4 MiB after the line was written into it at a place the line's hash
 * picks (so each answer depends on every line before it, and each line
 * dirties a page). "quit", or 5 seconds without input (timer at 1 kHz),
 * ends it with the checksum of all of it. Machines resumed from one
 * snapshot of it diverge by what they are told. */
#include "rt/rt.h"

#define COM1 0x3F8
#define AREA ((volatile u32 *)0x00400000)
#define WORDS (4u << 20) / 4

/* Bytes from the serial line: the interrupt handler appends, the main
 * loop takes lines out. */
static volatile char ring[4096];
static volatile u32 head, tail, lines, ticks, idle;
static char line[128];

static void com1_irq(struct frame *f)
{
    (void)f;
    while (inb(COM1 + 5) & 1) {          /* LSR.DR */
        char c = inb(COM1);
        if (head - tail < sizeof(ring)) {
            ring[head++ % sizeof(ring)] = c;
            if (c == '\n')
                lines++;
        }
    }
    outb(0x20, 0x20);
}

static void timer_irq(struct frame *f)
{
    (void)f;
    ticks++;
    idle++;
    outb(0x20, 0x20);
}

static u32 checksum(void)
{
    u32 s = 0;
    for (u32 i = 0; i < WORDS; i++)
        s = (s << 5 | s >> 27) ^ AREA[i];
    return s;
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
    u32 x = 12345;
    for (u32 i = 0; i < WORDS; i++) {
        x = x * 1103515245u + 12345u;
        AREA[i] = x;
    }
    printf("clone: 4 MiB filled, checksum %x\n", checksum());
    outb(COM1 + 3, 0x03);               /* 8N1 */
    outb(COM1 + 4, 0x08);               /* OUT2: IRQ4 connected */
    while (inb(COM1 + 5) & 1)           /* discard what came too early */
        (void)inb(COM1);
    outb(COM1 + 1, 0x01);               /* received-data interrupt */
    outb(0x43, 0x34);                   /* PIT channel 0, mode 2, 1 kHz */
    outb(0x40, 1193 & 0xFF);
    outb(0x40, 1193 >> 8);
    printf("clone: ready\n");
    for (u32 n = 1;; n++) {
        __asm__ volatile("cli");
        while (!lines && idle < 5000)
            __asm__ volatile("sti; hlt; cli");
        __asm__ volatile("sti");
        if (!lines) {
            printf("clone: no input for 5 s\n");
            break;
        }
        u32 len = 0;
        for (;;) {
            char c = ring[tail++ % sizeof(ring)];
            if (len < sizeof(line))
                line[len++] = c;
            if (c == '\n')
                break;
        }
        __asm__ volatile("cli");
        lines--;
        __asm__ volatile("sti");
        u32 h = 2166136261u;
        for (u32 i = 0; i < len; i++)
            h = (h ^ (u8)line[i]) * 16777619u;
        if (len == 5 && line[0] == 'q' && line[1] == 'u' && line[2] == 'i' && line[3] == 't')
            break;
        printf("clone: line %u: ", n);
        for (u32 i = 0; i + 1 < len && line[i] != '\n'; i++) {
            char c = line[i];
            if (c >= 'a' && c <= 'z')
                c -= 32;
            putchar(c);
            AREA[(h % (WORDS - 256)) + i] = h ^ (u8)c;
        }
        printf(", checksum %x\n", checksum());
        idle = 0;
    }
    printf("clone: done, checksum %x\n", checksum());
    exit(0);
}
