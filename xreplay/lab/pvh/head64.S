/*
 * head64.S - PVH entry of xreplay's lab unikernel, and its interrupt stubs.
 *
 * Xen enters at the XEN_ELFNOTE_PHYS32_ENTRY address in 32-bit protected mode, paging
 * off, %ebx = physical address of struct hvm_start_info. We load our own GDT, identity-map
 * 0..4 GiB with 2 MiB pages (the LAPIC at 0xfee00000 included), enable PAE, EFER.LME and
 * paging, and call pvh_main(start_info) in 64-bit mode, as Solo5's bindings/xen do. Long
 * mode before the first hypercall matters: Xen latches the guest's shared_info layout
 * (x86_32 or x86_64) from its mode when it registers the hypercall page or maps
 * shared_info (hvm_latch_shinfo_size), see README.md.
 */
#include <xen/elfnote.h>

#define CODE32_SEL 0x08
#define DATA_SEL   0x10
#define CODE64_SEL 0x18

        .section .note.Xen, "a", @note
        .p2align 2
        .long 4                         /* name size: "Xen\0" */
        .long 4                         /* desc size */
        .long XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .p2align 2
        .long pvh_start
        .p2align 2

        .text
        .code32
        .globl pvh_start
pvh_start:
        cli
        cld
        movl %ebx, %edi                 /* hvm_start_info: first argument of pvh_main */
        lgdt gdt_desc
        ljmp $CODE32_SEL, $1f
1:      movw $DATA_SEL, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $boot_stack_top, %esp
        /* pml4[0] -> pdpt; pdpt[i] -> pd + i * 4 KiB (i < 4); pd[j] = j * 2 MiB | PS|RW|P */
        movl $pdpt, %eax
        orl $3, %eax
        movl %eax, pml4
        xorl %ecx, %ecx
2:      movl %ecx, %eax
        shll $12, %eax
        addl $pd, %eax
        orl $3, %eax
        movl %eax, pdpt(,%ecx,8)
        incl %ecx
        cmpl $4, %ecx
        jne 2b
        xorl %ecx, %ecx
3:      movl %ecx, %eax
        shll $21, %eax
        orl $0x83, %eax
        movl %eax, pd(,%ecx,8)
        incl %ecx
        cmpl $2048, %ecx
        jne 3b
        movl $pml4, %eax
        movl %eax, %cr3
        movl %cr4, %eax
        orl $0x20, %eax                 /* CR4.PAE */
        movl %eax, %cr4
        movl $0xc0000080, %ecx          /* EFER */
        rdmsr
        orl $0x100, %eax                /* EFER.LME */
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
        movl %eax, %cr0
        ljmp $CODE64_SEL, $4f

        .code64
4:      movw $DATA_SEL, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movq $boot_stack_top, %rsp
        movl %edi, %edi                 /* the upper half is undefined after the switch */
        call pvh_main
5:      cli                             /* in a PVH guest: the vCPU goes down, the */
        hlt                             /* domain powers off */
        jmp 5b

/*
 * The upcall vector's entry: save the caller-saved registers, run the C top half with a
 * pointer to the interrupt frame (it may clear IF in the saved rflags), iretq.
 * On entry the CPU aligned %rsp to 16 and pushed 5 quadwords; 9 more keep it aligned.
 */
        .globl upcall_entry
upcall_entry:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        cld
        leaq 72(%rsp), %rdi             /* the CPU's frame: rip, cs, rflags, rsp, ss */
        call solo5__xen_evtchn_vector_handler
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rax
        iretq

/* The block instruction pair: "sti; hlt" (the sti shadow covers the hlt, so an interrupt
 * already pending in the LAPIC wakes the hlt instead of running before it). */
        .globl pvh_safe_halt, pvh_safe_halt_hlt
pvh_safe_halt:
        sti
pvh_safe_halt_hlt:
        hlt
        ret

/*
 * #DB from a debugger's leftover single step: after gdbsx detaches, Xen stops
 * intercepting #DB, and a TF bit that a step under gdbsx left in a saved rflags (an
 * interrupt taken mid-step pushes it) traps in the guest (measured: "exception 1" right
 * after a recording). Clear TF in the frame, count it, return: the guest runs on.
 */
        .globl debug_trap_entry
debug_trap_entry:
        btrq $8, 16(%rsp)               /* frame: rip, cs, rflags, rsp, ss */
        lock incl lab_stray_debug_traps(%rip)
        iretq

/* Exceptions 0-31: report the vector and the faulting %rip, then stop the vCPU. */
        .macro EXC n
exc\n:  pushq $\n
        jmp exc_common
        .endm
        .irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXC \n
        .endr
exc_common:
        movq (%rsp), %rdi               /* vector */
        movq %rsp, %rsi                 /* the frame (error code or not) */
        andq $-16, %rsp
        call pvh_exception
6:      cli
        hlt
        jmp 6b

        .section .rodata
        .globl exc_table
        .p2align 3
exc_table:
        .irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad exc\n
        .endr

        .data
        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff        /* 0x08: flat 32-bit code */
        .quad 0x00cf92000000ffff        /* 0x10: flat data */
        .quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt

        .section .note.GNU-stack, "", @progbits

        .section .pages, "aw", @nobits
        .p2align 12
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096

        .bss
        .p2align 4
boot_stack:
        .skip 32768
boot_stack_top:
