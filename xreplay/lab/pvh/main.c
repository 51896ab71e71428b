/*
 * main.c - xreplay's lab unikernel: a Solo5/MirageOS-style PVH guest for the real Xen lab.
 *
 * Everything after head64.S: console on the HVM debug port 0xE9 (Xen prints it as
 * "(dN) ..."), the hypercall page from Xen's CPUID leaves, shared_info mapped into
 * HYPERVISOR_SHARED_INFO (declared as Solo5 declares it), upcalls on a vector, VIRQ_TIMER,
 * the xenstore and console ports from the HVM params, one interdomain port that dom0
 * floods, and the event loop of the June 2020 xen-devel thread "Event delivery and
 * 'domain blocking' on PVHv2":
 *
 *   solo5__xen_evtchn_vector_handler()  top half, interrupt context: counts and EOIs
 *   evtchn_demux_pending()              bottom half, called from the main loop with
 *                                       interrupts on: clears upcall_pending, xchg's the
 *                                       selector, marks pending & ~mask ports in
 *                                       evtchn_callback_ml[], masks, then clears them
 *   evtchn_test_and_clear()             consumes a mark and unmasks (EVTCHNOP_unmask)
 *   evtchn_block_domain()               the sleep point, "sti; hlt"
 *
 * Variants (xl cmdline "variant=NAME [window_us=N] [period_ms=N]"):
 *   correct            mirage-xen's fix: cli; re-check upcall_pending; window; sti; hlt
 *   lost-upcall        the thread's race: sti; window; hlt. An upcall in the window is
 *                      EOI'd by the top half and the vCPU halts anyway; Xen notifies only
 *                      on the 0->1 edge of evtchn_upcall_pending, so never again.
 *   unmask-no-reraise  clears the mask bit itself instead of EVTCHNOP_unmask: a port that
 *                      went pending while masked is left [1/0/0], never delivered
 *   callback-irq       lost-upcall's racy block, but upcalls through the global
 *                      HVM_PARAM_CALLBACK_IRQ vector, level-triggered on
 *                      evtchn_upcall_pending: the hlt in the window's aftermath does not
 *                      block while the bit is set, so the race does not hang
 * The window is a busy wait of window_us microseconds of Xen system time (the same in
 * every variant; only lost-upcall and callback-irq run it with interrupts on).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <xen/xen.h>
#include <xen/memory.h>
#include <xen/event_channel.h>
#include <xen/vcpu.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/params.h>
#include <xen/arch-x86/hvm/start_info.h>

#define PAGE_SIZE 4096
#define UPCALL_VECTOR 0xf3
#define LAPIC_BASE 0xfee00000ul
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_TPR 0x80
#define NR_PORTS 128           /* the shadow covers selector words 0 and 1 */
#define FLOOD_MIN_PORT 64      /* the flood port lives in selector word 1, see pvh_main */
#define BITS_PER_WORD (sizeof(xen_ulong_t) * 8)

enum variant { CORRECT, LOST_UPCALL, UNMASK_NO_RERAISE, CALLBACK_IRQ };
static const char *const variant_names[] = {
	[CORRECT] = "correct", [LOST_UPCALL] = "lost-upcall",
	[UNMASK_NO_RERAISE] = "unmask-no-reraise", [CALLBACK_IRQ] = "callback-irq",
};

/* Solo5's declaration: the page itself, mapped over by XENMAPSPACE_shared_info. */
uint8_t HYPERVISOR_SHARED_INFO[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE), section(".pages")));
/* mirage-xen's name for the same page. */
extern uint8_t solo5__xen_HYPERVISOR_SHARED_INFO[PAGE_SIZE]
	__attribute__((alias("HYPERVISOR_SHARED_INFO")));
uint8_t hypercall_page[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE), section(".pages")));

/* The "OCaml side" shadow of demuxed ports, as in mirage-xen. */
uint8_t evtchn_callback_ml[NR_PORTS];
/* Counters for the console and for de-duplicating debugger stops. */
volatile uint32_t lab_upcall_count;     /* top halves */
uint32_t lab_demux_count;               /* bottom halves */
uint32_t lab_block_count;               /* evtchn_block_domain() calls */
uint32_t lab_dispatch_count[NR_PORTS];  /* handler runs per port */
uint32_t lab_stray_debug_traps;          /* #DB left by a debugger's single step */
uint32_t lab_hlt_skips;                  /* upcalls taken in the sti shadow, see the top half */
/* Ports, exported for the host (also printed in LAB-READY). */
uint32_t lab_port_xenstore, lab_port_console, lab_port_timer, lab_port_flood;
enum variant lab_variant;
uint64_t lab_window_ns = 2000000;       /* window_us=2000 */
uint64_t lab_period_ns = 10000000;      /* period_ms=10: VIRQ_TIMER re-armed this far ahead */

