/* paging: a tiny Unix-like kernel that lives on its page tables. Ring-3
 * processes, each in its own address space (a page directory of its own,
 * switched with MOV CR3), fork with copy-on-write, exec a different
 * program at the same linear address, demand-zero pages, a "swap" that
 * takes one data page away from the yielding process at every yield and
 * brings it back on the next touch, a clock scan that reads and clears
 * accessed and dirty bits (with INVLPG), and a page shared by every
 * process through a shared page table, mapped twice (an alias). The
 * kernel itself is mapped identically in every address space: 0-4 MiB
 * with 4 KiB pages, 4-16 MiB with 4 MiB (PSE) pages.
 *
 * Scheduling is voluntary (system calls only), so what it prints depends
 * only on the instructions executed: QEMU and popek (bt, interp,
 * lockstep) must print the same bytes. It is also the page-table-heavy
 * benchmark of docs/performance.md (issue 16: forkwait and PTE updates,
 * after Adams and Agesen, ASPLOS 2006). */
#include "rt/rt.h"

#define PTE_P 0x001
#define PTE_W 0x002
#define PTE_U 0x004
#define PTE_A 0x020
#define PTE_D 0x040
#define PTE_PS 0x080
#define PTE_COW 0x200   /* software bit: copy on write */
#define PTE_SWAP 0x400  /* software bit (not present): swap slot in 12-31 */

#define UTEXT 0x40000000u       /* program text, one page, read-only */
#define UDATA_VA 0x40400000u    /* data pages, private */
#define USHARED 0x40800000u     /* a page shared by all, mapped twice */
#define ULIB (USHARED + 0x4000) /* a library page, in the shared table */
#define NPAGES 12               /* data pages per process */
#define MAXPROC 16
#define NSLOTS 256
#define FRAMES_BASE 0x800000u   /* page frames: 8-16 MiB */
#define NFRAMES 2048

/* ---- the user programs (position-independent, copied to UTEXT) -------- */

/* System calls (INT 0x40, EAX = number): 1 yield, 2 exit(EBX), 3 fork
 * (child gets 0), 4 exec(EBX = program, ECX = seed), 6 seed, 7 swap the
 * library: ULIB, in the page table every address space shares, maps the
 * other version (code remapped behind a direct call from another page and
 * an indirect one, in every address space at once, while the calling pages
 * stay as they were); 8 a private library: this process's directory entry
 * for the shared region points at a copy of the shared table whose ULIB
 * maps the version not in use. */
__asm__(
    ".text\n"
    ".global prog_a, prog_a_end, prog_b, prog_b_end\n"
    /* A: ROUNDS_A rounds over every data page; forks twice: at round 64
     * the child execs B, at round 192 the child goes on as A with another
     * seed (its pages shared copy-on-write with the parent's). */
    "prog_a:\n"
    "    mov $6, %eax\n"
    "    int $0x40\n"
    "    mov %eax, %esi\n"
    "    xor %edi, %edi\n"
    "    xor %ebp, %ebp\n"
    "1:  mov $12, %ecx\n"
    "    mov $0x40400000, %edx\n"
    "    mov %edi, %ebx\n"
    "    and $1023, %ebx\n"
    "2:  mov (%edx,%ebx,4), %eax\n"
    "    add %esi, %eax\n"
    "    add %ecx, %eax\n"
    "    mov %eax, (%edx,%ebx,4)\n"
    "    add $4096, %edx\n"
    "    loop 2b\n"
    "    incl 0x40800000\n"
    "    add 0x40801000, %ebp\n"        /* the alias of the shared page */
    "    inc %edi\n"
    "    test $3, %edi\n"
    "    jnz 3f\n"
    "    mov $1, %eax\n"
    "    int $0x40\n"
    "3:  cmp $64, %edi\n"
    "    je 5f\n"
    "    cmp $192, %edi\n"
    "    jne 4f\n"
    "    mov $3, %eax\n"
    "    int $0x40\n"
    "    test %eax, %eax\n"
    "    jnz 4f\n"
    "    add $0x100, %esi\n"            /* the child: another seed */
    "    jmp 4f\n"
    "5:  mov $3, %eax\n"
    "    int $0x40\n"
    "    test %eax, %eax\n"
    "    jnz 4f\n"
    "    lea 7(%esi), %ecx\n"           /* the child: exec B */
    "    mov $1, %ebx\n"
    "    mov $4, %eax\n"
    "    int $0x40\n"
    "4:  cmp $768, %edi\n"
    "    jb 1b\n"
    "    mov $0x40400000, %edx\n"
    "    mov %ebp, %ebx\n"
    "    mov $12288, %ecx\n"
    "6:  add (%edx), %ebx\n"
    "    rol $1, %ebx\n"
    "    add $4, %edx\n"
    "    loop 6b\n"
    "    mov $2, %eax\n"
    "    int $0x40\n"
    "prog_a_end:\n"
    /* B: other code at the same address; rotates and spreads, and calls
     * the library page (directly, with the displacement it has at UTEXT,
     * and through a register); forks at round 16, and the child (which
     * shares the text, and so its translations' links) takes a private
     * library at once. */
    "prog_b:\n"
    "    mov $6, %eax\n"
    "    int $0x40\n"
    "    mov %eax, %esi\n"
    "    xor %edi, %edi\n"
    "    xor %ebp, %ebp\n"
    "1:  mov $0x40400000, %edx\n"
    "    mov $12, %ecx\n"
    "    mov %edi, %ebx\n"
    "    and $1015, %ebx\n"
    "2:  mov (%edx), %eax\n"
    "    rol $3, %eax\n"
    "    xor %esi, %eax\n"
    "    add %edi, %eax\n"
    "    mov %eax, (%edx)\n"
    "    mov %eax, 8(%edx,%ebx,4)\n"
    "    add $4096, %edx\n"
    "    loop 2b\n"
    "    incl 0x40801000\n"             /* the shared page, other alias */
    "    mov %edi, %eax\n"
    "    .byte 0xe8\n"                  /* call ULIB */
    "    .long 0x40804000 - (0x40000000 + (7f - prog_b))\n"
    "7:  add %eax, %ebp\n"
    "    mov %ebp, %eax\n"
    "    mov $0x40804000, %ecx\n"
    "    call *%ecx\n"
    "    xor %eax, %ebp\n"
    "    inc %edi\n"
    "    test $3, %edi\n"
    "    jnz 3f\n"
    "    mov $7, %eax\n"
    "    int $0x40\n"
    "    test $7, %edi\n"
    "    jnz 3f\n"
    "    mov $1, %eax\n"
    "    int $0x40\n"
    "3:  cmp $16, %edi\n"             /* fork: the child shares this text */
    "    jne 8f\n"
    "    mov $3, %eax\n"
    "    int $0x40\n"
    "    test %eax, %eax\n"
    "    jnz 8f\n"
    "    add $0x100, %esi\n"
    "    mov $8, %eax\n"                /* the child: a private library */
    "    int $0x40\n"
    "8:  cmp $512, %edi\n"
    "    jb 1b\n"
    "    mov $0x40400000, %edx\n"
    "    mov %ebp, %ebx\n"
    "    mov $12288, %ecx\n"
    "4:  add (%edx), %ebx\n"
    "    rol $5, %ebx\n"
    "    add $4, %edx\n"
    "    loop 4b\n"
    "    mov $2, %eax\n"
    "    int $0x40\n"
    "prog_b_end:\n"
    /* The library's two versions. */
    ".global lib_v0, lib_v1, lib_end\n"
    "lib_v0:\n"
    "    lea 0x11(%eax,%eax,2), %eax\n"
    "    ret\n"
    "lib_v1:\n"
    "    lea 0x2f(%eax,%eax,4), %eax\n"
    "    ret\n"
    "lib_end:\n");

extern const u8 prog_a[], prog_a_end[], prog_b[], prog_b_end[];
extern const u8 lib_v0[], lib_v1[], lib_end[];

/* ---- physical memory ---------------------------------------------------- */

static u32 kernel_pt[1024] __attribute__((aligned(4096)));
static u8 refs[NFRAMES];
static u32 free_list[NFRAMES], free_count, next_frame = FRAMES_BASE;
static u8 swap_space[NSLOTS][4096] __attribute__((aligned(4096)));
static u8 slot_used[NSLOTS];
static u32 shared_pt, shared_frame, lib_frame[2], lib;

static void die(const char *what)
{
    printf("paging: %s\n", what);
    exit(2);
}

static u32 *frame_ptr(u32 pa) { return (u32 *)pa; } /* identity-mapped */

static u32 alloc_frame(void)
{
    u32 pa;
    if (free_count)
        pa = free_list[--free_count];
    else if (next_frame < FRAMES_BASE + NFRAMES * 4096) {
        pa = next_frame;
        next_frame += 4096;
    } else
        die("out of page frames");
    refs[(pa - FRAMES_BASE) >> 12] = 1;
    return pa;
}

static void put_frame(u32 pa)
{
    if (--refs[(pa - FRAMES_BASE) >> 12] == 0)
        free_list[free_count++] = pa;
}

