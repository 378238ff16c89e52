/* The Linux runtime of popek's bundled user-mode guests: the same printf,
 * puts, exit and memory functions as the bare-metal runtime (rt/rt.h), on
 * top of int 0x80 system calls instead of a UART and isa-debug-exit.
 * Static i386 ELF, no libc; programs define main(). */
#ifndef POPEK_URT_H
#define POPEK_URT_H
#include "../rt/rt.h"

/* i386 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl). */
#define NR_exit 1
#define NR_read 3
#define NR_write 4
#define NR_open 5
#define NR_close 6
#define NR_getpid 20
#define NR_brk 45
#define NR_munmap 91
#define NR_uname 122
#define NR_mprotect 125
#define NR_mmap2 192
#define NR_exit_group 252

long syscall6(long nr, long a, long b, long c, long d, long e, long f);
#define sys1(n, a) syscall6(n, (long)(a), 0, 0, 0, 0, 0)
#define sys3(n, a, b, c) syscall6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

/* The auxiliary vector entry of a type, 0 when absent. */
u32 getauxval(u32 type);
/* Write everything printf has buffered to fd 1. */
void flush(void);

int main(int argc, char **argv, char **envp);

#endif
