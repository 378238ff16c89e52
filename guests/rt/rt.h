/* The tiny runtime of popek's bundled guests: serial output, exit through
 * isa-debug-exit, an IDT with C handlers, and a GDT with ring-3 segments
 * and a TSS. Bare metal, 32-bit protected mode, no libc. */
#ifndef POPEK_RT_H
#define POPEK_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
typedef unsigned int size_t;

#define EFL_CF 0x001
#define EFL_PF 0x004
#define EFL_AF 0x010
#define EFL_ZF 0x040
#define EFL_SF 0x080
#define EFL_TF 0x100
#define EFL_IF 0x200
#define EFL_DF 0x400
#define EFL_OF 0x800
#define EFL_IOPL 0x3000

#define KCODE 0x08
#define KDATA 0x10
#define UCODE 0x1B
#define UDATA 0x23
#define TSS_SEL 0x28

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
    u32 mods_count, mods_addr, syms[4], mmap_length, mmap_addr;
};

/* The register frame isr.S builds. */
struct frame {
    u32 ds, edi, esi, ebp, esp_at_pusha, ebx, edx, ecx, eax;
    u32 vector, error, eip, cs, eflags;
    u32 user_esp, user_ss;          /* only when coming from ring 3 */
};

typedef void (*handler_t)(struct frame *f);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 read_eflags(void) { u32 f; __asm__ volatile("pushfl; popl %0" : "=r"(f)); return f; }
static inline void write_eflags(u32 f) { __asm__ volatile("pushl %0; popfl" : : "r"(f) : "cc", "memory"); }
static inline u32 read_cr0(void) { u32 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u32 read_cr2(void) { u32 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }

void putchar(char c);
void puts(const char *s);
void printf(const char *fmt, ...);
void exit(int code) __attribute__((noreturn));
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* IDT: install a C handler for a vector that has a stub in isr.S
 * (0-19, 0x20-0x2F for remapped device interrupts, 0x30, 0x40); dpl 3
 * lets ring 3 use INT n on it. */
void idt_set(int vector, handler_t h, int dpl, int trap_gate);
/* Install a raw gate. */
void idt_raw(int vector, u32 offset, u16 selector, u8 type_attr);
void idt_load(void);
/* GDT with kernel, user and TSS descriptors; loads TR. */
void gdt_init(void);
void gdt_set(int index, u32 base, u32 limit, u8 access, u8 flags);
void gdt_load(void);
/* Initialize the 8259A pair: master vectors at `master`, slave at
 * `slave` (cascaded on IR2, edge-triggered, 8086 mode), and unmask the
 * IRQs whose bits are set in `unmask` (bit 2 is the cascade). */
void pic_init(u8 master, u8 slave, u16 unmask);
/* Run fn at ring 3 on its own stack with the given EFLAGS until it calls
 * user_return(); returns then. */
void run_user(void (*fn)(void), u32 eflags);
void user_return(void);

/* The number after `key` (e.g. "passes=") in the Multiboot command line,
 * or `dflt` when the key is not there. */
u32 cmdline_number(struct mb_info *mbi, const char *key, u32 dflt);

int kmain(u32 magic, struct mb_info *mbi);

#endif
