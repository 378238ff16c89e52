/* dirty: keeps writing a counter into every page of a 16 MiB area, pass
 * after pass, and checks before each write that the page still holds the
 * previous pass's value (with its page number, so a page that went
 * missing or moved is caught too). A machine migrated while it runs must
 * arrive with every page the source dirtied: a lost dirty page shows here
 * as a stale counter. It prints its progress every 100 passes and a
 * verdict at the end. The command line's passes=N sets how many passes
 * (default 200; the migration tests run thousands under bt). */
#include "rt/rt.h"

#define AREA ((volatile u32 *)0x00800000)
#define PAGES 4096u                     /* 16 MiB */

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    u32 bad = 0, total = cmdline_number(mbi, "passes=", 200);
    if (!total)
        total = 200;
    for (u32 pass = 1; pass <= total; pass++) {
        for (u32 p = 0; p < PAGES; p++) {
            volatile u32 *w = AREA + p * 1024 + 1 + (p * 7 + pass) % 1023;
            volatile u32 *head = AREA + p * 1024;
            u32 want = pass == 1 ? 0 : ((pass - 1) << 12 | p);
            if (head[0] != want && bad++ < 5)
                printf("dirty: pass %u: page %u holds %x, expected %x\n", pass, p, head[0], want);
            head[0] = pass << 12 | p;
            *w = pass;
        }
        if (pass % 100 == 0)
            printf("dirty: pass %u, %u wrong\n", pass, bad);
    }
    printf("dirty: %u passes over %u pages: %s\n", total, PAGES,
           bad ? "PAGES WRONG" : "every page held its counter");
    exit(bad ? 3 : 0);
}
