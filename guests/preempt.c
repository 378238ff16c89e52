/* preempt: a tiny preemptive kernel. Two ring-3 tasks that never yield
 * are switched by the timer (PIT channel 0 in mode 2 on IRQ0, through the
 * 8259A pair remapped to 0x20-0x2F); the tasks make system calls through
 * an INT gate with DPL 3; the kernel's output goes out through the
 * 16550's THRE interrupt (IRQ4), not by polling. What it prints depends
 * only on what happened, never on when, so QEMU and popek (bt, interp,
 * lockstep) must print the same bytes. */
#include "rt/rt.h"

#define TICKS 20            /* timer interrupts before the kernel stops */
#define PIT_COUNT 1193      /* 1000 Hz */
#define COM1 0x3F8

/* ---- interrupt-driven serial output -------------------------------- */

static volatile char txbuf[1024];
static volatile u32 tx_head, tx_tail;   /* head: next to send; tail: next free */
static volatile int tx_busy;            /* a byte is in the transmitter */
static volatile u32 thre_irqs;

static void kputc(char c)
{
    u32 f = read_eflags();
    __asm__ volatile("cli");
    if (!tx_busy) {
        tx_busy = 1;
        outb(COM1, c);
    } else {
        txbuf[tx_tail++ % sizeof(txbuf)] = c;
    }
    write_eflags(f);
}

static void kputs(const char *s)
{
    while (*s)
        kputc(*s++);
}

static void kputu(u32 v)
{
    char d[11];
    int n = 0;
    do {
        d[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n)
        kputc(d[--n]);
}

static void com1_irq(struct frame *f)
{
    (void)f;
    /* IIR: 0x02 (bit 0 clear) = THR empty. */
    while (!((inb(COM1 + 2)) & 1)) {
        thre_irqs++;
        if (tx_head != tx_tail)
            outb(COM1, txbuf[tx_head++ % sizeof(txbuf)]);
        else
            tx_busy = 0;
    }
    outb(0x20, 0x20);   /* EOI */
}

/* ---- tasks ------------------------------------------------------------ */

struct task {
    struct frame saved;
    volatile u32 counter;
    volatile u32 syscalls;
};

static struct task tasks[2];
static int current;
static u8 stack_b[4096] __attribute__((aligned(16)));
static volatile u32 ticks, switches;

/* The system call: EAX = task id; returns the task's syscall count. */
static void syscall(struct frame *f)
{
    struct task *t = &tasks[f->eax & 1];
    f->eax = ++t->syscalls;
}

static inline u32 sys_count(u32 id)
{
    u32 r;
    __asm__ volatile("int $0x40" : "=a"(r) : "a"(id) : "memory");
    return r;
}

static void task_body(u32 id)
{
    /* A system call on the first pass and every 4096th after: whether a
     * task that ran made one does not depend on how fast it ran (the
     * timer is the host's clock, and a loaded host gives a slice fewer
     * instructions). */
    for (;;) {
        tasks[id].counter++;
        if ((tasks[id].counter & 0xFFF) == 1)
            sys_count(id);
    }
}

static void task_a(void) { task_body(0); }
static void task_b(void) { task_body(1); }

static void finish(void) __attribute__((noreturn));

static void timer_irq(struct frame *f)
{
    ticks++;
    outb(0x20, 0x20);   /* EOI */
    if (ticks == TICKS)
        finish();
    /* Switch: save this task's frame, resume the other's. */
    tasks[current].saved = *f;
    current ^= 1;
    *f = tasks[current].saved;
    switches++;
}

static void finish(void)
{
    outb(0x21, 0xFF & ~(1 << 4)); /* mask everything but COM1 */
    __asm__ volatile("sti");
    kputs("preempt: ");
    kputu(TICKS);
    kputs(" timer interrupts, ");
    kputu(switches);
    kputs(" task switches\n");
    kputs("task A ran: ");
    kputs(tasks[0].counter ? "yes" : "no");
    kputs(", made system calls: ");
    kputs(tasks[0].syscalls ? "yes" : "no");
    kputs("\ntask B ran: ");
    kputs(tasks[1].counter ? "yes" : "no");
    kputs(", made system calls: ");
    kputs(tasks[1].syscalls ? "yes" : "no");
    kputs("\nserial output driven by THRE interrupts: ");
    kputs(thre_irqs > 0 ? "yes" : "no");
    kputs("\n");
    /* Wait, halted, until the last byte is out. STI's interrupt shadow
     * makes "sti; hlt" atomic: the last THRE interrupt cannot slip in
     * between the test and the HLT. */
    __asm__ volatile("cli");
    while (tx_busy)
        __asm__ volatile("sti; hlt; cli");
    exit(0);
}

/* ---- setup ------------------------------------------------------------ */

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    gdt_init();
    idt_set(0x20, timer_irq, 0, 0);
    idt_set(0x24, com1_irq, 0, 0);
    idt_set(0x40, syscall, 3, 0);
    idt_load();
    pic_init(0x20, 0x28, 1 << 0 | 1 << 4);   /* IRQ0 and IRQ4 */
    /* COM1: 8N1, THRE interrupt, OUT2 to connect IRQ4. */
    outb(COM1 + 3, 0x03);
    outb(COM1 + 4, 0x08);
    outb(COM1 + 1, 0x02);
    (void)inb(COM1 + 2);    /* the THRE interrupt the enable raised */
    /* PIT channel 0, mode 2, 1000 Hz. */
    outb(0x43, 0x34);
    outb(0x40, PIT_COUNT & 0xFF);
    outb(0x40, PIT_COUNT >> 8);
    /* Task B starts where the first switch resumes it. */
    tasks[1].saved.eip = (u32)task_b;
    tasks[1].saved.cs = UCODE;
    tasks[1].saved.eflags = EFL_IF | 2;
    tasks[1].saved.user_esp = (u32)(stack_b + sizeof(stack_b));
    tasks[1].saved.user_ss = UDATA;
    tasks[1].saved.ds = UDATA;
    run_user(task_a, EFL_IF);
    puts("preempt: task A returned\n");
    exit(1);
}
