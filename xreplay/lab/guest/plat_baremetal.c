/*
 * plat_baremetal.c - the lab as a 32-bit multiboot guest under QEMU TCG.
 *
 * Real interrupts, real sti/hlt. The upcall is a real LAPIC interrupt on
 * vector 32: the hypervisor model injects it with a self-IPI (ICR, destination
 * shorthand "self", fixed delivery), which sets the vector in the LAPIC's IRR
 * like Xen's vlapic_set_irq(); the top half EOIs it. What the guest sees:
 *   - with IF=1 the interrupt is taken at once (at the next TCG block boundary,
 *     which a `ret` always ends), e.g. inside hv_window(), before the hlt;
 *   - with IF=0 it waits in the IRR and "sti; hlt" takes it at the hlt (the
 *     sti shadow makes the pair atomic), so the hlt returns;
 *   - if nothing is ever injected, the hlt never returns: QEMU idles for ever.
 * The legacy PICs are masked and the LAPIC timer/LINTs too: no other source.
 *
 * Console: COM1 (0x3f8). Exit: isa-debug-exit at 0xf4, QEMU's status is
 * (code << 1) | 1, so a clean finish (code 0) makes qemu exit with 1.
 */
#include "lab.h"

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4

#define LAPIC_BASE 0xfee00000u
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_IRR 0x200
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LVT_MASKED (1u << 16)
#define ICR_BUSY (1u << 12)
#define ICR_ASSERT (1u << 14)
#define ICR_SELF (1u << 18)
#define SPURIOUS_VECTOR 0xff

struct multiboot_info {
	uint32_t flags;
	uint32_t mem_lower, mem_upper, boot_device;
	uint32_t cmdline; /* valid if flags bit 2 */
};

struct trap_frame { /* pushal, then what the stubs and the CPU pushed */
	uint32_t edi, esi, ebp, esp, ebx, edx, ecx, eax;
	uint32_t vector, error, eip, cs, eflags;
};

struct idt_gate {
	uint16_t off_lo, sel;
	uint8_t zero, type;
	uint16_t off_hi;
} __attribute__((packed));

struct idt_ptr {
	uint16_t limit;
	uint32_t base;
} __attribute__((packed));

extern void lab_upcall_entry(void), lab_irq_spurious(void), lab_irq_other(void);
extern void (*const lab_exc_stubs[32])(void);

static struct idt_gate idt[256] __attribute__((aligned(8)));
/* EIP interrupted by the last upcall (in the window, or just after a hlt). */
LAB_DATA volatile uint32_t lab_irq_eip;

/* freestanding: the compiler may call these */
void *memset(void *d, int c, unsigned n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline void lapic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)(LAPIC_BASE + reg) = v;
}

static inline uint32_t lapic_read(uint32_t reg)
{
	return *(volatile uint32_t *)(LAPIC_BASE + reg);
}

static void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* no UART interrupts */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xc7); /* FIFO on */
	outb(COM1 + 4, 0x03);
}

void plat_putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, (uint8_t)c);
}

void plat_flush(void)
{
}

void plat_exit(int code)
{
	outl(DEBUG_EXIT_PORT, (uint32_t)code);
	for (;;)
		__asm__ __volatile__("cli; hlt");
}

void plat_cli(void)
{
	__asm__ __volatile__("cli" ::: "memory");
}

void plat_sti(void)
{
	__asm__ __volatile__("sti" ::: "memory");
}

void plat_safe_halt(void)
{
	if (!hv_vcpu_block())
		for (;;)
			__asm__ __volatile__("sti; hlt" ::: "memory"); /* nothing will come */
	__asm__ __volatile__("sti; hlt" ::: "memory");
}

/* The hypervisor's vlapic_set_irq(32): a fixed self-IPI. */
void plat_raise_upcall(void)
{
	lapic_write(LAPIC_ICR_HI, 0);
	lapic_write(LAPIC_ICR_LO, ICR_SELF | ICR_ASSERT | LAB_UPCALL_VECTOR);
	while (lapic_read(LAPIC_ICR_LO) & ICR_BUSY)
		;
}

void plat_eoi(void)
{
	lapic_write(LAPIC_EOI, 0);
}

bool plat_upcall_in_irr(void)
{
	return (lapic_read(LAPIC_IRR + 0x10 * (LAB_UPCALL_VECTOR / 32)) >>
		(LAB_UPCALL_VECTOR % 32)) & 1;
}

void lab_trap(const struct trap_frame *f)
{
	lab_printf("LAB-FAULT vector=%x error=%x eip=%x\n", f->vector, f->error, f->eip);
	plat_exit(3);
}

static void idt_set(unsigned v, void (*fn)(void))
{
	uint32_t off = (uint32_t)fn;

	idt[v].off_lo = (uint16_t)off;
	idt[v].sel = 0x08;
	idt[v].zero = 0;
	idt[v].type = 0x8e; /* present, DPL 0, 32-bit interrupt gate */
	idt[v].off_hi = (uint16_t)(off >> 16);
}

void lab_boot(uint32_t magic, const struct multiboot_info *mbi)
{
	static const struct idt_ptr *p;
	static struct idt_ptr idtr;
	const char *cmdline = "";

	serial_init();
	for (unsigned v = 0; v < 256; v++)
		idt_set(v, v < 32 ? lab_exc_stubs[v] : lab_irq_other);
	idt_set(LAB_UPCALL_VECTOR, lab_upcall_entry);
	idt_set(SPURIOUS_VECTOR, lab_irq_spurious);
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (uint32_t)idt;
	p = &idtr;
	__asm__ __volatile__("lidt (%0)" : : "r"(p) : "memory");

	/* Only the LAPIC may interrupt: mask both 8259s and every LVT entry. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software-enable */
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
	lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);

	if (magic == 0x2badb002 && (mbi->flags & (1u << 2)))
		cmdline = (const char *)mbi->cmdline;
	lab_main(cmdline);
}
