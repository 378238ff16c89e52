/* compute: a compute-bound guest (sieve, CRC-32, sorting, matrix multiply,
 * recursion) printing checksums. The workload for execution benchmarks. */
#include "rt/rt.h"

static u8 sieve[200000];
static u32 crc_table[256];
static u32 data[20000];
static s32 ma[24][24], mb[24][24], mc[24][24];

static u32 count_primes(u32 n)
{
    memset(sieve, 1, n);
    u32 count = 0;
    for (u32 i = 2; i < n; i++) {
        if (!sieve[i])
            continue;
        count++;
        for (u32 j = i * 2; j < n; j += i)
            sieve[j] = 0;
    }
    return count;
}

static u32 crc32(const u8 *p, u32 n)
{
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
    u32 c = 0xFFFFFFFF;
    for (u32 i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return ~c;
}

static void quicksort(u32 *a, int lo, int hi)
{
    while (lo < hi) {
        u32 pivot = a[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                u32 t = a[i]; a[i] = a[j]; a[j] = t;
                i++; j--;
            }
        }
        if (j - lo < hi - i) {
            quicksort(a, lo, j);
            lo = i;
        } else {
            quicksort(a, i, hi);
            hi = j;
        }
    }
}

static u32 fib(u32 n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    printf("primes below 200000: %u\n", count_primes(200000));
    printf("crc32 of sieve: %08x\n", crc32(sieve, sizeof(sieve)));
    u32 x = 1;
    for (u32 i = 0; i < 20000; i++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        data[i] = x;
    }
    quicksort(data, 0, 19999);
    int sorted = 1;
    u32 sum = 0;
    for (u32 i = 0; i < 20000; i++) {
        if (i && data[i - 1] > data[i]) sorted = 0;
        sum = sum * 31 + data[i];
    }
    printf("sorted 20000 values: %s, checksum %08x\n", sorted ? "yes" : "no", sum);
    for (int i = 0; i < 24; i++)
        for (int j = 0; j < 24; j++) {
            ma[i][j] = i * 3 - j;
            mb[i][j] = (i ^ j) - 7;
        }
    s32 trace = 0;
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 24; i++)
            for (int j = 0; j < 24; j++) {
                s32 s = 0;
                for (int k = 0; k < 24; k++)
                    s += ma[i][k] * mb[k][j];
                mc[i][j] = s + r;
            }
    for (int i = 0; i < 24; i++)
        trace += mc[i][i];
    printf("matrix trace: %d\n", trace);
    printf("fib(22) = %u\n", fib(22));
    return 0;
}
