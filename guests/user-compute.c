/* user-compute: the compute guest's kernels (sieve, CRC-32, quicksort,
 * matrix multiply, recursion) as a static i386 Linux program, so the same
 * code runs natively, under qemu-i386 and under popek. The optional
 * argument repeats the work (the execution benchmark uses it). */
#include "urt/urt.h"
#include "compute.c"

int main(int argc, char **argv, char **envp)
{
    (void)envp;
    u32 rounds = 0;
    for (const char *s = argc > 1 ? argv[1] : "1"; *s >= '0' && *s <= '9'; s++)
        rounds = rounds * 10 + (u32)(*s - '0');
    for (u32 r = 0; r < rounds; r++)
        kmain(0, 0);
    return 0;
}
