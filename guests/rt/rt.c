#include "rt.h"

#define COM1 0x3F8
#define DEBUG_EXIT 0xF4

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);       /* no interrupts */
    outb(COM1 + 3, 0x80);       /* DLAB */
    outb(COM1 + 0, 0x01);       /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);       /* 8N1 */
    outb(COM1 + 2, 0xC7);       /* FIFOs */
    outb(COM1 + 4, 0x03);       /* DTR, RTS */
}

void putchar(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (u8)c);
}

void exit(int code)
{
    outb(DEBUG_EXIT, (u8)code);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- descriptor tables ---- */

static u64 gdt[8];
static struct { u16 limit; u32 base; } __attribute__((packed)) gdtr, idtr;
static u64 idt[256];
static handler_t handlers[256];
static u32 tss[26];
static u8 kernel_stack[8192] __attribute__((aligned(16)));
static u8 user_stack[8192] __attribute__((aligned(16)));

void gdt_set(int i, u32 base, u32 limit, u8 access, u8 flags)
{
    gdt[i] = (u64)(limit & 0xFFFF) | ((u64)(base & 0xFFFFFF) << 16) | ((u64)access << 40) |
             ((u64)((limit >> 16) & 0xF) << 48) | ((u64)(flags & 0xF) << 52) |
             ((u64)(base >> 24) << 56);
}

void gdt_load(void)
{
    gdtr.limit = sizeof(gdt) - 1;
    gdtr.base = (u32)gdt;
    __asm__ volatile("lgdt %0" : : "m"(gdtr));
}

void gdt_init(void)
{
    gdt_set(0, 0, 0, 0, 0);
    gdt_set(1, 0, 0xFFFFF, 0x9A, 0xC);   /* 0x08 ring-0 code */
    gdt_set(2, 0, 0xFFFFF, 0x92, 0xC);   /* 0x10 ring-0 data */
    gdt_set(3, 0, 0xFFFFF, 0xFA, 0xC);   /* 0x1B ring-3 code */
    gdt_set(4, 0, 0xFFFFF, 0xF2, 0xC);   /* 0x23 ring-3 data */
    memset(tss, 0, sizeof(tss));
    tss[1] = (u32)(kernel_stack + sizeof(kernel_stack));  /* esp0 */
    tss[2] = KDATA;                                       /* ss0 */
    tss[25] = sizeof(tss) << 16;                          /* no I/O bitmap */
    gdt_set(5, (u32)tss, sizeof(tss) - 1, 0x89, 0x0);     /* 0x28 TSS */
    gdt_load();
    __asm__ volatile(
        "ljmp $0x08, $1f\n1:\n"
        "mov $0x10, %%ax\nmov %%ax, %%ds\nmov %%ax, %%es\nmov %%ax, %%ss\n"
        "mov %%ax, %%fs\nmov %%ax, %%gs\n"
        "mov $0x28, %%ax\nltr %%ax"
        : : : "eax", "memory");
}

void idt_raw(int v, u32 off, u16 sel, u8 type_attr)
{
    idt[v] = (u64)(off & 0xFFFF) | ((u64)sel << 16) | ((u64)type_attr << 40) |
             ((u64)(off >> 16) << 48);
}

extern char isr0[], isr1[], isr2[], isr3[], isr4[], isr5[], isr6[], isr7[], isr8[], isr9[],
    isr10[], isr11[], isr12[], isr13[], isr14[], isr15[], isr16[], isr17[], isr18[], isr19[],
    isr32[], isr33[], isr34[], isr35[], isr36[], isr37[], isr38[], isr39[], isr40[], isr41[],
    isr42[], isr43[], isr44[], isr45[], isr46[], isr47[], isr48[], isr64[];
static char *stubs[20] = {isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9,
                          isr10, isr11, isr12, isr13, isr14, isr15, isr16, isr17, isr18, isr19};
static char *irq_stubs[16] = {isr32, isr33, isr34, isr35, isr36, isr37, isr38, isr39,
                              isr40, isr41, isr42, isr43, isr44, isr45, isr46, isr47};

void idt_set(int v, handler_t h, int dpl, int trap_gate)
{
    char *stub = v < 20               ? stubs[v]
                 : v >= 32 && v < 48 ? irq_stubs[v - 32]
                 : v == 0x30         ? isr48
                                     : isr64;
    handlers[v] = h;
    idt_raw(v, (u32)stub, KCODE, 0x80 | (dpl << 5) | (trap_gate ? 0xF : 0xE));
}

void idt_load(void)
{
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

static void unexpected(struct frame *f)
{
    printf("unexpected exception %u error %x at %x\n", f->vector, f->error, f->eip);
    exit(0x7F);
}

void isr_dispatch(struct frame *f)
{
    handler_t h = handlers[f->vector];
    if (h)
        h(f);
    else
        unexpected(f);
}

extern void enter_user(u32 eip, u32 esp, u32 eflags);
extern void resume_kernel(void) __attribute__((noreturn));

static void int30(struct frame *f)
{
    if (f->eax == 0)
        resume_kernel();
}

void run_user(void (*fn)(void), u32 eflags)
{
    idt_set(0x30, int30, 3, 0);
    enter_user((u32)fn, (u32)(user_stack + sizeof(user_stack)), eflags | 2);
}

void user_return(void)
{
    __asm__ volatile("int $0x30" : : "a"(0));
}

u32 cmdline_number(struct mb_info *mbi, const char *key, u32 dflt)
{
    if (!(mbi->flags & 4))
        return dflt;
    for (const char *s = (const char *)mbi->cmdline; *s; s++) {
        u32 i = 0;
        while (key[i] && s[i] == key[i])
            i++;
        if (key[i])
            continue;
        u32 n = 0;
        for (s += i; *s >= '0' && *s <= '9'; s++)
            n = n * 10 + (*s - '0');
        return n;
    }
    return dflt;
}

void rt_start(u32 magic, struct mb_info *mbi)
{
    serial_init();
    /* Mask both PICs: the BIOS under QEMU leaves the timer running, and
     * popek has no PIC. Guests that enable interrupts see none on either. */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    exit(kmain(magic, mbi));
}

void pic_init(u8 master, u8 slave, u16 unmask)
{
    outb(0x20, 0x11);   /* ICW1: edge, cascade, ICW4 */
    outb(0x21, master); /* ICW2 */
    outb(0x21, 0x04);   /* ICW3: slave on IR2 */
    outb(0x21, 0x01);   /* ICW4: 8086 mode */
    outb(0xA0, 0x11);
    outb(0xA1, slave);
    outb(0xA1, 0x02);   /* ICW3: slave ID 2 */
    outb(0xA1, 0x01);
    outb(0xA1, ~(unmask >> 8) & 0xFF);
    outb(0x21, ~unmask & 0xFF);
}
