/* triplefault: loads an empty IDT and divides by zero. #DE cannot be
 * delivered (#GP), nor can the #GP (#DF), nor the double fault: the CPU
 * shuts down. QEMU with -no-reboot exits; popek reports a triple fault. */
#include "rt/rt.h"

int kmain(u32 magic, struct mb_info *mbi)
{
    (void)magic;
    (void)mbi;
    static struct { u16 limit; u32 base; } __attribute__((packed)) empty = {0, 0};
    printf("loading an empty IDT and dividing by zero\n");
    __asm__ volatile("lidt %0" : : "m"(empty));
    volatile u32 zero = 0;
    return 10 / zero;
}
