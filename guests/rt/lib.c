/* Shared by both runtimes of popek's bundled guests (bare metal and
 * Linux): formatted output over the runtime's putchar, and the memory and
 * string functions gcc may call. */
#include "rt.h"

void puts(const char *s)
{
    while (*s)
        putchar(*s++);
}

static void put_uint(u32 v, u32 base, int width, char pad, int upper)
{
    char buf[32];
    int n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    do {
        buf[n++] = digits[v % base];
        v /= base;
    } while (v);
    while (n < width)
        buf[n++] = pad;
    while (n)
        putchar(buf[--n]);
}

void printf(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putchar(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        switch (*fmt) {
        case 'd': {
            int v = __builtin_va_arg(ap, int);
            if (v < 0) {
                putchar('-');
                put_uint(-(u32)v, 10, width ? width - 1 : 0, pad, 0);
            } else {
                put_uint(v, 10, width, pad, 0);
            }
            break;
        }
        case 'u': put_uint(__builtin_va_arg(ap, u32), 10, width, pad, 0); break;
        case 'x': put_uint(__builtin_va_arg(ap, u32), 16, width, pad, 0); break;
        case 'X': put_uint(__builtin_va_arg(ap, u32), 16, width, pad, 1); break;
        case 'c': putchar((char)__builtin_va_arg(ap, int)); break;
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            puts(s ? s : "(null)");
            break;
        }
        case '%': putchar('%'); break;
        default: putchar('?'); break;
        }
    }
    __builtin_va_end(ap);
}

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p - *q;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}