#define SHARED_INFO() ((struct shared_info *)HYPERVISOR_SHARED_INFO)
#define VCPU0_INFO() (&SHARED_INFO()->vcpu_info[0])
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

extern void upcall_entry(void);
extern void debug_trap_entry(void);
extern void pvh_safe_halt(void);
extern const uint8_t pvh_safe_halt_hlt[];
extern const uint64_t exc_table[32];

/* ----------------------------------------------------------------------- console */

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static void putc(char c) { outb(0xe9, (uint8_t)c); }

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void put_u64(uint64_t v, unsigned base)
{
	char buf[24];
	int n = 0;

	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (n)
		putc(buf[--n]);
}

/* %s %u %d %x (int), %U %X (uint64_t): enough for one line per call. */
static void kprintf(const char *fmt, ...)
{
	__builtin_va_list ap;

	__builtin_va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putc(*fmt);
			continue;
		}
		switch (*++fmt) {
		case 's': puts(__builtin_va_arg(ap, const char *)); break;
		case 'u': put_u64(__builtin_va_arg(ap, unsigned), 10); break;
		case 'x': put_u64(__builtin_va_arg(ap, unsigned), 16); break;
		case 'U': put_u64(__builtin_va_arg(ap, uint64_t), 10); break;
		case 'X': put_u64(__builtin_va_arg(ap, uint64_t), 16); break;
		case 'd': {
			int v = __builtin_va_arg(ap, int);
			if (v < 0) {
				putc('-');
				v = -v;
			}
			put_u64((unsigned)v, 10);
			break;
		}
		default: putc('%'); putc(*fmt); break;
		}
	}
	__builtin_va_end(ap);
}

/* ----------------------------------------------------------------------- cpu */

static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

static inline void lapic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)(LAPIC_BASE + reg) = v;
}

/* ----------------------------------------------------------------------- hypercalls */

/* 64-bit ABI: arguments in rdi, rsi, rdx, r10, r8; the result in rax. */
static long hypercall(unsigned nr, unsigned long a1, unsigned long a2, unsigned long a3)
{
	long ret;
	register unsigned long r10 __asm__("r10") = 0, r8 __asm__("r8") = 0;

	__asm__ volatile("call *%[entry]"
			 : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
			 : [entry] "r"(hypercall_page + nr * 32)
			 : "memory", "rcx", "r11");
	return ret;
}

static long evtchn_op(int cmd, void *arg)
{
	return hypercall(__HYPERVISOR_event_channel_op, (unsigned long)cmd, (unsigned long)arg, 0);
}

static long hvm_op(int cmd, void *arg)
{
	return hypercall(__HYPERVISOR_hvm_op, (unsigned long)cmd, (unsigned long)arg, 0);
}

