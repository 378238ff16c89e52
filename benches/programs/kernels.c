/* kernels: a compute-bound static i386 Linux program for the direct
 * execution comparison (benches/perf_report.py builds it with
 * `gcc -m32 -static -O2`): integer hashing, qsort through glibc, a
 * double-precision (x87) sum, string functions, a switch-based bytecode
 * interpreter (indirect branches), a binary search tree (linked nodes,
 * pointer chasing), deep recursion (call/ret), and three in the manner of
 * CoreMark's workloads (written here): a bitwise CRC-16 over a buffer, a
 * small integer matrix multiply, and a character-class state machine over
 * text. Prints a checksum per kernel so native, qemu-i386 and popek runs
 * can be compared. Arguments: repetitions, and optionally one kernel's
 * name (hash, sort, float, string, bytecode, tree, recursion, crc,
 * matrix, state). */
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

/* An unbalanced binary search tree of pseudo-random keys in a node pool:
 * inserts, then lookups that chase pointers. */
struct node { unsigned key; struct node *left, *right; };

static unsigned tree_kernel(unsigned n)
{
    static struct node pool[1 << 16];
    unsigned used = 0, x = 12345, found = 0;
    struct node *root = 0;
    for (unsigned i = 0; i < n && used < sizeof pool / sizeof pool[0]; i++) {
        x = x * 1103515245u + 12345u;
        struct node **at = &root;
        while (*at)
            at = x < (*at)->key ? &(*at)->left : &(*at)->right;
        pool[used] = (struct node){x, 0, 0};
        *at = &pool[used++];
    }
    x = 12345;
    for (unsigned r = 0; r < 8; r++) {
        for (unsigned i = 0; i < n; i++) {
            x = x * 1103515245u + 12345u;
            unsigned key = r & 1 ? x ^ 1 : x;
            const struct node *p = root;
            while (p && p->key != key)
                p = key < p->key ? p->left : p->right;
            found += p != 0;
        }
        x = 12345;
    }
    return found;
}

/* Deep recursion: every call and return a real CALL and RET. */
__attribute__((noinline)) static unsigned ackermann(unsigned m, unsigned n)
{
    if (m == 0)
        return n + 1;
    if (n == 0)
        return ackermann(m - 1, 1);
    return ackermann(m - 1, ackermann(m, n - 1));
}

static unsigned recursion_kernel(unsigned n)
{
    unsigned sum = 0;
    for (unsigned i = 0; i < n; i++)
        sum += ackermann(2, 1000 + i % 3);
    return sum;
}

/* CRC-16 (polynomial 0xA001, reflected), one bit at a time: shifts and
 * data-dependent branches. */
static unsigned short crc16_byte(unsigned char b, unsigned short crc)
{
    for (int i = 0; i < 8; i++) {
        unsigned x = (b ^ crc) & 1;
        b >>= 1;
        crc >>= 1;
        if (x)
            crc ^= 0xA001;
    }
    return crc;
}

static unsigned crc_kernel(unsigned n)
{
    static unsigned char buf[4096];
    unsigned x = 99;
    for (unsigned i = 0; i < sizeof buf; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = x >> 16;
    }
    unsigned short crc = 0;
    for (unsigned r = 0; r < n; r++)
        for (unsigned i = 0; i < sizeof buf; i++)
            crc = crc16_byte(buf[i], crc);
    return crc;
}

/* 24x24 16-bit matrices: C = A * B with 32-bit sums, then a pass that
 * folds each element's middle bits into a checksum. */
#define MN 24
static unsigned matrix_kernel(unsigned n)
{
    static short a[MN][MN], b[MN][MN];
    static int c[MN][MN];
    unsigned sum = 0;
    for (unsigned i = 0; i < MN; i++)
        for (unsigned j = 0; j < MN; j++) {
            a[i][j] = (short)(i * 31 + j * 7 - 100);
            b[i][j] = (short)(j * 13 - i * 5 + 3);
        }
    for (unsigned r = 0; r < n; r++) {
        for (unsigned i = 0; i < MN; i++)
            for (unsigned j = 0; j < MN; j++) {
                int s = 0;
                for (unsigned k = 0; k < MN; k++)
                    s += a[i][k] * b[k][j];
                c[i][j] = s;
            }
        for (unsigned i = 0; i < MN; i++)
            for (unsigned j = 0; j < MN; j++)
                sum += (c[i][j] >> 2) & 0xFFF;
        a[r % MN][(r / MN) % MN]++;
    }
    return sum;
}

/* A state machine that classifies comma-separated tokens of a text as
 * integers, decimals, scientific numbers or invalid, one character at a
 * time through a switch on the state. */
static unsigned state_kernel(unsigned n)
{
    static const char text[] =
        "5012,1234,-874,+122,35.54,-0.91,.1e9,3.2e-2,1e+3,x1,--5,7.,"
        "0,88a,-.5,6e,9E9,123456,4.4.4,+,1.0e1,-2,77777,3e3e,";
    enum { START, INT, SIGN, FRAC, DOT, EXP, ESIGN, EINT, BAD };
    unsigned counts[BAD + 1] = {0}, moves = 0;
    for (unsigned r = 0; r < n; r++) {
        int st = START;
        for (const char *p = text; *p; p++) {
            char ch = *p;
            int next = st;
            if (ch == ',') {
                counts[st]++;
                st = START;
                continue;
            }
            switch (st) {
            case START:
                next = ch >= '0' && ch <= '9' ? INT : ch == '+' || ch == '-' ? SIGN
                     : ch == '.' ? DOT : BAD;
                break;
            case SIGN:
                next = ch >= '0' && ch <= '9' ? INT : ch == '.' ? DOT : BAD;
                break;
            case INT:
                next = ch >= '0' && ch <= '9' ? INT : ch == '.' ? FRAC
                     : ch == 'e' || ch == 'E' ? EXP : BAD;
                break;
            case DOT:
                next = ch >= '0' && ch <= '9' ? FRAC : BAD;
                break;
            case FRAC:
                next = ch >= '0' && ch <= '9' ? FRAC : ch == 'e' || ch == 'E' ? EXP : BAD;
                break;
            case EXP:
                next = ch >= '0' && ch <= '9' ? EINT : ch == '+' || ch == '-' ? ESIGN : BAD;
                break;
            case ESIGN:
            case EINT:
                next = ch >= '0' && ch <= '9' ? EINT : BAD;
                break;
            default:
                break;
            }
            moves += next != st;
            st = next;
        }
    }
    unsigned sum = moves;
    for (int i = 0; i <= BAD; i++)
        sum = sum * 33 + counts[i];
    return sum;
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
        RUN(tree, "%u", tree_kernel(60000));
        RUN(recursion, "%u", recursion_kernel(20));
        RUN(crc, "%04x", crc_kernel(200));
        RUN(matrix, "%u", matrix_kernel(2000));
        RUN(state, "%u", state_kernel(100000));
    }
    return 0;
}
