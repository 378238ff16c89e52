/* Interrupt entry stubs: a uniform frame for the C dispatcher. */
.section .text

.macro ISR_NOERR n
.global isr\n
isr\n:
    push $0
    push $\n
    jmp isr_common
.endm

.macro ISR_ERR n
.global isr\n
isr\n:
    push $\n
    jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
/* Device interrupts, for a kernel that remaps the PICs to 0x20-0x2F. */
ISR_NOERR 32
ISR_NOERR 33
ISR_NOERR 34
ISR_NOERR 35
ISR_NOERR 36
ISR_NOERR 37
ISR_NOERR 38
ISR_NOERR 39
ISR_NOERR 40
ISR_NOERR 41
ISR_NOERR 42
ISR_NOERR 43
ISR_NOERR 44
ISR_NOERR 45
ISR_NOERR 46
ISR_NOERR 47
ISR_NOERR 48
ISR_NOERR 64

isr_common:
    pusha
    mov %ds, %eax
    push %eax
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    push %esp                       /* struct frame * */
    cld
    call isr_dispatch
    add $4, %esp
    pop %eax
    mov %ax, %ds
    mov %ax, %es
    popa
    add $8, %esp                    /* vector, error code */
    iret

/* enter_user(eip, esp, eflags): run ring-3 code until it calls
   user_return (via INT 0x30 with EAX = 0). */
.global enter_user
enter_user:
    push %ebp
    push %ebx
    push %esi
    push %edi
    mov %esp, kernel_saved_esp
    mov 20(%esp), %ecx              /* eip */
    mov 24(%esp), %edx              /* esp */
    mov 28(%esp), %eax              /* eflags */
    mov $0x23, %bx
    mov %bx, %ds
    mov %bx, %es
    push $0x23                      /* ss */
    push %edx                       /* esp */
    push %eax                       /* eflags */
    push $0x1B                      /* cs */
    push %ecx                       /* eip */
    iret

/* Called from the INT 0x30 handler (ring 0) to abandon the user context. */
.global resume_kernel
resume_kernel:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov kernel_saved_esp, %esp
    pop %edi
    pop %esi
    pop %ebx
    pop %ebp
    ret

.section .bss
.align 4
kernel_saved_esp: .long 0