static void fatal(const char *what, long rc)
{
	kprintf("LAB-ERROR %s rc=%d\n", what, (int)rc);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ----------------------------------------------------------------------- time */

/* Xen system time in ns, extrapolated from the TSC (Xen refreshes vcpu_time_info rarely). */
static uint64_t xen_now_ns(void)
{
	volatile struct vcpu_time_info *t = &VCPU0_INFO()->time;
	uint32_t ver, mul;
	uint64_t st, ts, delta;
	int8_t shift;

	do {
		ver = t->version;
		barrier();
		st = t->system_time;
		ts = t->tsc_timestamp;
		mul = t->tsc_to_system_mul;
		shift = t->tsc_shift;
		barrier();
	} while ((ver & 1) || ver != t->version);
	delta = rdtsc() - ts;
	delta = shift < 0 ? delta >> -shift : delta << shift;
	return st + (uint64_t)(((unsigned __int128)delta * mul) >> 32);
}

static void timer_arm(uint64_t ns_from_now)
{
	struct vcpu_set_singleshot_timer t = { .timeout_abs_ns = xen_now_ns() + ns_from_now };
	long rc = hypercall(__HYPERVISOR_vcpu_op, VCPUOP_set_singleshot_timer, 0, (unsigned long)&t);

	if (rc)
		fatal("VCPUOP_set_singleshot_timer", rc);
}

/* The race window: a busy wait on Xen system time (VM exits on rdtsc let Xen inject). */
static void window(void)
{
	uint64_t end = xen_now_ns() + lab_window_ns;

	while (xen_now_ns() < end)
		__asm__ volatile("pause");
}

/* ----------------------------------------------------------------------- top half */

/* What the CPU pushed for the upcall, as upcall_entry passes it. */
struct irq_frame {
	uint64_t rip, cs, rflags, rsp, ss;
};
#define RFLAGS_IF 0x200ul

/*
 * Interrupt context (IF=0). Like mirage-xen's handler it only acknowledges the upcall:
 * the demux is left to the bottom half, called later from the main loop.
 *
 * The per-vCPU upcall vector comes through the vLAPIC: EOI it. The global callback
 * vector (callback-irq) bypasses the LAPIC and is level-triggered on
 * evtchn_upcall_pending: while that bit is set Xen injects it again at every VM entry
 * with IF=1 (measured: a top half that only returns livelocks the vCPU at the first
 * event, the interrupted instruction never runs). So, as for any level interrupt whose
 * source is cleared later, it stays masked until the bottom half has run: the top half
 * returns with IF clear, and the main loop's next "sti" re-enables it.
 */
void solo5__xen_evtchn_vector_handler(struct irq_frame *frame)
{
	lab_upcall_count++;
	/*
	 * "sti; hlt" relies on the sti shadow: an interrupt pending at the sti is taken after
	 * the hlt, waking it. Measured on the lab (Xen's SVM under QEMU TCG): it is sometimes
	 * taken *before* the hlt, so the iretq would return to a hlt that waits for the next
	 * interrupt (a lost wake-up no guest code can see), or, with IF cleared below, take
	 * the vCPU down (Xen powers the domain off). Skip that hlt: the wake-up it waits for
	 * is this interrupt. Counted, and shown in LAB-ALIVE.
	 */
	if (frame->rip == (uint64_t)(uintptr_t)pvh_safe_halt_hlt) {
		frame->rip += 1;
		lab_hlt_skips++;
	}
	if (lab_variant == CALLBACK_IRQ)
		frame->rflags &= ~RFLAGS_IF;
	else
		lapic_write(LAPIC_EOI, 0);
}
/* The lab guests' name for the top half. */
extern void evtchn_upcall_handler(struct irq_frame *) __attribute__((alias("solo5__xen_evtchn_vector_handler")));

/* ----------------------------------------------------------------------- bottom half */

/* The thread's evtchn_demux_pending(), with a 0-based find-first-set. */
bool evtchn_demux_pending(void)
{
	struct shared_info *s = SHARED_INFO();
	struct vcpu_info *vi = VCPU0_INFO();
	bool some_pending = false;
	xen_ulong_t pending_l1, pending_l2;

	lab_demux_count++;
	WRITE_ONCE(vi->evtchn_upcall_pending, 0);
	pending_l1 = __atomic_exchange_n(&vi->evtchn_pending_sel, 0, __ATOMIC_SEQ_CST);
	while (pending_l1 != 0) {
		unsigned l1i = (unsigned)__builtin_ctzl(pending_l1);

		pending_l1 &= ~(1ul << l1i);
		/* The *current* mask: a port masked since the upcall stays put. */
		while ((pending_l2 = READ_ONCE(s->evtchn_pending[l1i]) &
				     ~READ_ONCE(s->evtchn_mask[l1i])) != 0) {
			unsigned l2i = (unsigned)__builtin_ctzl(pending_l2);
			uint32_t port = l1i * BITS_PER_WORD + l2i;

			if (port < NR_PORTS)
				evtchn_callback_ml[port] = 1;
			__atomic_fetch_or(&s->evtchn_mask[l1i], 1ul << l2i, __ATOMIC_SEQ_CST);
			__atomic_fetch_and(&s->evtchn_pending[l1i], ~(1ul << l2i), __ATOMIC_SEQ_CST);
			some_pending = true;
		}
	}
	return some_pending;
}
extern bool mirage_xen_evtchn_demux_pending(void) __attribute__((alias("evtchn_demux_pending")));

/* mirage_xen_evtchn_test_and_clear(): consume a mark, unmask the port. */
static bool evtchn_test_and_clear(uint32_t port)
{
	if (port >= NR_PORTS || !evtchn_callback_ml[port])
		return false;
	evtchn_callback_ml[port] = 0;
	if (lab_variant == UNMASK_NO_RERAISE) {
		/* BUG: clears the mask bit but never re-raises a port that went pending. */
		__atomic_fetch_and(&SHARED_INFO()->evtchn_mask[port / BITS_PER_WORD],
				   ~(1ul << (port % BITS_PER_WORD)), __ATOMIC_SEQ_CST);
	} else {
		struct evtchn_unmask u = { .port = port };
		long rc = evtchn_op(EVTCHNOP_unmask, &u);
		if (rc)
			fatal("EVTCHNOP_unmask", rc);
	}
	return true;
}

/* ----------------------------------------------------------------------- block */

/*
 * The sleep point. lost-upcall and callback-irq: the thread's original, "sti; hlt" after
 * a check (the main loop's last demux) made with interrupts on, with the window in
 * between. The others: mirage-xen's fix, the re-check with interrupts off.
 */
void evtchn_block_domain(void)
{
	lab_block_count++;
	if (lab_variant == LOST_UPCALL || lab_variant == CALLBACK_IRQ) {
		sti();
		window(); /* an upcall now: the top half EOIs it, nobody demuxes */
		cli();
		pvh_safe_halt();
		return;
	}
	cli();
	if (READ_ONCE(VCPU0_INFO()->evtchn_upcall_pending)) {
		sti();
		return;
	}
	window(); /* an upcall now waits in the LAPIC until the hlt */
	pvh_safe_halt();
}
extern void mirage_xen_evtchn_block_domain(void) __attribute__((alias("evtchn_block_domain")));

/* ----------------------------------------------------------------------- set-up */

struct idt_entry {
	uint16_t off_lo, sel;
	uint8_t ist, type;
	uint16_t off_mid;
	uint32_t off_hi, zero;
} __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed)) idtr;

