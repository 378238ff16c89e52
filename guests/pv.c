/* pv: a guest that knows it runs on popek. It finds the paravirtual
 * interface by CPUID leaf 0x40000000 (docs/hypercalls.md), checks what
 * the calls answer against what it knows by itself (the Multiboot memory
 * size, a clock that advances, an unknown call, #UD at ring 3), prints
 * through the console hypercall, and runs a balloon driver: it touches a
 * pool of every page above 8 MiB, then inflates and deflates the balloon
 * to the target the host sets (--balloon, the monitor's `balloon`, popek
 * host's balloon=), from the pool's top down, checking after each change
 * that the pages it kept still hold their pattern and that the pages the
 * host gave back read as zeros. The command line's wait=S keeps it
 * serving the balloon until S seconds pass without a new target (default
 * 0: only the target at boot); it then deflates everything and ends.
 * Without popek's interface (QEMU) it says so and ends. */
#include "rt/rt.h"

enum {
    HC_INFO, HC_NOP, HC_CONSOLE_WRITE, HC_CLOCK, HC_BALLOON_TARGET,
    HC_BALLOON_INFLATE, HC_BALLOON_DEFLATE, HC_BALLOON_NOTIFY,
};

#define POOL_BASE (8u << 20)
#define BALLOON_IRQ 5
#define BATCH 1024

struct hc { u32 eax, ebx, ecx, edx; };

static struct hc hypercall(u32 nr, u32 a, u32 b)
{
    struct hc r;
    __asm__ volatile("vmcall"
                     : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
                     : "a"(nr), "b"(a), "c"(b), "d"(0)
                     : "memory");
    return r;
}

static int failures;

static void check(int ok, const char *what)
{
    printf("pv: %s: %s\n", what, ok ? "ok" : "WRONG");
    failures += !ok;
}

/* ---- ring 3: VMCALL must not reach the VMM ---- */
static volatile u32 ud_seen, ud_eip;
static volatile u32 user_result;

static void on_ud(struct frame *f)
{
    ud_seen++;
    ud_eip = f->eip;
    f->eip += 3;                        /* over 0F 01 C1 */
}

static void user_vmcall(void)
{
    u32 a = HC_INFO;
    __asm__ volatile("vmcall" : "+a"(a) : : "ebx", "ecx", "edx", "memory");
    user_result = a;
    user_return();
}

/* ---- the balloon driver ---- */
static u32 pool_first, pool_pages;      /* pool: [pool_first, +pool_pages) */
static u32 held;                        /* the top `held` pages are in the balloon */
static u32 list[BATCH];
static volatile u32 notified, ticks;
static u32 deflated_nonzero, kept_wrong;

static volatile u32 *page(u32 pfn) { return (volatile u32 *)(pfn << 12); }

static void fill(u32 pfn)
{
    page(pfn)[0] = pfn ^ 0x5A5A0000u;
    page(pfn)[1023] = ~pfn;
}

static int intact(u32 pfn)
{
    return page(pfn)[0] == (pfn ^ 0x5A5A0000u) && page(pfn)[1023] == ~pfn;
}

/* Move the balloon to `target` pages: inflate takes pages from the top of
 * the pool, deflate gives them back (refilled after checking they read
 * as zeros). */
static void resize(u32 target)
{
    if (target > pool_pages)
        target = pool_pages;
    while (held < target) {
        u32 n = target - held < BATCH ? target - held : BATCH;
        for (u32 i = 0; i < n; i++)
            list[i] = pool_first + pool_pages - 1 - (held + i);
        struct hc r = hypercall(HC_BALLOON_INFLATE, (u32)list, n);
        if (r.eax != n) {
            printf("pv: inflate of %u pages answered %d\n", n, (s32)r.eax);
            failures++;
            return;
        }
        held += n;
    }
    while (held > target) {
        u32 n = held - target < BATCH ? held - target : BATCH;
        for (u32 i = 0; i < n; i++)
            list[i] = pool_first + pool_pages - held + i;
        struct hc r = hypercall(HC_BALLOON_DEFLATE, (u32)list, n);
        if (r.eax != n) {
            printf("pv: deflate of %u pages answered %d\n", n, (s32)r.eax);
            failures++;
            return;
        }
        for (u32 i = 0; i < n; i++) {
            if (page(list[i])[0] != 0 || page(list[i])[1023] != 0)
                deflated_nonzero++;
            fill(list[i]);
        }
        held -= n;
    }
    for (u32 p = pool_first; p < pool_first + pool_pages - held; p++)
        kept_wrong += !intact(p);
    struct hc t = hypercall(HC_BALLOON_TARGET, 0, 0);
    printf("pv: balloon holds %u pages (%u MiB), host counts %u; kept pages intact: %s, "
           "returned pages zero: %s\n",
           held, held >> 8, t.ebx, kept_wrong ? "NO" : "yes", deflated_nonzero ? "NO" : "yes");
    failures += kept_wrong != 0 || deflated_nonzero != 0 || t.ebx != held;
    kept_wrong = deflated_nonzero = 0;
}

