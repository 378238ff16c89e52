/* Entry of popek's bundled Linux guests (static i386 ELF, no libc). The
 * kernel (popek, or Linux itself under --engine native) leaves argc, argv,
 * envp and auxv on the stack (System V i386 ABI, "Process Initialization"). */
.section .text
.global _start
_start:
    xor %ebp, %ebp
    mov %esp, %eax                  /* &argc */
    and $-16, %esp
    sub $12, %esp
    push %eax
    call urt_start
    hlt                             /* not reached: urt_start exits */

/* long syscall6(nr, a, b, c, d, e, f): int 0x80 with the i386 Linux
 * convention (eax = nr; ebx, ecx, edx, esi, edi, ebp = arguments). */
.global syscall6
syscall6:
    push %ebp
    push %edi
    push %esi
    push %ebx
    mov 20(%esp), %eax
    mov 24(%esp), %ebx
    mov 28(%esp), %ecx
    mov 32(%esp), %edx
    mov 36(%esp), %esi
    mov 40(%esp), %edi
    mov 44(%esp), %ebp
    int $0x80
    pop %ebx
    pop %esi
    pop %edi
    pop %ebp
    ret