static void set_gate(int vec, uint64_t fn)
{
	idt[vec] = (struct idt_entry){ .off_lo = fn & 0xffff, .sel = 0x18, .type = 0x8e,
				       .off_mid = (fn >> 16) & 0xffff, .off_hi = fn >> 32 };
}

void pvh_exception(uint64_t vec, uint64_t *frame)
{
	/* frame[0] = vector, then the error code for 8, 10-14, 17, 21, then %rip */
	bool err = vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21;
	kprintf("LAB-ERROR exception %U at rip 0x%X\n", vec, frame[err ? 2 : 1]);
}

static bool word_is(const char *s, const char *key, const char **val)
{
	while (*key && *s == *key) {
		s++;
		key++;
	}
	if (*key)
		return false;
	*val = s;
	return true;
}

static uint64_t parse_u64(const char *s)
{
	uint64_t v = 0;

	while (*s >= '0' && *s <= '9')
		v = v * 10 + (uint64_t)(*s++ - '0');
	return v;
}

static bool token_eq(const char *s, const char *w)
{
	while (*w && *s == *w) {
		s++;
		w++;
	}
	return !*w && (*s == 0 || *s == ' ');
}

/* "variant=NAME window_us=N period_ms=N"; unknown words are ignored. */
static void parse_cmdline(const char *c)
{
	while (*c) {
		const char *v;

		while (*c == ' ')
			c++;
		if (word_is(c, "variant=", &v)) {
			unsigned i;
			for (i = 0; i < sizeof(variant_names) / sizeof(variant_names[0]); i++)
				if (token_eq(v, variant_names[i]))
					break;
			if (i == sizeof(variant_names) / sizeof(variant_names[0]))
				fatal("unknown variant= (correct|lost-upcall|unmask-no-reraise|callback-irq)", -1);
			lab_variant = (enum variant)i;
		} else if (word_is(c, "window_us=", &v)) {
			lab_window_ns = parse_u64(v) * 1000;
		} else if (word_is(c, "period_ms=", &v)) {
			lab_period_ns = parse_u64(v) * 1000000;
		}
		while (*c && *c != ' ')
			c++;
	}
}

static void hypercall_page_init(void)
{
	uint32_t base, a, b, c, d;

	for (base = 0x40000000; base < 0x40010000; base += 0x100) {
		cpuid(base, &a, &b, &c, &d);
		if (b == 0x566e6558 && c == 0x65584d4d && d == 0x4d4d566e) /* "XenVMMXenVMM" */
			break;
	}
	if (base >= 0x40010000)
		fatal("no Xen CPUID leaves", -1);
	cpuid(base + 1, &a, &b, &c, &d);
	uint32_t version = a;
	cpuid(base + 2, &a, &b, &c, &d); /* a = number of pages, b = the MSR */
	wrmsr(b, (uint64_t)(uintptr_t)hypercall_page);
	kprintf("LAB-BOOT Xen %u.%u, CPUID base 0x%x, hypercall page MSR 0x%x\n",
		version >> 16, version & 0xffff, base, b);
}

