/* kernels: a compute-bound static i386 Linux program for the direct
 * execution comparison (benches/perf_report.py builds it with
 * `gcc -m32 -static -O2`): integer hashing, qsort through glibc, a
 * double-precision (x87) sum, string functions and a switch-based bytecode
 * interpreter (indirect branches). Prints a checksum per kernel so native,
 * qemu-i386 and popek runs can be compared. Arguments: repetitions, and
 * optionally one kernel's name (hash, sort, float, string, bytecode). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned hash_kernel(unsigned n)
{
    unsigned h = 2166136261u, x = 12345;
    for (unsigned i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        h = (h ^ (x & 0xFF)) * 16777619u;
        h = (h << 7 | h >> 25) + i;
    }
    return h;
}

static int cmp(const void *a, const void *b)
{
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return (x > y) - (x < y);
}

static unsigned sort_kernel(unsigned n)
{
    unsigned *v = malloc(n * sizeof *v), x = 7, sum = 0;
    for (unsigned i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        v[i] = x >> 3;
    }
    qsort(v, n, sizeof *v, cmp);
    for (unsigned i = 0; i < n; i++)
        sum = sum * 31 + v[i];
    free(v);
    return sum;
}

static double float_kernel(unsigned n)
{
    double s = 0, t = 1;
    for (unsigned i = 1; i <= n; i++) {
        s += 1.0 / ((double)i * i);
        t = t * 0.999999 + s / (i + 1.0);
    }
    return s + t;
}

static unsigned string_kernel(unsigned n)
{
    char a[256], b[256];
    unsigned sum = 0;
    for (unsigned i = 0; i < n; i++) {
        memset(a, 'a' + i % 26, 200);
        a[100 + i % 50] = 0;
        strcpy(b, a);
        strcat(b, "xyz");
        sum += strlen(b) + (unsigned)(strchr(b, 'x') - b) + (memcmp(a, b, 64) == 0);
    }
    return sum;
}

/* A tiny stack machine; the switch compiles to a jump table. */
static unsigned bytecode_kernel(unsigned n)
{
    enum { PUSH, ADD, MUL, DUP, SWAP, DROP, JNZ, DEC, HALT };
    static const unsigned char prog[] = {
        PUSH, 1, PUSH, 0,                 /* acc seed, counter placeholder */
        SWAP, DUP, MUL, PUSH, 3, ADD, SWAP, DEC, DUP, JNZ, 4, DROP, HALT,
    };
    unsigned total = 0;
    for (unsigned r = 0; r < n; r++) {
        unsigned st[16], sp = 0, pc = 0;
        for (;;) {
            unsigned char op = prog[pc++];
            switch (op) {
            case PUSH: st[sp++] = prog[pc++]; if (pc == 4) st[sp - 1] = 40 + r % 7; break;
            case ADD: sp--; st[sp - 1] += st[sp]; break;
            case MUL: sp--; st[sp - 1] *= st[sp]; break;
            case DUP: st[sp] = st[sp - 1]; sp++; break;
            case SWAP: { unsigned t = st[sp - 1]; st[sp - 1] = st[sp - 2]; st[sp - 2] = t; break; }
            case DROP: sp--; break;
            case JNZ: { unsigned t = prog[pc++]; if (st[--sp]) pc = t; break; }
            case DEC: st[sp - 1]--; break;
            default: goto done;
            }
        }
    done:
        total += st[0];
    }
    return total;
}

int main(int argc, char **argv)
{
    unsigned reps = argc > 1 ? (unsigned)atoi(argv[1]) : 1;
    const char *only = argc > 2 ? argv[2] : "";
#define RUN(name, fmt, call) \
    if (!*only || !strcmp(only, #name)) printf(#name " " fmt "\n", call)
    for (unsigned r = 0; r < reps; r++) {
        RUN(hash, "%08x", hash_kernel(3000000));
        RUN(sort, "%08x", sort_kernel(200000));
        RUN(float, "%.12f", float_kernel(2000000));
        RUN(string, "%u", string_kernel(100000));
        RUN(bytecode, "%u", bytecode_kernel(100000));
    }
    return 0;
}
