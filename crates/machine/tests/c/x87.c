/* x87 results, printed bit for bit: popek must equal the host FPU. */
#include <math.h>
#include <stdio.h>
#include <string.h>

static void bits(const char *name, long double v) {
    unsigned char b[10];
    memcpy(b, &v, 10);
    printf("%-8s ", name);
    for (int i = 9; i >= 0; i--) printf("%02x", b[i]);
    printf("\n");
}

#define UNARY(insn, x) ({ long double r; __asm__(insn : "=t"(r) : "0"(x)); r; })
#define BINARY(insn, x, y) ({ long double r; __asm__(insn : "=t"(r) : "0"(x), "u"(y) : "st(1)"); r; })

int main(void) {
    long double xs[] = {0.5L, 1.0L, -2.75L, 3.14159265358979323846L, 1e-4000L, 1e300L, 0.0L, -0.0L,
                        1.0L / 3.0L, 12345.678L};
    for (unsigned i = 0; i < sizeof xs / sizeof xs[0]; i++) {
        long double x = xs[i];
        printf("x = %.21Lg\n", x);
        bits("fsin", UNARY("fsin", x));
        bits("fcos", UNARY("fcos", x));
        bits("fsqrt", UNARY("fsqrt", fabsl(x)));
        bits("f2xm1", UNARY("f2xm1", x / 4));
        bits("frndint", UNARY("frndint", x * 7));
        bits("fyl2x", BINARY("fyl2x", fabsl(x) + 1, 3.0L));
        bits("fyl2xp1", BINARY("fyl2xp1", x / 8, 2.0L));
        bits("fpatan", BINARY("fpatan", x, 0.7L));
        bits("fscale", BINARY("fscale", x, 5.0L));
        bits("fprem", BINARY("fprem", x * 1000, 0.3L));
        bits("fprem1", BINARY("fprem1", x * 1000, 0.3L));
        long double t, one;
        __asm__("fptan" : "=t"(one), "=u"(t) : "0"(x));
        bits("fptan", t);
        long double m, e;
        __asm__("fxtract" : "=t"(m), "=u"(e) : "0"(x + 1));
        bits("fxtract", m * 4 + e);
        double d = (double)x * 1.1;
        float f = (float)x / 3.0f;
        printf("double %a float %a\n", d, (double)f);
        long long ll = llrintl(x * 1e6L);
        printf("int %lld %d %d\n", ll, (int)(x * 100), (short)(x * 10));
        unsigned short sw, cw;
        __asm__("fnstsw %0; fnstcw %1" : "=m"(sw), "=m"(cw));
        printf("sw %04x cw %04x\n", sw & 0x4700, cw);
    }
    unsigned char bcd[10];
    long double big = 123456789012345678.0L;
    __asm__("fbstp %0" : "=m"(bcd) : "t"(big) : "st");
    printf("fbstp ");
    for (int i = 9; i >= 0; i--) printf("%02x", bcd[i]);
    long double back;
    __asm__("fbld %1" : "=t"(back) : "m"(bcd));
    printf(" fbld %.0Lf\n", back);
    /* rounding modes through the control word */
    unsigned short cw0, cw;
    __asm__("fnstcw %0" : "=m"(cw0));
    for (int mode = 0; mode < 4; mode++) {
        cw = (cw0 & ~0xC00) | (mode << 10);
        __asm__ volatile("fldcw %0" : : "m"(cw));
        long double r = UNARY("frndint", -2.5L);
        volatile double q = 1.0 / 3.0;
        printf("mode %d: frndint(-2.5) = %.1Lf  1/3 = %a\n", mode, r, q);
    }
    __asm__ volatile("fldcw %0" : : "m"(cw0));
    /* comparisons, FXAM classes, FCMOV */
    long double vals[] = {1.0L, -1.0L, 0.0L, INFINITY, NAN, 1e-4940L};
    for (int i = 0; i < 6; i++) {
        unsigned short sw;
        __asm__("fxam; fnstsw %0" : "=m"(sw) : "t"(vals[i]));
        int lt = vals[i] < 0.5L, eq = vals[i] == 1.0L, un = isunordered(vals[i], 0.5L);
        printf("fxam %04x lt %d eq %d un %d max %Lg\n", sw & 0x4700, lt, eq, un, fmaxl(vals[i], 0.0L));
    }
    /* FNSTENV/FLDENV and FNSAVE/FRSTOR round trip (control, status, tags) */
    unsigned char env[28], save[108];
    __asm__ volatile("fld1; fldpi; fnstenv %0; fldenv %0" : "=m"(env));
    __asm__ volatile("fnsave %0; frstor %0" : "=m"(save));
    printf("env cw %02x%02x sw %02x%02x tag %02x%02x; save st0 ", env[1], env[0], env[5] & 0x47,
           env[4], env[9], env[8]);
    for (int i = 9; i >= 0; i--) printf("%02x", save[28 + i]);
    __asm__ volatile("fninit");
    printf("\nlibm: %.17g %.17g %.17g %.17g %.17g\n", exp(1.5), log(10.0), pow(2.0, 0.5), atan2(1.0, 3.0),
           tanh(0.75));
    return 0;
}