static void shared_info_init(void)
{
	struct xen_add_to_physmap xatp = {
		.domid = DOMID_SELF, .space = XENMAPSPACE_shared_info, .idx = 0,
		.gpfn = (uintptr_t)HYPERVISOR_SHARED_INFO >> 12,
	};
	long rc = hypercall(__HYPERVISOR_memory_op, XENMEM_add_to_physmap, (unsigned long)&xatp, 0);

	if (rc)
		fatal("XENMEM_add_to_physmap(shared_info)", rc);
}

static uint64_t hvm_param(uint32_t index)
{
	struct xen_hvm_param p = { .domid = DOMID_SELF, .index = index };
	long rc = hvm_op(HVMOP_get_param, &p);

	if (rc)
		fatal("HVMOP_get_param", rc);
	return p.value;
}

static void upcalls_init(void)
{
	for (int i = 0; i < 32; i++)
		set_gate(i, exc_table[i]);
	set_gate(1, (uint64_t)(uintptr_t)debug_trap_entry);
	set_gate(UPCALL_VECTOR, (uint64_t)(uintptr_t)upcall_entry);
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (uint64_t)(uintptr_t)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr));
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, 0x1ff); /* software-enable, spurious vector 0xff */
	long rc;
	if (lab_variant == CALLBACK_IRQ) {
		/* The global callback: Xen injects it while evtchn_upcall_pending is set. */
		struct xen_hvm_param p = {
			.domid = DOMID_SELF, .index = HVM_PARAM_CALLBACK_IRQ,
			.value = ((uint64_t)HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | UPCALL_VECTOR,
		};
		rc = hvm_op(HVMOP_set_param, &p);
		if (rc)
			fatal("HVMOP_set_param(HVM_PARAM_CALLBACK_IRQ)", rc);
	} else {
		/* The seed's: per-vCPU, through the vLAPIC, on the 0->1 edge only. */
		struct xen_hvm_evtchn_upcall_vector uv = { .vcpu = 0, .vector = UPCALL_VECTOR };
		rc = hvm_op(HVMOP_set_evtchn_upcall_vector, &uv);
		if (rc)
			fatal("HVMOP_set_evtchn_upcall_vector", rc);
	}
}

static void unmask(uint32_t port)
{
	struct evtchn_unmask u = { .port = port };
	long rc = evtchn_op(EVTCHNOP_unmask, &u);

	if (rc)
		fatal("EVTCHNOP_unmask", rc);
}

static void ports_init(void)
{
	struct shared_info *s = SHARED_INFO();
	long rc;

	/* Solo5: everything masked first; a port is unmasked once something listens on it. */
	for (unsigned i = 0; i < sizeof(s->evtchn_mask) / sizeof(s->evtchn_mask[0]); i++)
		s->evtchn_mask[i] = ~0ul;
	lab_port_xenstore = (uint32_t)hvm_param(HVM_PARAM_STORE_EVTCHN);
	lab_port_console = (uint32_t)hvm_param(HVM_PARAM_CONSOLE_EVTCHN); /* stays masked */

	rc = hypercall(__HYPERVISOR_vcpu_op, VCPUOP_stop_periodic_timer, 0, 0);
	if (rc)
		fatal("VCPUOP_stop_periodic_timer", rc);
	struct evtchn_bind_virq bv = { .virq = VIRQ_TIMER, .vcpu = 0 };
	rc = evtchn_op(EVTCHNOP_bind_virq, &bv);
	if (rc)
		fatal("EVTCHNOP_bind_virq(VIRQ_TIMER)", rc);
	lab_port_timer = bv.port;

	/*
	 * The flood port: unbound, for dom0 to bind and kick. It is put in selector word 1
	 * (ports 64-127 on x86_64) by allocating and closing the ports below 64, so that an
	 * event on the timer port (word 0) never demuxes it by accident: a stranded port
	 * (unmask-no-reraise) stays stranded, as a netfront port next to a quiet word would.
	 */
	uint32_t spare[FLOOD_MIN_PORT], nspare = 0;
	for (;;) {
		struct evtchn_alloc_unbound au = { .dom = DOMID_SELF, .remote_dom = 0 };
		rc = evtchn_op(EVTCHNOP_alloc_unbound, &au);
		if (rc)
			fatal("EVTCHNOP_alloc_unbound", rc);
		if (au.port >= FLOOD_MIN_PORT) {
			lab_port_flood = au.port;
			break;
		}
		spare[nspare++] = au.port;
	}
	for (uint32_t i = 0; i < nspare; i++) {
		struct evtchn_close cl = { .port = spare[i] };
		rc = evtchn_op(EVTCHNOP_close, &cl);
		if (rc)
			fatal("EVTCHNOP_close", rc);
	}
	unmask(lab_port_xenstore);
	unmask(lab_port_timer);
	unmask(lab_port_flood);
}