static u32 zeroed_frame(void)
{
    u32 pa = alloc_frame();
    memset(frame_ptr(pa), 0, 4096);
    return pa;
}

static inline void invlpg(u32 lin) { __asm__ volatile("invlpg (%0)" : : "r"(lin) : "memory"); }
static inline void load_cr3(u32 pd) { __asm__ volatile("mov %0, %%cr3" : : "r"(pd) : "memory"); }

/* ---- processes ------------------------------------------------------------ */

struct proc {
    int live;
    u32 pd;
    struct frame saved;
    u32 seed, result;
    int prog, parent;
    u32 cow, zero, swapins;
};

static struct proc procs[MAXPROC];
static int current, nprocs;
static u32 switches, yields, swapouts, accessed_seen, dirty_seen, forks, execs;

static u32 *pt_of(u32 pd, u32 lin)
{
    u32 pde = frame_ptr(pd)[lin >> 22];
    return pde & PTE_P ? frame_ptr(pde & ~0xFFFu) : 0;
}

static u32 *pte_of(u32 pd, u32 lin)
{
    u32 *pt = pt_of(pd, lin);
    return pt ? &pt[(lin >> 12) & 1023] : 0;
}

/* A fresh address space: the kernel's mappings (shared with every other
 * space), empty text and data page tables, the shared page table. */
static u32 new_space(void)
{
    u32 pd = zeroed_frame();
    u32 *d = frame_ptr(pd);
    d[0] = (u32)kernel_pt | PTE_P | PTE_W;
    for (u32 i = 1; i < 4; i++)
        d[i] = (i << 22) | PTE_P | PTE_W | PTE_PS;
    d[UTEXT >> 22] = zeroed_frame() | PTE_P | PTE_W | PTE_U;
    d[UDATA_VA >> 22] = zeroed_frame() | PTE_P | PTE_W | PTE_U;
    d[USHARED >> 22] = shared_pt | PTE_P | PTE_W | PTE_U;
    return pd;
}

static void load_program(struct proc *p, int prog)
{
    const u8 *from = prog ? prog_b : prog_a;
    const u8 *to = prog ? prog_b_end : prog_a_end;
    u32 *pte = pte_of(p->pd, UTEXT);
    if (*pte & PTE_P)
        put_frame(*pte & ~0xFFFu);
    u32 f = zeroed_frame();
    memcpy(frame_ptr(f), from, to - from);
    *pte = f | PTE_P | PTE_U;       /* read-only */
    p->prog = prog;
}

static void drop_data(struct proc *p, int current_space)
{
    u32 *pt = pt_of(p->pd, UDATA_VA);
    for (u32 i = 0; i < NPAGES; i++) {
        if (pt[i] & PTE_P)
            put_frame(pt[i] & ~0xFFFu);
        else if (pt[i] & PTE_SWAP)
            slot_used[pt[i] >> 12] = 0;
        pt[i] = 0;
        if (current_space)
            invlpg(UDATA_VA + i * 4096);
    }
}

static void free_space(struct proc *p)
{
    drop_data(p, 0);
    u32 *t = pte_of(p->pd, UTEXT);
    put_frame(*t & ~0xFFFu);
    u32 *d = frame_ptr(p->pd);
    put_frame(d[UTEXT >> 22] & ~0xFFFu);
    if ((d[USHARED >> 22] & ~0xFFFu) != shared_pt)
        put_frame(d[USHARED >> 22] & ~0xFFFu);
    put_frame(d[UDATA_VA >> 22] & ~0xFFFu);
    put_frame(p->pd);
}

static int alloc_slot(void)
{
    for (int i = 0; i < NSLOTS; i++)
        if (!slot_used[i]) {
            slot_used[i] = 1;
            return i;
        }
    die("out of swap");
    return -1;
}

/* fork: copy the page tables; private writable pages become read-only
 * and copy-on-write in both; swapped pages are copied to a new slot. */
