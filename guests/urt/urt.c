#include "urt.h"

static char outbuf[4096];
static u32 outlen;
static u32 *auxv;

void flush(void)
{
    u32 done = 0;
    while (done < outlen) {
        long n = sys3(NR_write, 1, outbuf + done, outlen - done);
        if (n <= 0)
            break;
        done += n;
    }
    outlen = 0;
}

void putchar(char c)
{
    if (outlen == sizeof(outbuf))
        flush();
    outbuf[outlen++] = c;
}

void exit(int code)
{
    flush();
    for (;;)
        sys1(NR_exit_group, code);
}

u32 getauxval(u32 type)
{
    for (u32 *a = auxv; a && a[0]; a += 2)
        if (a[0] == type)
            return a[1];
    return 0;
}

void urt_start(u32 *sp)
{
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    char **envp = argv + argc + 1;
    char **e = envp;
    while (*e)
        e++;
    auxv = (u32 *)(e + 1);
    exit(main(argc, argv, envp));
}