/* ----------------------------------------------------------------------- main loop */

static void handle_ports(void)
{
	if (evtchn_test_and_clear(lab_port_timer)) {
		lab_dispatch_count[lab_port_timer]++;
		timer_arm(lab_period_ns);
	}
	if (evtchn_test_and_clear(lab_port_flood))
		lab_dispatch_count[lab_port_flood]++;
	if (evtchn_test_and_clear(lab_port_xenstore))
		lab_dispatch_count[lab_port_xenstore]++;
}

/* [p/m/s] of a port as Xen's 'e' key prints it (s: the selector bit of its word). */
static void port_state(uint32_t port, unsigned *p, unsigned *m, unsigned *s)
{
	struct shared_info *si = SHARED_INFO();
	unsigned w = port / BITS_PER_WORD, b = port % BITS_PER_WORD;

	*p = (READ_ONCE(si->evtchn_pending[w]) >> b) & 1;
	*m = (READ_ONCE(si->evtchn_mask[w]) >> b) & 1;
	*s = (READ_ONCE(VCPU0_INFO()->evtchn_pending_sel) >> w) & 1;
}

static void report(const char *tag)
{
	static uint32_t last_flood = ~0u;
	unsigned p, m, s;

	kprintf("%s variant=%s upcalls=%u bottom_halves=%u blocks=%u timer=%u flood=%u "
		"xenstore=%u stray_debug_traps=%u hlt_skips=%u now_ms=%U\n",
		tag, variant_names[lab_variant], lab_upcall_count, lab_demux_count, lab_block_count,
		lab_dispatch_count[lab_port_timer], lab_dispatch_count[lab_port_flood],
		lab_dispatch_count[lab_port_xenstore], lab_stray_debug_traps, lab_hlt_skips,
		xen_now_ns() / 1000000);
	/* A port pending, unmasked and without selector bit for a whole second is deaf. */
	port_state(lab_port_flood, &p, &m, &s);
	if (p && !m && !s && !READ_ONCE(VCPU0_INFO()->evtchn_upcall_pending) &&
	    lab_dispatch_count[lab_port_flood] == last_flood)
		kprintf("LAB-STRANDED port=%u [%u/%u/%u] flood=%u\n", lab_port_flood, p, m, s,
			last_flood);
	last_flood = lab_dispatch_count[lab_port_flood];
}

void pvh_main(struct hvm_start_info *si)
{
	const char *cmdline = si->cmdline_paddr ? (const char *)(uintptr_t)si->cmdline_paddr : "";

	parse_cmdline(cmdline);
	kprintf("LAB-START variant=%s window_us=%U period_ms=%U cmdline=\"%s\"\n",
		variant_names[lab_variant], lab_window_ns / 1000, lab_period_ns / 1000000, cmdline);
	if (si->magic != XEN_HVM_START_MAGIC_VALUE)
		fatal("bad hvm_start_info magic", (long)si->magic);
	hypercall_page_init();
	shared_info_init();
	upcalls_init();
	ports_init();
	kprintf("LAB-READY variant=%s layout=x86_64 vector=0x%x delivery=%s xenstore=%u "
		"console=%u timer=%u flood=%u\n",
		variant_names[lab_variant], UPCALL_VECTOR,
		lab_variant == CALLBACK_IRQ ? "callback-irq" : "upcall-vector",
		lab_port_xenstore, lab_port_console, lab_port_timer, lab_port_flood);

	timer_arm(lab_period_ns);
	sti(); /* the main loop runs with interrupts on, as the OCaml side does */
	uint64_t next_report = xen_now_ns() + 1000000000ull;
	for (;;) {
		if (evtchn_demux_pending())
			handle_ports();
		sti(); /* callback-irq: the top half left interrupts off until here */
		uint64_t now = xen_now_ns();
		if (now >= next_report) {
			report("LAB-ALIVE");
			next_report = now + 1000000000ull;
		}
		evtchn_block_domain();
	}
}
