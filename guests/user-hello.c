/* user-hello: a static i386 Linux program on popek's own runtime (urt/):
 * prints its arguments and what the kernel handed over (auxiliary vector,
 * uname), then grows the heap with brk and maps, protects and unmaps
 * anonymous memory, checking the contents. Every line is the same under
 * Linux itself (--engine native), qemu-i386 and popek. */
#include "urt/urt.h"

#define AT_PHDR 3
#define AT_PHENT 4
#define AT_PHNUM 5
#define AT_PAGESZ 6
#define AT_ENTRY 9
#define AT_UID 11
#define AT_EUID 12
#define AT_SECURE 23
#define AT_RANDOM 25
#define AT_EXECFN 31

extern char _start[];

static const char *yes(int ok) { return ok ? "yes" : "WRONG"; }

int main(int argc, char **argv, char **envp)
{
    printf("hello from a Linux process at ring 3\n");
    printf("argc = %d\n", argc);
    for (int i = 1; i < argc; i++)
        printf("argv[%d] = \"%s\"\n", i, argv[i]);
    int envc = 0;
    while (envp[envc])
        envc++;
    printf("environment present: %s\n", yes(envc >= 0 && envp[envc] == 0));

    /* The auxiliary vector (System V i386 ABI; Linux's binfmt_elf). */
    printf("AT_PAGESZ = %u\n", getauxval(AT_PAGESZ));
    printf("AT_PHENT = %u, AT_PHNUM = %u\n", getauxval(AT_PHENT), getauxval(AT_PHNUM));
    printf("AT_ENTRY is _start: %s\n", yes(getauxval(AT_ENTRY) == (u32)_start));
    printf("AT_PHDR = %x\n", getauxval(AT_PHDR));
    printf("AT_UID == AT_EUID: %s, AT_SECURE = %u\n",
           yes(getauxval(AT_UID) == getauxval(AT_EUID)), getauxval(AT_SECURE));
    const char *execfn = (const char *)getauxval(AT_EXECFN);
    printf("AT_EXECFN is argv[0]: %s\n",
           yes(execfn && strlen(execfn) == strlen(argv[0]) &&
               memcmp(execfn, argv[0], strlen(execfn)) == 0));
    printf("AT_RANDOM present: %s\n", yes(getauxval(AT_RANDOM) != 0));

    /* uname: the fields are 65 bytes each; sysname comes first. */
    static char uts[6 * 65];
    long r = sys1(NR_uname, uts);
    printf("uname: %d, sysname \"%s\"\n", (int)r, uts);

    /* brk: grow the heap by 64 KiB and use it. */
    u32 base = (u32)sys1(NR_brk, 0);
    u32 top = (u32)sys1(NR_brk, base + 65536);
    printf("brk grew by 64 KiB: %s\n", yes(top == base + 65536));
    u32 sum = 0;
    for (u32 *p = (u32 *)base; p < (u32 *)top; p++)
        *p = (u32)p ^ 0x5A5A5A5A;
    for (u32 *p = (u32 *)base; p < (u32 *)top; p++)
        sum += *p == ((u32)p ^ 0x5A5A5A5A);
    printf("heap words intact: %u of %u\n", sum, 65536 / 4);

    /* mmap2 anonymous memory: zero-filled, writable, then read-only. */
    u32 len = 1 << 20;
    long m = syscall6(NR_mmap2, 0, len, 3 /* PROT_READ|PROT_WRITE */,
                      0x22 /* MAP_PRIVATE|MAP_ANONYMOUS */, -1, 0);
    int zero = 1;
    for (u32 i = 0; i < len; i += 4096)
        zero &= ((u8 *)m)[i] == 0;
    printf("mmap2 1 MiB: %s, zero-filled: %s\n", yes((u32)m < 0xFFFFF000u && (m & 4095) == 0), yes(zero));
    for (u32 i = 0; i < len; i += 4096)
        ((u8 *)m)[i] = (u8)(i >> 12);
    long p = sys3(NR_mprotect, m, len, 1 /* PROT_READ */);
    u32 pages = 0;
    for (u32 i = 0; i < len; i += 4096)
        pages += ((u8 *)m)[i] == (u8)(i >> 12);
    printf("mprotect read-only: %d, pages intact: %u\n", (int)p, pages);
    printf("munmap: %d\n", (int)sys3(NR_munmap, m, len, 0));
    return 0;
}
