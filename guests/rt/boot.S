/* Multiboot v1 entry for popek's bundled guests. */
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x00000003          /* page-align modules, memory info */

.section .multiboot, "a"
.align 4
.long MB_MAGIC
.long MB_FLAGS
.long -(MB_MAGIC + MB_FLAGS)

.section .text
.global _start
_start:
    mov $stack_top, %esp
    push %ebx                       /* multiboot info */
    push %eax                       /* magic */
    call rt_start
1:  cli
    hlt
    jmp 1b

.section .bss
.align 16
.global stack_top
stack:  .skip 32768
stack_top:
