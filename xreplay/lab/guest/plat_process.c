/*
 * plat_process.c - the lab as an x86_64 Linux program, to run under gdbserver.
 *
 * A process has no interrupts to give, so the vCPU's EFLAGS.IF and the LAPIC's
 * IRR/ISR bits for the upcall vector are modelled here and the interrupt
 * boundaries are explicit: an injected upcall is delivered (the top half is
 * called, with IF=0, as from an interrupt gate) at once if IF=1, else at the
 * next sti or "sti; hlt". Until the guest EOIs, ISR blocks the vector, as on a
 * real LAPIC. A vCPU that nothing can wake sleeps in pause() for ever.
 *
 * No wall-clock time is used anywhere: a run depends only on its arguments.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lab.h"

/* The modelled CPU/LAPIC state, visible to a debugger. */
LAB_DATA bool lab_cpu_if;
LAB_DATA bool lab_lapic_irr; /* upcall vector requested */
LAB_DATA bool lab_lapic_isr; /* upcall vector in service (until EOI) */

static char outbuf[1024];
static size_t outlen;

void plat_flush(void)
{
	size_t off = 0;

	while (off < outlen) {
		ssize_t n = write(STDOUT_FILENO, outbuf + off, outlen - off);
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	outlen = 0;
}

void plat_putc(char c)
{
	outbuf[outlen++] = c;
	if (c == '\n' || outlen == sizeof(outbuf))
		plat_flush();
}

void plat_exit(int code)
{
	plat_flush();
	exit(code);
}

/* An interrupt boundary: take the upcall vector if the CPU and the LAPIC allow it. */
static void lab_check_irq(void)
{
	if (lab_cpu_if && lab_lapic_irr && !lab_lapic_isr) {
		lab_lapic_irr = false;
		lab_lapic_isr = true;
		lab_cpu_if = false; /* interrupt gate */
		evtchn_upcall_handler();
		lab_cpu_if = true; /* iret */
	}
}

void plat_cli(void)
{
	lab_cpu_if = false;
}

void plat_sti(void)
{
	lab_cpu_if = true;
	lab_check_irq();
}

void plat_safe_halt(void)
{
	if (!hv_vcpu_block())
		for (;;)
			pause(); /* blocked for ever: no signal is coming */
	plat_sti();      /* the pending upcall is the wake-up */
}

void plat_raise_upcall(void)
{
	lab_lapic_irr = true;
	lab_check_irq();
}

void plat_eoi(void)
{
	lab_lapic_isr = false;
}

bool plat_upcall_in_irr(void)
{
	return lab_lapic_irr;
}

int main(int argc, char **argv)
{
	static char cmdline[4096];
	size_t len = 0;

	for (int i = 1; i < argc; i++) {
		size_t n = strlen(argv[i]);
		if (len + n + 2 > sizeof(cmdline))
			break;
		if (len)
			cmdline[len++] = ' ';
		memcpy(cmdline + len, argv[i], n);
		len += n;
	}
	cmdline[len] = 0;
	lab_main(cmdline);
}
