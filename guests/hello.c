/* hello: the smallest bundled guest. Prints over the serial port and
 * checks what the Multiboot loader handed over. */
#include "rt/rt.h"

int kmain(u32 magic, struct mb_info *mbi)
{
    printf("Hello from a popek guest!\n");
    printf("multiboot magic: %s\n", magic == 0x2BADB002 ? "ok" : "wrong");
    printf("memory info present: %s\n", (mbi->flags & 1) ? "yes" : "no");
    printf("protected mode: %s, paging: %s\n", (read_cr0() & 1) ? "on" : "off",
           (read_cr0() & 0x80000000) ? "on" : "off");
    printf("interrupts at entry: %s\n", (read_eflags() & EFL_IF) ? "enabled" : "disabled");
    return 0;
}