static void balloon_irq(struct frame *f)
{
    (void)f;
    notified++;
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
    gdt_init();
    idt_set(6, on_ud, 0, 0);
    idt_set(0x20, timer_irq, 0, 0);
    idt_set(0x20 + BALLOON_IRQ, balloon_irq, 0, 0);
    idt_load();

    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000000));
    char sig[13];
    memcpy(sig, &b, 4);
    memcpy(sig + 4, &c, 4);
    memcpy(sig + 8, &d, 4);
    sig[12] = 0;
    if (memcmp(sig, "PopekPopekVM", 12) != 0 || a < 0x40000001) {
        printf("pv: no popek paravirtual interface here (CPUID 0x40000000 EAX %x)\n", a);
        return 0;
    }
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000001));
    printf("pv: found %s, interface version %u\n", sig, a);

    struct hc info = hypercall(HC_INFO, 0, 0);
    u32 mb_pages = (mbi->mem_upper + 1024) / 4;
    printf("pv: INFO: version %u, %u pages of RAM, calls 0-%u\n", info.eax, info.ebx, info.ecx);
    check(info.eax == a, "INFO's version is CPUID's");
    check((mbi->flags & 1) && info.ebx == mb_pages, "RAM size agrees with the Multiboot header");
    check(hypercall(HC_NOP, 0, 0).eax == 0, "NOP answers 0");
    check((s32)hypercall(info.ecx + 1, 0, 0).eax == -38, "an unknown call answers -ENOSYS");
    check((s32)hypercall(HC_BALLOON_NOTIFY, 16, 0).eax == -22, "IRQ line 16 is refused");

    static const char msg[] = "pv: this line came through the console hypercall\n";
    struct hc w = hypercall(HC_CONSOLE_WRITE, (u32)msg, sizeof(msg) - 1);
    check(w.eax == sizeof(msg) - 1, "the console call wrote every byte");
    check((s32)hypercall(HC_CONSOLE_WRITE, info.ebx << 12, 1).eax == -14,
          "a console write beyond RAM answers -EFAULT");

    struct hc t0 = hypercall(HC_CLOCK, 0, 0);
    for (volatile u32 i = 0; i < 100000; i++)
        ;
    struct hc t1 = hypercall(HC_CLOCK, 0, 0);
    u64 c0 = (u64)t0.edx << 32 | t0.eax, c1 = (u64)t1.edx << 32 | t1.eax;
    check(c1 > c0, "the clock advances");

    run_user(user_vmcall, 0);
    check(ud_seen == 1 && user_result == HC_INFO, "VMCALL at ring 3 raises #UD");

    /* The pool: every page from 8 MiB to the end of RAM, touched. */
    pool_first = POOL_BASE >> 12;
    pool_pages = info.ebx > pool_first ? info.ebx - pool_first : 0;
    for (u32 p = pool_first; p < pool_first + pool_pages; p++)
        fill(p);
    printf("pv: pool of %u pages (%u MiB) filled\n", pool_pages, pool_pages >> 8);

    pic_init(0x20, 0x28, 1 << 0 | 1 << BALLOON_IRQ);
    check(hypercall(HC_BALLOON_NOTIFY, BALLOON_IRQ, 0).eax == 0, "balloon interrupt on IRQ 5");
    u32 wait = cmdline_number(mbi, "wait=", 0);
    outb(0x43, 0x34);                   /* PIT channel 0, mode 2, 100 Hz */
    outb(0x40, 11932 & 0xFF);
    outb(0x40, 11932 >> 8);
    u32 last = hypercall(HC_BALLOON_TARGET, 0, 0).eax;
    printf("pv: boot target %u pages\n", last);
    resize(last);
    u32 since = 0;
    __asm__ volatile("sti");
    while (wait) {
        __asm__ volatile("cli");
        while (!notified && ticks - since < wait * 100)
            __asm__ volatile("sti; hlt; cli");
        u32 n = notified;
        notified = 0;
        __asm__ volatile("sti");
        if (!n)
            break;
        u32 target = hypercall(HC_BALLOON_TARGET, 0, 0).eax;
        if (target == last)
            continue;
        printf("pv: new target %u pages\n", target);
        last = target;
        resize(target);
        since = ticks;
    }
    if (held)
        resize(0);
    printf("pv: %s\n", failures ? "FAILED" : "done");
    return failures ? 3 : 0;
}
