/* selfcheck: executes integer instructions and compares each result (and
 * the flags it defines) with a value computed independently in C by a
 * different method: bit-serial adders, shift-and-add multiplication,
 * restoring division, one-bit-at-a-time shifts, decimal arithmetic for BCD.
 * Prints a line per instruction group and a verdict. */
#include "rt/rt.h"

static u32 fails, checks;
static const char *group;

static void check(int ok, u32 a, u32 b, u32 got, u32 want)
{
    checks++;
    if (!ok) {
        fails++;
        if (fails <= 20)
            printf("  FAIL %s: a=%x b=%x got=%x want=%x\n", group, a, b, got, want);
    }
}

static u32 seed = 12345;
static u32 rnd(void)
{
    seed = seed * 1103515245u + 12345u;
    u32 hi = seed >> 16;
    seed = seed * 1103515245u + 12345u;
    return (hi << 16) | (seed >> 16);
}

static const u32 edges[] = {0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
                            0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 9, 0x99};
#define NEDGE (sizeof(edges) / sizeof(edges[0]))
static u32 input(int i) { return i < (int)NEDGE ? edges[i] : rnd(); }

static u32 mask_of(int bits) { return bits == 32 ? 0xFFFFFFFFu : (1u << bits) - 1; }

static int parity(u32 v)
{
    int n = 0;
    for (int i = 0; i < 8; i++)
        n += (v >> i) & 1;
    return !(n & 1);
}

/* Bit-serial adder: a + b + cin over `bits` bits. Returns the result and
 * the architectural flags (CF, PF, AF, ZF, SF, OF). */
static u32 ripple(u32 a, u32 b, int cin, int bits, u32 *flags)
{
    u32 r = 0;
    int c = cin, c3 = 0, cmsb_in = 0;
    for (int i = 0; i < bits; i++) {
        int x = (a >> i) & 1, y = (b >> i) & 1;
        if (i == bits - 1)
            cmsb_in = c;
        r |= (u32)(x ^ y ^ c) << i;
        c = (x & y) | (x & c) | (y & c);
        if (i == 3)
            c3 = c;
    }
    *flags = (c ? EFL_CF : 0) | (c3 ? EFL_AF : 0) | (cmsb_in != c ? EFL_OF : 0) |
             (r == 0 ? EFL_ZF : 0) | ((r >> (bits - 1)) & 1 ? EFL_SF : 0) |
             (parity(r) ? EFL_PF : 0);
    return r;
}

/* a - b - bin as a + ~b + !bin with the carries inverted (borrows). */
static u32 ripple_sub(u32 a, u32 b, int bin, int bits, u32 *flags)
{
    u32 r = ripple(a, ~b & mask_of(bits), !bin, bits, flags);
    *flags ^= EFL_CF | EFL_AF;
    return r;
}

#define ARITH (EFL_CF | EFL_PF | EFL_AF | EFL_ZF | EFL_SF | EFL_OF)

#define ALU_OP(name, insn, reg, m)                                                     \
    static u32 name(u32 a, u32 b, int cin, u32 *fl)                                    \
    {                                                                                  \
        u32 f;                                                                         \
        __asm__ volatile("bt $0, %3\n\t" insn " %" m "2, %" m "0\n\tpushfl\n\tpopl %1" \
                         : "+q"(a), "=r"(f)                                            \
                         : reg(b), "r"(cin)                                            \
                         : "cc");                                                      \
        *fl = f & ARITH;                                                               \
        return a;                                                                      \
    }
ALU_OP(add32, "addl", "r", "")
ALU_OP(adc32, "adcl", "r", "")
ALU_OP(sub32, "subl", "r", "")
ALU_OP(sbb32, "sbbl", "r", "")
ALU_OP(add16, "addw", "r", "w")
ALU_OP(sbb16, "sbbw", "r", "w")
ALU_OP(adc8, "adcb", "q", "b")
ALU_OP(sub8, "subb", "q", "b")

static void test_add_sub(void)
{
    group = "add/adc/sub/sbb";
    u32 c0 = checks;
    for (int i = 0; i < 600; i++) {
        u32 a = input(i % 40), b = input(i / 20 % 40 + (i & 1)), f, g, r, w;
        int cin = i & 1;
        if (i >= 300) { a = rnd(); b = rnd(); }
        r = add32(a, b, cin, &f); w = ripple(a, b, 0, 32, &g); check(r == w && f == g, a, b, f, g);
        r = adc32(a, b, cin, &f); w = ripple(a, b, cin, 32, &g); check(r == w && f == g, a, b, f, g);
        r = sub32(a, b, cin, &f); w = ripple_sub(a, b, 0, 32, &g); check(r == w && f == g, a, b, f, g);
        r = sbb32(a, b, cin, &f); w = ripple_sub(a, b, cin, 32, &g); check(r == w && f == g, a, b, f, g);
        r = add16(a, b, cin, &f) & 0xFFFF; w = ripple(a & 0xFFFF, b & 0xFFFF, 0, 16, &g);
        check(r == w && f == g, a, b, f, g);
        r = sbb16(a, b, cin, &f) & 0xFFFF; w = ripple_sub(a & 0xFFFF, b & 0xFFFF, cin, 16, &g);
        check(r == w && f == g, a, b, f, g);
        r = adc8(a, b, cin, &f) & 0xFF; w = ripple(a & 0xFF, b & 0xFF, cin, 8, &g);
        check(r == w && f == g, a, b, f, g);
        r = sub8(a, b, cin, &f) & 0xFF; w = ripple_sub(a & 0xFF, b & 0xFF, 0, 8, &g);
        check(r == w && f == g, a, b, f, g);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

static void test_logic_incdec(void)
{
    group = "and/or/xor/inc/dec/neg/not";
    u32 c0 = checks;
    for (int i = 0; i < 300; i++) {
        u32 a = input(i), b = rnd(), f, r;
        __asm__ volatile("andl %2, %0; pushfl; popl %1" : "=r"(r), "=r"(f) : "r"(b), "0"(a) : "cc");
        u32 want = 0;
        for (int k = 0; k < 32; k++)
            want |= (((a >> k) & (b >> k)) & 1) << k;
        u32 wf = (want == 0 ? EFL_ZF : 0) | (want >> 31 ? EFL_SF : 0) | (parity(want) ? EFL_PF : 0);
        check(r == want && (f & (ARITH & ~EFL_AF)) == wf, a, b, f, wf);
        __asm__ volatile("xorl %2, %0; pushfl; popl %1" : "=r"(r), "=r"(f) : "r"(b), "0"(a) : "cc");
        want = 0;
        for (int k = 0; k < 32; k++)
            want |= (((a >> k) ^ (b >> k)) & 1) << k;
        check(r == want && !(f & (EFL_CF | EFL_OF)), a, b, r, want);
        /* INC keeps CF: set CF first */
        u32 g;
        __asm__ volatile("stc; incl %0; pushfl; popl %1" : "=r"(r), "=r"(f) : "0"(a) : "cc");
        u32 w = ripple(a, 1, 0, 32, &g);
        check(r == w && (f & ARITH) == ((g & ~EFL_CF) | EFL_CF), a, 1, f, g);
        __asm__ volatile("clc; decl %0; pushfl; popl %1" : "=r"(r), "=r"(f) : "0"(a) : "cc");
        w = ripple_sub(a, 1, 0, 32, &g);
        check(r == w && (f & ARITH) == (g & ~EFL_CF), a, 1, f, g);
        __asm__ volatile("negl %0; pushfl; popl %1" : "=r"(r), "=r"(f) : "0"(a) : "cc");
        w = ripple_sub(0, a, 0, 32, &g);
        check(r == w && (f & ARITH) == g, a, 0, f, g);
        __asm__ volatile("notl %0" : "=r"(r) : "0"(a));
        check(r == (0xFFFFFFFF - a), a, 0, r, 0xFFFFFFFF - a);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

/* 32x32 -> 64 by shift-and-add on two 32-bit halves. */
static void mul_ref(u32 a, u32 b, u32 *lo, u32 *hi)
{
    u32 l = 0, h = 0, al = a, ah = 0;
    for (int i = 0; i < 32; i++) {
        if ((b >> i) & 1) {
            u32 nl = l + al;
            h += ah + (nl < l);
            l = nl;
        }
        ah = (ah << 1) | (al >> 31);
        al <<= 1;
    }
    *lo = l;
    *hi = h;
}

/* 64/32 restoring division; returns 0 on overflow or divide by zero. */
static int div_ref(u32 hi, u32 lo, u32 d, u32 *q, u32 *r)
{
    if (d == 0 || hi >= d)
        return 0;
    u32 rem = hi, quo = 0;
    for (int i = 31; i >= 0; i--) {
        u32 top = rem >> 31;
        rem = (rem << 1) | ((lo >> i) & 1);
        if (top || rem >= d) {
            rem -= d;
            quo |= 1u << i;
        }
    }
    *q = quo;
    *r = rem;
    return 1;
}

static void test_mul_div(void)
{
    group = "mul/imul/div/idiv";
    u32 c0 = checks;
    for (int i = 0; i < 400; i++) {
        u32 a = input(i), b = i < 40 ? input(39 - i) : rnd(), lo, hi, wl, wh, f;
        __asm__ volatile("mull %3; pushfl; popl %2" : "=a"(lo), "=d"(hi), "=r"(f) : "r"(b), "0"(a) : "cc");
        mul_ref(a, b, &wl, &wh);
        check(lo == wl && hi == wh && !!(f & EFL_CF) == (wh != 0) && !!(f & EFL_OF) == (wh != 0), a, b, hi, wh);
        /* signed: |a|*|b| then negate the 64-bit product */
        __asm__ volatile("imull %3; pushfl; popl %2" : "=a"(lo), "=d"(hi), "=r"(f) : "r"(b), "0"(a) : "cc");
        u32 ua = (s32)a < 0 ? -a : a, ub = (s32)b < 0 ? -b : b;
        mul_ref(ua, ub, &wl, &wh);
        if (((s32)a < 0) != ((s32)b < 0)) {
            wl = ~wl + 1;
            wh = ~wh + (wl == 0);
        }
        int fits = (wh == 0 && !(wl >> 31)) || (wh == 0xFFFFFFFF && (wl >> 31));
        check(lo == wl && hi == wh && !!(f & EFL_CF) == !fits, a, b, hi, wh);
        u32 t;
        __asm__ volatile("imull %2, %0; pushfl; popl %1" : "=r"(t), "=r"(f) : "r"(b), "0"(a) : "cc");
        check(t == wl && !!(f & EFL_OF) == !fits, a, b, t, wl);
        /* division with a dividend that does not overflow */
        u32 d = b ? b : 7, dh = a % d, q, r, wq, wr;
        __asm__ volatile("divl %4" : "=a"(q), "=d"(r) : "0"(a), "1"(dh), "r"(d));
        div_ref(dh, a, d, &wq, &wr);
        check(q == wq && r == wr, a, d, q, wq);
        /* idiv: 32-bit dividend sign-extended */
        s32 sa = (s32)a, sd = (s32)(d | 1);
        if (!(sa == (s32)0x80000000 && sd == -1)) {
            s32 sq, sr;
            __asm__ volatile("cltd; idivl %3" : "=a"(sq), "=d"(sr) : "0"(sa), "r"(sd));
            u32 uq, ur, na = sa < 0 ? -(u32)sa : (u32)sa, nd = sd < 0 ? -(u32)sd : (u32)sd;
            div_ref(0, na, nd, &uq, &ur);
            s32 eq = ((sa < 0) != (sd < 0)) ? -(s32)uq : (s32)uq;
            s32 er = sa < 0 ? -(s32)ur : (s32)ur;
            check(sq == eq && sr == er, a, d, sq, eq);
        }
    }
    printf("%s: %u checks\n", group, checks - c0);
}

/* one-bit-at-a-time reference for the shift group (count already < 32) */
static u32 shift_ref(int op, u32 v, int n, int bits, int *cf)
{
    u32 m = mask_of(bits), msb = 1u << (bits - 1);
    for (int i = 0; i < n; i++) {
        int out;
        switch (op) {
        case 0: out = (v & msb) != 0; v = ((v << 1) & m) | out; *cf = out; break;          /* rol */
        case 1: out = v & 1; v = (v >> 1) | (out ? msb : 0); *cf = out; break;             /* ror */
        case 2: out = (v & msb) != 0; v = ((v << 1) & m) | *cf; *cf = out; break;          /* rcl */
        case 3: out = v & 1; v = (v >> 1) | (*cf ? msb : 0); *cf = out; break;             /* rcr */
        case 4: *cf = (v & msb) != 0; v = (v << 1) & m; break;                             /* shl */
        case 5: *cf = v & 1; v >>= 1; break;                                               /* shr */
        default: *cf = v & 1; v = (v >> 1) | (v & msb); break;                             /* sar */
        }
    }
    return v;
}

#define SHIFT_FN(name, insn, sfx, regc)                                                 \
    static u32 name(u32 v, u32 n, int cin, u32 *f)                                       \
    {                                                                                    \
        __asm__ volatile("bt $0, %3\n\t" insn sfx " %%cl, %" regc "0\n\tpushfl\n\tpopl %1" \
                         : "+q"(v), "=r"(*f) : "c"(n), "r"(cin) : "cc");                 \
        return v;                                                                        \
    }
SHIFT_FN(rol32, "rol", "l", "") SHIFT_FN(ror32, "ror", "l", "") SHIFT_FN(rcl32, "rcl", "l", "")
SHIFT_FN(rcr32, "rcr", "l", "") SHIFT_FN(shl32, "shl", "l", "") SHIFT_FN(shr32, "shr", "l", "")
SHIFT_FN(sar32, "sar", "l", "") SHIFT_FN(rol8, "rol", "b", "b") SHIFT_FN(rcr8, "rcr", "b", "b")
SHIFT_FN(sar8, "sar", "b", "b") SHIFT_FN(rcl16, "rcl", "w", "w") SHIFT_FN(shl16, "shl", "w", "w")

typedef u32 (*shift_fn)(u32, u32, int, u32 *);

static void test_shifts(void)
{
    group = "rol/ror/rcl/rcr/shl/shr/sar";
    u32 c0 = checks;
    static const struct { shift_fn fn; int op, bits; } t[] = {
        {rol32, 0, 32}, {ror32, 1, 32}, {rcl32, 2, 32}, {rcr32, 3, 32}, {shl32, 4, 32},
        {shr32, 5, 32}, {sar32, 6, 32}, {rol8, 0, 8}, {rcr8, 3, 8}, {sar8, 6, 8},
        {rcl16, 2, 16}, {shl16, 4, 16}};
    for (int i = 0; i < 40; i++) {
        u32 v = input(i);
        for (u32 k = 0; k < sizeof(t) / sizeof(t[0]); k++) {
            for (u32 n = 0; n < 34; n += (n < 18 ? 1 : 7)) {
                int bits = t[k].bits, cin = (i + n) & 1, cf = cin;
                u32 f, vm = v & mask_of(bits);
                u32 r = t[k].fn(vm, n, cin, &f) & mask_of(bits);
                u32 cnt = n & 31;
                if (t[k].op == 2 || t[k].op == 3)
                    cnt = bits == 32 ? cnt : cnt % (bits + 1);
                else if (t[k].op <= 1)
                    cnt = cnt % bits;
                u32 w = shift_ref(t[k].op, vm, cnt, bits, &cf);
                /* ROL/ROR set CF from the result whenever the masked count is
                 * non-zero, even when the rotation is a whole turn (SDM ROL). */
                if (t[k].op == 0 && (n & 31))
                    cf = w & 1;
                if (t[k].op == 1 && (n & 31))
                    cf = (w >> (bits - 1)) & 1;
                int cf_ok = (n & 31) == 0 || (t[k].op >= 2 && cnt == 0) || !!(f & EFL_CF) == cf ||
                            (t[k].op >= 4 && (n & 31) >= (u32)bits);
                check(r == w && cf_ok, vm, n, r, w);
            }
        }
    }
    /* shld/shrd against two-word shifting */
    for (int i = 0; i < 200; i++) {
        u32 a = input(i), b = rnd(), n = i & 31, r, w;
        __asm__ volatile("shldl %%cl, %1, %0" : "=r"(r) : "r"(b), "c"(n), "0"(a) : "cc");
        w = n ? (a << n) | (b >> (32 - n)) : a;
        check(r == w, a, n, r, w);
        __asm__ volatile("shrdl %%cl, %1, %0" : "=r"(r) : "r"(b), "c"(n), "0"(a) : "cc");
        w = n ? (a >> n) | (b << (32 - n)) : a;
        check(r == w, a, n, r, w);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

static void test_bits(void)
{
    group = "bsf/bsr/bt/bts/btr/btc/bswap";
    u32 c0 = checks;
    for (int i = 0; i < 300; i++) {
        u32 v = input(i), r = 0xDEAD, f;
        __asm__ volatile("bsfl %2, %0; pushfl; popl %1" : "+r"(r), "=r"(f) : "r"(v) : "cc");
        int w = -1;
        for (int k = 0; k < 32; k++)
            if ((v >> k) & 1) { w = k; break; }
        check(v ? (r == (u32)w && !(f & EFL_ZF)) : !!(f & EFL_ZF), v, 0, r, w);
        __asm__ volatile("bsrl %2, %0; pushfl; popl %1" : "+r"(r), "=r"(f) : "r"(v) : "cc");
        for (int k = 0; k < 32; k++)
            if ((v >> k) & 1) w = k;
        check(v ? (r == (u32)w && !(f & EFL_ZF)) : !!(f & EFL_ZF), v, 1, r, w);
        u32 bit = rnd() & 31, x = v;
        __asm__ volatile("btsl %%ecx, %%eax; pushfl; popl %%edx" : "+a"(x), "=d"(f) : "c"(bit) : "cc");
        check(x == (v | (1u << bit)) && !!(f & EFL_CF) == ((v >> bit) & 1), v, bit, x, v | (1u << bit));
        x = v;
        __asm__ volatile("btrl %%ecx, %%eax; pushfl; popl %%edx" : "+a"(x), "=d"(f) : "c"(bit) : "cc");
        check(x == (v & ~(1u << bit)) && !!(f & EFL_CF) == ((v >> bit) & 1), v, bit, x, 0);
        x = v;
        __asm__ volatile("btcl %%ecx, %%eax" : "+a"(x) : "c"(bit) : "cc");
        check(x == (v ^ (1u << bit)), v, bit, x, v ^ (1u << bit));
        /* bt on memory with a bit offset beyond the dword */
        static u32 arr[4];
        arr[0] = v; arr[1] = ~v; arr[2] = v * 3; arr[3] = 0;
        u32 off = rnd() & 95, cf;
        __asm__ volatile("btl %2, %1; setc %b0" : "=q"(cf) : "m"(arr), "r"(off) : "cc");
        check((cf & 1) == ((arr[off / 32] >> (off % 32)) & 1), off, 0, cf & 1, 0);
        u32 s = v;
        __asm__ volatile("bswap %0" : "+r"(s));
        u32 ws = (v >> 24) | ((v >> 8) & 0xFF00) | ((v << 8) & 0xFF0000) | (v << 24);
        check(s == ws, v, 0, s, ws);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

static void test_conditions(void)
{
    group = "setcc/cmovcc/jcc";
    u32 c0 = checks;
    for (int i = 0; i < 300; i++) {
        u32 a = input(i % 30), b = input((i / 30) % 30);
        u8 s[8];
        __asm__ volatile("cmpl %9, %8\n\t"
                         "setb %0\n\tsetbe %1\n\tsetl %2\n\tsetle %3\n\t"
                         "sete %4\n\tsets %5\n\tseto %6\n\tsetp %7"
                         : "=m"(s[0]), "=m"(s[1]), "=m"(s[2]), "=m"(s[3]), "=m"(s[4]),
                           "=m"(s[5]), "=m"(s[6]), "=m"(s[7])
                         : "r"(a), "r"(b)
                         : "cc");
        u32 f;
        u32 d = ripple_sub(a, b, 0, 32, &f);
        (void)d;
        int want[8] = {a < b, a <= b, (s32)a < (s32)b, (s32)a <= (s32)b, a == b,
                       !!(f & EFL_SF), !!(f & EFL_OF), !!(f & EFL_PF)};
        for (int k = 0; k < 8; k++)
            check(s[k] == want[k], a, b, s[k], want[k]);
        u32 r = 111;
        __asm__ volatile("cmpl %2, %1\n\tcmovgl %3, %0" : "+r"(r) : "r"(a), "r"(b), "r"(222u) : "cc");
        check(r == ((s32)a > (s32)b ? 222u : 111u), a, b, r, 0);
        r = 111;
        __asm__ volatile("cmpl %2, %1\n\tcmoval %3, %0" : "+r"(r) : "r"(a), "r"(b), "r"(222u) : "cc");
        check(r == (a > b ? 222u : 111u), a, b, r, 0);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

static u8 src[300], dst[300];

static void test_strings(void)
{
    group = "movs/stos/lods/cmps/scas";
    u32 c0 = checks;
    for (int i = 0; i < 60; i++) {
        for (int k = 0; k < 300; k++) {
            src[k] = (u8)rnd();
            dst[k] = 0;
        }
        u32 n = rnd() % 200, si, di, cx;
        __asm__ volatile("cld; rep movsb" : "=S"(si), "=D"(di), "=c"(cx) : "0"(src), "1"(dst), "2"(n) : "memory");
        check(memcmp(src, dst, n) == 0 && dst[n] == 0 && cx == 0 && si == (u32)src + n && di == (u32)dst + n, n, 0, cx, 0);
        /* backwards copy with DF = 1 */
        memset(dst, 0, sizeof(dst));
        __asm__ volatile("std; rep movsb; cld"
                         : "=S"(si), "=D"(di), "=c"(cx)
                         : "0"(src + n + 10), "1"(dst + n + 10), "2"(n) : "memory");
        int ok = 1;
        for (u32 k = 0; k < n; k++)
            ok &= dst[n + 10 - k] == src[n + 10 - k];
        check(ok && dst[10] == 0 && di == (u32)dst + 10, n, 1, di, (u32)dst + 10);
        /* rep stosl */
        u32 words[40];
        u32 cnt = rnd() % 40, pat = rnd();
        __asm__ volatile("cld; rep stosl" : "=D"(di), "=c"(cx) : "0"(words), "1"(cnt), "a"(pat) : "memory");
        ok = 1;
        for (u32 k = 0; k < cnt; k++)
            ok &= words[k] == pat;
        check(ok && di == (u32)(words + cnt), cnt, pat, cx, 0);
        /* repe cmpsb: first difference */
        memcpy(dst, src, 300);
        u32 pos = rnd() % 250;
        dst[pos] ^= 0x5A;
        __asm__ volatile("cld; repe cmpsb" : "=S"(si), "=D"(di), "=c"(cx) : "0"(src), "1"(dst), "2"(280) : "cc", "memory");
        check(si == (u32)src + pos + 1 && cx == 280 - pos - 1, pos, 0, si - (u32)src, pos + 1);
        /* repne scasb: find a byte */
        u8 needle = src[pos];
        u32 first = 0;
        while (src[first] != needle)
            first++;
        __asm__ volatile("cld; repne scasb" : "=D"(di), "=c"(cx) : "0"(src), "1"(300), "a"(needle) : "cc", "memory");
        check(di == (u32)src + first + 1, first, needle, di - (u32)src, first + 1);
        /* lodsw */
        u32 ax = 0;
        __asm__ volatile("cld; lodsw" : "=a"(ax), "=S"(si) : "0"(0xAAAA0000), "1"(src) : "memory");
        check(ax == (0xAAAA0000 | src[0] | (src[1] << 8)) && si == (u32)src + 2, 0, 0, ax, 0);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

static u32 to_bcd(u32 v) { return ((v / 10) << 4) | (v % 10); }

static void test_bcd(void)
{
    group = "daa/das/aaa/aas/aam/aad";
    u32 c0 = checks;
    for (u32 x = 0; x < 100; x += 3) {
        for (u32 y = 0; y < 100; y += 7) {
            u32 al, f;
            __asm__ volatile("addb %b3, %b0; daa; pushfl; popl %1" : "=a"(al), "=r"(f) : "0"(to_bcd(x)), "q"(to_bcd(y)) : "cc");
            u32 sum = x + y;
            check((al & 0xFF) == to_bcd(sum % 100) && !!(f & EFL_CF) == (sum >= 100), x, y, al & 0xFF, to_bcd(sum % 100));
            __asm__ volatile("subb %b3, %b0; das; pushfl; popl %1" : "=a"(al), "=r"(f) : "0"(to_bcd(x)), "q"(to_bcd(y)) : "cc");
            u32 diff = (x + 100 - y) % 100;
            check((al & 0xFF) == to_bcd(diff) && !!(f & EFL_CF) == (x < y), x, y, al & 0xFF, to_bcd(diff));
        }
    }
    for (u32 x = 0; x < 10; x++) {
        for (u32 y = 0; y < 10; y++) {
            u32 ax;
            __asm__ volatile("addb %b2, %b0; aaa" : "=a"(ax) : "0"(x), "q"(y) : "cc");
            check((ax & 0xFF) == (x + y) % 10 && ((ax >> 8) & 0xFF) == (x + y) / 10, x, y, ax, 0);
            __asm__ volatile("subb %b2, %b0; aas" : "=a"(ax) : "0"(0x500 | x), "q"(y) : "cc");
            u32 want_al = (x + 10 - y) % 10, want_ah = x < y ? 4 : 5;
            check((ax & 0xFF) == want_al && ((ax >> 8) & 0xFF) == want_ah, x, y, ax, (want_ah << 8) | want_al);
        }
    }
    for (u32 v = 0; v < 256; v += 5) {
        u32 ax;
        __asm__ volatile("aam" : "=a"(ax) : "0"(v) : "cc");
        check((ax & 0xFF) == v % 10 && ((ax >> 8) & 0xFF) == v / 10, v, 10, ax, 0);
        __asm__ volatile("aad" : "=a"(ax) : "0"(((v / 10 % 10) << 8) | (v % 10)) : "cc");
        check((ax & 0xFFFF) == (v / 10 % 10) * 10 + v % 10, v, 10, ax, 0);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

static void test_misc(void)
{
    group = "xadd/cmpxchg/cmpxchg8b/movsx/movzx/cdq/xlat/lea/pusha/enter/loop/xchg/lahf";
    u32 c0 = checks;
    for (int i = 0; i < 100; i++) {
        u32 a = input(i), b = rnd(), x = a, y = b;
        __asm__ volatile("xaddl %1, %0" : "+r"(x), "+r"(y) : : "cc");
        check(x == a + b && y == a, a, b, x, a + b);
        u32 mem = a, acc = a, zf;
        __asm__ volatile("lock cmpxchgl %3, %1; sete %b2" : "+a"(acc), "+m"(mem), "=q"(zf) : "r"(b) : "cc");
        check(mem == b && (zf & 1), a, b, mem, b);
        mem = a; acc = a + 1;
        __asm__ volatile("cmpxchgl %3, %1; sete %b2" : "+a"(acc), "+m"(mem), "=q"(zf) : "r"(b) : "cc");
        check(mem == a && acc == a && !(zf & 1), a, b, acc, a);
        u64 q = ((u64)a << 32) | b;
        u32 lo = b, hi = a;
        __asm__ volatile("lock cmpxchg8b %0" : "+m"(q), "+a"(lo), "+d"(hi) : "b"(0x11111111), "c"(0x22222222) : "cc");
        check(q == 0x2222222211111111ull, a, b, (u32)q, 0x11111111);
        s32 sx;
        u32 zx;
        __asm__ volatile("movsbl %b2, %0; movzwl %w2, %1" : "=r"(sx), "=r"(zx) : "q"(a));
        check(sx == (s32)(s8)(a & 0xFF) && zx == (a & 0xFFFF), a, 0, sx, 0);
        u32 d;
        __asm__ volatile("cltd" : "=d"(d) : "a"(a));
        check(d == ((a >> 31) ? 0xFFFFFFFF : 0), a, 0, d, 0);
        u32 e;
        __asm__ volatile("cwtl" : "=a"(e) : "0"(a));
        check(e == (u32)(s32)(s16)(a & 0xFFFF), a, 0, e, 0);
        static u8 table[256];
        for (int k = 0; k < 256; k++)
            table[k] = (u8)(k * 13 + 1);
        u32 al;
        __asm__ volatile("xlat" : "=a"(al) : "0"(a), "b"(table));
        check((al & 0xFF) == table[a & 0xFF], a, 0, al & 0xFF, table[a & 0xFF]);
        u32 l;
        __asm__ volatile("leal 0x12345(%1,%2,8), %0" : "=r"(l) : "r"(a), "r"(b));
        check(l == a + b * 8 + 0x12345, a, b, l, a + b * 8 + 0x12345);
        u32 saved_eax, saved_esp, esp0;
        __asm__ volatile("movl %%esp, %%edx\n\tpushal\n\t"
                         "movl 28(%%esp), %%ebx\n\tmovl 12(%%esp), %%ecx\n\t"
                         "addl $32, %%esp"
                         : "=b"(saved_eax), "=c"(saved_esp), "=d"(esp0) : "a"(a) : "memory");
        check(saved_eax == a && saved_esp == esp0, a, 0, saved_esp, esp0);
        u32 cnt = 0, ecx = (a & 0xFF) + 1;
        __asm__ volatile("1: incl %0\n\tloop 1b" : "+r"(cnt), "+c"(ecx) : : "cc");
        check(cnt == (a & 0xFF) + 1 && ecx == 0, a, 0, cnt, (a & 0xFF) + 1);
        u32 p = a, o = b;
        __asm__ volatile("xchgl %0, %1" : "+r"(p), "+r"(o));
        check(p == b && o == a, a, b, p, b);
        u32 ah;
        __asm__ volatile("stc; lahf; movzbl %%ah, %0" : "=r"(ah) : : "eax", "cc");
        check((ah & 0xD5 & EFL_CF) == EFL_CF && (ah & 2), 0, 0, ah, 0);
        u32 frame_ebp, esp_before, esp_after;
        __asm__ volatile("movl %%esp, %1\n\tenter $16, $0\n\tmovl %%ebp, %0\n\tleave\n\tmovl %%esp, %2"
                         : "=r"(frame_ebp), "=r"(esp_before), "=r"(esp_after));
        check(frame_ebp == esp_before - 4 && esp_after == esp_before, esp_before, 0, frame_ebp, esp_before - 4);
    }
    printf("%s: %u checks\n", group, checks - c0);
}

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    test_add_sub();
    test_logic_incdec();
    test_mul_div();
    test_shifts();
    test_bits();
    test_conditions();
    test_strings();
    test_bcd();
    test_misc();
    printf("selfcheck: %u checks, %u failed: %s\n", checks, fails, fails ? "FAIL" : "PASS");
    return fails ? 1 : 0;
}
