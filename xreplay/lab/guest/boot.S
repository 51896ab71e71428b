/*
 * boot.S - entry of the bare-metal lab guest: a multiboot v1 header (QEMU's
 * -kernel loads it as an ELF32), a flat GDT, a stack, and the interrupt stubs.
 * Protected mode, no paging.
 */
#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00000000 /* ELF loader, no module/memory requests */

	.section .multiboot, "a"
	.p2align 2
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .bss
	.p2align 4
boot_stack:
	.skip 16384
boot_stack_top:

	.section .rodata
	.p2align 3
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff /* 0x08: flat 32-bit ring-0 code */
	.quad 0x00cf92000000ffff /* 0x10: flat ring-0 data */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.text
	.globl _start
	.type _start, @function
_start:
	/* eax = multiboot magic, ebx = multiboot info; IF=0 */
	cli
	cld
	movl %eax, %ebp
	lgdt gdt_desc
	ljmp $0x08, $1f
1:	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %fs
	movw %ax, %gs
	movw %ax, %ss
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	xorl %eax, %eax
	rep stosb
	movl $boot_stack_top, %esp
	pushl %ebx
	pushl %ebp
	call lab_boot
2:	cli
	hlt
	jmp 2b
	.size _start, . - _start

/*
 * Vector 32, the event-channel upcall (HVMOP_set_evtchn_upcall_vector).
 * Interrupt gate: IF=0 inside. Records the interrupted EIP for diagnostics.
 */
	.globl lab_upcall_entry
	.type lab_upcall_entry, @function
lab_upcall_entry:
	pushal
	cld
	movl 32(%esp), %eax
	movl %eax, lab_irq_eip
	call evtchn_upcall_handler
	popal
	iret
	.size lab_upcall_entry, . - lab_upcall_entry

/* LAPIC spurious vector: no EOI. */
	.globl lab_irq_spurious
lab_irq_spurious:
	iret

/* Any other vector: nothing else is wired up, so report it and stop. */
	.globl lab_irq_other
lab_irq_other:
	pushl $0
	pushl $0x100
	jmp trap_common

/* CPU exceptions 0-31: push (error code, vector), then trap_common. */
.irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
exc_\v:
	pushl $0
	pushl $\v
	jmp trap_common
.endr
.irp v, 8,10,11,12,13,14,17,21,29,30
exc_\v:
	pushl $\v
	jmp trap_common
.endr

trap_common:
	pushal
	cld
	pushl %esp
	call lab_trap
3:	cli
	hlt
	jmp 3b

	.section .rodata
	.p2align 2
	.globl lab_exc_stubs
lab_exc_stubs:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.long exc_\v
.endr

	.section .note.GNU-stack, "", @progbits