static int fork(struct proc *parent)
{
    int c = 0;
    while (c < MAXPROC && procs[c].live)
        c++;
    if (c == MAXPROC)
        die("too many processes");
    struct proc *child = &procs[c];
    memset(child, 0, sizeof(*child));
    child->live = 1;
    child->pd = new_space();
    child->prog = parent->prog;
    child->seed = parent->seed + 0x100; /* what the child will use */
    child->parent = parent - procs;
    u32 *pt = pt_of(parent->pd, UTEXT), *ct = pt_of(child->pd, UTEXT);
    ct[0] = pt[0];
    refs[((pt[0] & ~0xFFFu) - FRAMES_BASE) >> 12]++;
    pt = pt_of(parent->pd, UDATA_VA);
    ct = pt_of(child->pd, UDATA_VA);
    for (u32 i = 0; i < NPAGES; i++) {
        if (pt[i] & PTE_P) {
            if (pt[i] & PTE_W) {
                pt[i] = (pt[i] & ~PTE_W) | PTE_COW;
                invlpg(UDATA_VA + i * 4096);
            }
            ct[i] = pt[i];
            refs[((pt[i] & ~0xFFFu) - FRAMES_BASE) >> 12]++;
        } else if (pt[i] & PTE_SWAP) {
            int s = alloc_slot();
            memcpy(swap_space[s], swap_space[pt[i] >> 12], 4096);
            ct[i] = (u32)s << 12 | PTE_SWAP;
        }
    }
    child->saved = parent->saved;
    child->saved.eax = 0;
    nprocs++;
    forks++;
    return c;
}

/* ---- scheduling and system calls ----------------------------------------- */

static void finish(void) __attribute__((noreturn));

static void switch_to_next(struct frame *f)
{
    int n = current;
    for (int i = 0; i < MAXPROC; i++) {
        n = (n + 1) % MAXPROC;
        if (procs[n].live)
            break;
    }
    if (!procs[n].live)
        finish();
    if (n != current || procs[n].pd != procs[current].pd) {
        load_cr3(procs[n].pd);
        switches++;
    }
    current = n;
    *f = procs[n].saved;
}

/* At every yield: the clock reads and clears the accessed and dirty bits
 * of the process's data pages, and one page (a different one each time)
 * goes to swap if nobody else maps it. */
static void clock_scan(struct proc *p)
{
    u32 *pt = pt_of(p->pd, UDATA_VA);
    for (u32 i = 0; i < NPAGES; i++) {
        if (!(pt[i] & PTE_P))
            continue;
        accessed_seen += !!(pt[i] & PTE_A);
        dirty_seen += !!(pt[i] & PTE_D);
        pt[i] &= ~(PTE_A | PTE_D);
        invlpg(UDATA_VA + i * 4096);
    }
    u32 i = yields % NPAGES;
    u32 fa = pt[i] & ~0xFFFu;
    if ((pt[i] & PTE_P) && !(pt[i] & PTE_COW) && refs[(fa - FRAMES_BASE) >> 12] == 1) {
        int s = alloc_slot();
        memcpy(swap_space[s], frame_ptr(fa), 4096);
        put_frame(fa);
        pt[i] = (u32)s << 12 | PTE_SWAP;
        invlpg(UDATA_VA + i * 4096);
        swapouts++;
    }
}

static void syscall(struct frame *f)
{
    struct proc *p = &procs[current];
    switch (f->eax) {
    case 1: /* yield */
        yields++;
        clock_scan(p);
        p->saved = *f;
        switch_to_next(f);
        break;
    case 2: /* exit */
        p->result = f->ebx;
        p->live = 0;
        printf("process %u (%s, parent %u, seed %x) exits: checksum %x, "
               "copy-on-write %u, demand-zero %u, swap-ins %u\n",
               current, p->prog ? "B" : "A", p->parent, p->seed, p->result, p->cow, p->zero,
               p->swapins);
        free_space(p);
        nprocs--;
        switch_to_next(f);
        break;
    case 3: /* fork */
        p->saved = *f;
        f->eax = fork(p);
        break;
    case 4: /* exec */
        execs++;
        drop_data(p, 1);
        load_program(p, f->ebx);
        invlpg(UTEXT);
        p->seed = f->ecx;
        f->eip = UTEXT;
        break;
    case 6: /* the seed */
        f->eax = p->seed;
        break;
    case 8: { /* a private library: a copy of the shared table */
        u32 *d = frame_ptr(p->pd);
        if ((d[USHARED >> 22] & ~0xFFFu) != shared_pt)
            die("private library twice");
        u32 t = zeroed_frame();
        memcpy(frame_ptr(t), frame_ptr(shared_pt), 4096);
        frame_ptr(t)[(ULIB >> 12) & 1023] = lib_frame[lib ^ 1] | PTE_P | PTE_U;
        d[USHARED >> 22] = t | PTE_P | PTE_W | PTE_U;
        invlpg(ULIB); /* also drops the cached directory entry (SDM 4.10.4.1) */
        break;
    }
    case 7: /* swap the library (for every process) */
        lib ^= 1;
        frame_ptr(shared_pt)[(ULIB >> 12) & 1023] = lib_frame[lib] | PTE_P | PTE_U;
        invlpg(ULIB);
        break;
    default:
        die("bad system call");
    }
}

static void page_fault(struct frame *f)
{
    u32 cr2 = read_cr2();
    struct proc *p = &procs[current];
    u32 *pte = (cr2 >> 22) == (UDATA_VA >> 22) && ((cr2 >> 12) & 1023) < NPAGES ? pte_of(p->pd, cr2) : 0;
    if (!pte || !(f->error & 4)) {
        printf("paging: unexpected #PF at %x, cr2 %x, error %x\n", f->eip, cr2, f->error);
        exit(3);
    }
    u32 e = *pte;
    if ((e & PTE_P) && (e & PTE_COW) && (f->error & 2)) {
        u32 fa = e & ~0xFFFu;
        if (refs[(fa - FRAMES_BASE) >> 12] == 1) {
            *pte = (e & ~PTE_COW) | PTE_W;
        } else {
            u32 n = alloc_frame();
            memcpy(frame_ptr(n), frame_ptr(fa), 4096);
            put_frame(fa);
            *pte = n | PTE_P | PTE_W | PTE_U;
        }
        invlpg(cr2);
        p->cow++;
    } else if (!(e & PTE_P) && (e & PTE_SWAP)) {
        u32 n = alloc_frame();
        memcpy(frame_ptr(n), swap_space[e >> 12], 4096);
        slot_used[e >> 12] = 0;
        *pte = n | PTE_P | PTE_W | PTE_U; /* not present before: no INVLPG */
        p->swapins++;
    } else if (e == 0) {
        *pte = zeroed_frame() | PTE_P | PTE_W | PTE_U;
        p->zero++;
    } else {
        printf("paging: #PF on a mapped page at %x, cr2 %x, error %x, pte %x\n", f->eip, cr2,
               f->error, e);
        exit(3);
    }
}

static u32 kernel_pd[1024] __attribute__((aligned(4096)));

static void finish(void)
{
    load_cr3((u32)kernel_pd);
    u32 *shared = frame_ptr(shared_frame);
    printf("paging: %u forks, %u execs, %u yields, %u address-space switches\n", forks, execs,
           yields, switches);
    printf("swap-outs %u, accessed bits seen %u, dirty bits seen %u\n", swapouts, accessed_seen,
           dirty_seen);
    printf("shared counter (incremented through two aliases): %u\n", shared[0]);
    u32 leaked = (next_frame - FRAMES_BASE) / 4096 - free_count;
    printf("frames in use at the end: %u (the shared page, its table, the library's two versions)\n", leaked);
    exit(0);
}

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1));
    if (!(d & (1 << 3)))
        die("no PSE");
    gdt_init();
    idt_set(14, page_fault, 0, 0);
    idt_set(0x40, syscall, 3, 0);
    idt_load();
    for (u32 i = 0; i < 1024; i++)
        kernel_pt[i] = (i << 12) | PTE_P | PTE_W;
    kernel_pd[0] = (u32)kernel_pt | PTE_P | PTE_W;
    for (u32 i = 1; i < 4; i++)
        kernel_pd[i] = (i << 22) | PTE_P | PTE_W | PTE_PS;
    shared_pt = zeroed_frame();
    shared_frame = zeroed_frame();
    frame_ptr(shared_pt)[0] = shared_frame | PTE_P | PTE_W | PTE_U;
    frame_ptr(shared_pt)[1] = shared_frame | PTE_P | PTE_W | PTE_U;
    lib_frame[0] = zeroed_frame();
    lib_frame[1] = zeroed_frame();
    memcpy(frame_ptr(lib_frame[0]), lib_v0, lib_v1 - lib_v0);
    memcpy(frame_ptr(lib_frame[1]), lib_v1, lib_end - lib_v1);
    frame_ptr(shared_pt)[(ULIB >> 12) & 1023] = lib_frame[0] | PTE_P | PTE_U;
    for (int i = 0; i < 3; i++) {
        struct proc *p = &procs[i];
        p->live = 1;
        p->pd = new_space();
        p->seed = 0x1000 * (i + 1);
        p->parent = i;
        load_program(p, 0);
        p->saved.eip = UTEXT;
        p->saved.cs = UCODE;
        p->saved.eflags = 2;
        p->saved.user_esp = USHARED + 0x2000;
        p->saved.user_ss = UDATA;
        p->saved.ds = UDATA;
        nprocs++;
    }
    u32 cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4 | 0x10));
    load_cr3(procs[0].pd);
    __asm__ volatile("mov %%cr0, %%eax; or $0x80010000, %%eax; mov %%eax, %%cr0" : : : "eax", "memory");
    extern void enter_user(u32 eip, u32 esp, u32 eflags);
    enter_user(UTEXT, USHARED + 0x2000, 2);
    die("returned to the kernel");
    return 1;
}
