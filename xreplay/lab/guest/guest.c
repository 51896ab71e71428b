/*
 * guest.c - the guest side of the lab, modelled on the Solo5/MirageOS PVH code
 * quoted in the xen-devel thread "Event delivery and 'domain blocking' on
 * PVHv2" (June 2020) and on what mirage-xen finally shipped
 * (lib/bindings/evtchn.c):
 *
 *   evtchn_upcall_handler()  top half, interrupt context: only EOIs the vector
 *   evtchn_demux_pending()   bottom half, called from the main loop: clears
 *                            upcall_pending, xchg's the selector, marks each
 *                            pending & ~mask port in evtchn_callback_ml[],
 *                            masks it and clears it in Xen's bitmap
 *   evtchn_test_and_clear()  consumes a shadow mark and unmasks the port
 *                            (EVTCHNOP_unmask), then its handler runs
 *   evtchn_block_domain()    the sleep point (sti ... hlt)
 *
 * One bug per variant, chosen at start (variant=NAME):
 *   correct            mirage-xen's fix: cli; re-check upcall_pending; sti; hlt
 *   lost-upcall        sti; <window>; hlt: an upcall landing in the window is EOI'd
 *                      by the top half, the bottom half never runs, and Xen never
 *                      notifies again (upcall_pending stays 1): blocked for ever
 *                      with ports [1/0/1]
 *   unmask-no-reraise  the guest clears the mask bit itself instead of calling
 *                      EVTCHNOP_unmask: a port that became pending while masked
 *                      is left pending, unmasked, without selector bit: deaf
 *   ffs-off-by-one     the bottom half's "find next port" uses libc's 1-based
 *                      ffs() as a 0-based index: see demux_word_ffs_bug()
 *   fifo               the FIFO ABI (Linux's events_fifo.c consumption), correct;
 *                      half way through it binds port 1100, which needs a second
 *                      event-array page (expand_array), and Xen raises it once
 *   fifo-lost-link     the FIFO ABI with clear_linked() as a plain read and store:
 *                      a LINK Xen sets between the two is wiped, and the queue's
 *                      events behind it are never seen (see fifo_clear_linked())
 */
#include <stdarg.h>

#include "lab.h"

/* Guest-side virtual-time costs, in hypervisor ticks (see hv.c). */
#define LAB_DISPATCH_COST 5 /* main loop between the bottom half and the handlers */
#define LAB_HANDLER_COST 20 /* one handler run ... */
#define LAB_ITEM_COST 2     /* ... plus this per ring item it consumes */

#if defined(LAB_STYLE_SOLO5)
/* Solo5 bindings/xen: a page-sized byte array; mirage-xen reaches it by its alias. */
LAB_DATA uint8_t HYPERVISOR_SHARED_INFO[4096] __attribute__((aligned(4096)));
extern uint8_t solo5__xen_HYPERVISOR_SHARED_INFO[4096]
	__attribute__((alias("HYPERVISOR_SHARED_INFO")));
#elif defined(LAB_STYLE_MINIOS)
/* Mini-OS: a pointer to the page, set when the guest maps it at boot. */
LAB_DATA lab_shared_info_t lab_shared_page __attribute__((aligned(4096)));
#if defined(LAB_SHINFO_STATIC)
LAB_DATA lab_shared_info_t *HYPERVISOR_shared_info = &lab_shared_page;
#else
LAB_DATA lab_shared_info_t *HYPERVISOR_shared_info;
#endif
#else
/* The shared_info page itself (not a pointer). */
LAB_DATA lab_shared_info_t HYPERVISOR_shared_info __attribute__((aligned(4096)));
#endif
/* The "OCaml side" shadow of pending ports, as in mirage-xen. */
LAB_DATA uint8_t evtchn_callback_ml[LAB_NR_PORTS];
/* Handler runs per port. */
LAB_DATA uint32_t lab_dispatch_count[LAB_NR_PORTS];
/* Ring items consumed per port (producers: lab_backend_prod in hv.c). */
LAB_DATA uint32_t lab_guest_cons[LAB_TRACKED_PORTS];

LAB_DATA enum lab_variant lab_variant;
LAB_DATA uint64_t lab_seed;
LAB_DATA uint32_t lab_events;
/* Probe counters: a snapshot can carry them to de-duplicate gdb stops. */
LAB_DATA volatile uint32_t lab_upcall_count; /* top halves */
LAB_DATA uint32_t lab_demux_count;           /* bottom halves */
LAB_DATA uint32_t lab_block_count;           /* evtchn_block_domain() calls */

static const char *const variant_names[] = {
	[LAB_CORRECT] = "correct",
	[LAB_LOST_UPCALL] = "lost-upcall",
	[LAB_UNMASK_NO_RERAISE] = "unmask-no-reraise",
	[LAB_FFS_OFF_BY_ONE] = "ffs-off-by-one",
	[LAB_FIFO] = "fifo",
	[LAB_FIFO_LOST_LINK] = "fifo-lost-link",
};
/* The guest's copy of each queue's head (Linux: per_cpu(cpu_queue).head[]). */
LAB_DATA uint32_t lab_fifo_queue_head[LAB_FIFO_MAX_QUEUES];

/* Ports the guest listens on (the console is bound but left masked). */
static const uint32_t lab_listen_ports[] = {LAB_PORT_XENSTORE, LAB_PORT_TIMER, LAB_PORT_NETFRONT};
#define LAB_NLISTEN (sizeof(lab_listen_ports) / sizeof(lab_listen_ports[0]))

const char *lab_variant_name(enum lab_variant v)
{
	return variant_names[v];
}

/* ------------------------------------------------------------------------- */
/* Console: a tiny printf of our own, so both builds print byte-identical text. */

static void put_str(const char *s, int width)
{
	int n = 0;

	for (const char *p = s; *p; p++)
		n++;
	for (; n < width; n++)
		plat_putc(' ');
	while (*s)
		plat_putc(*s++);
}

static void put_u64(uint64_t v, unsigned base, int width)
{
	char buf[24];
	int i = (int)sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (base == 16) {
		buf[--i] = 'x';
		buf[--i] = '0';
	}
	put_str(&buf[i], width);
}

/* %s %u %d %x (int-sized), %U %X (uint64_t), optional decimal width. */
void lab_printf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		int width = 0;
		if (*fmt != '%') {
			plat_putc(*fmt);
			continue;
		}
		while (fmt[1] >= '0' && fmt[1] <= '9')
			width = width * 10 + (*++fmt - '0');
		switch (*++fmt) {
		case 's':
			put_str(va_arg(ap, const char *), width);
			break;
		case 'u':
			put_u64(va_arg(ap, unsigned), 10, width);
			break;
		case 'd': {
			int v = va_arg(ap, int);
			if (v < 0) {
				plat_putc('-');
				v = -v;
			}
			put_u64((unsigned)v, 10, width);
			break;
		}
		case 'x':
			put_u64(va_arg(ap, unsigned), 16, width);
			break;
		case 'U':
			put_u64(va_arg(ap, uint64_t), 10, width);
			break;
		case 'X':
			put_u64(va_arg(ap, uint64_t), 16, width);
			break;
		case '%':
			plat_putc('%');
			break;
		default:
			return; /* malformed format: stop rather than read garbage */
		}
	}
	va_end(ap);
}

uint32_t lab_handled(void)
{
	uint32_t n = 0;

	for (unsigned i = 0; i < LAB_NLISTEN; i++)
		n += lab_guest_cons[lab_listen_ports[i]];
	return n;
}

/* One summary line; `outstanding` lists ring items produced but not consumed. */
void lab_report(const char *tag)
{
	lab_printf("%s variant=%s seed=%U events=%u handled=%u upcalls=%u bottom_halves=%u "
		   "blocks=%u vtime=%U outstanding=",
		   tag, lab_variant_name(lab_variant), lab_seed, lab_events, lab_handled(),
		   lab_upcall_count, lab_demux_count, lab_block_count, hv_now());
	const char *sep = "";
	for (unsigned i = 0; i < LAB_NLISTEN; i++) {
		uint32_t p = lab_listen_ports[i];
		lab_printf("%s%u:%u", sep, p, READ_ONCE(lab_backend_prod[p]) - lab_guest_cons[p]);
		sep = ",";
	}
	lab_printf("\n");
}

/* ------------------------------------------------------------------------- */
/* Top half. */

/*
 * Interrupt context (vector 32, IF=0). Like mirage-xen's
 * solo5__xen_evtchn_vector_handler() it only acknowledges the vector: all the
 * demuxing is left to the bottom half, called later from the main loop.
 */
LAB_PROBE void evtchn_upcall_handler(void)
{
	lab_upcall_count++;
	plat_eoi();
}

/* ------------------------------------------------------------------------- */
/* Bottom half. */

/* Mark, mask, clear one port: the body of the thread's inner loop. */
static void demux_port(unsigned l1i, unsigned l2i)
{
	lab_shared_info_t *s = LAB_SHINFO;
	uint32_t port = l1i * LAB_BPW + l2i;

	evtchn_callback_ml[port] = 1;
	sync_set_bit(l2i, &s->evtchn_mask[l1i]);
	sync_clear_bit(l2i, &s->evtchn_pending[l1i]); /* the thread's btc on a set bit */
}

/*
 * ffs-off-by-one: the first pending port of a word is found with a 0-based
 * count-trailing-zeros, every following one with libc's 1-based ffs() used as
 * if it were 0-based. The mask and the pending clear use the lowest set bit
 * itself (x & -x, index-free and right), so the loop always terminates; only
 * the port number for the shadow is one too high. Hence, whenever one pass
 * finds two or more ports pending and unmasked in a word, each port P after
 * the first has its pending bit cleared and is masked, but
 * evtchn_callback_ml[P + 1] is marked instead of [P]: P's event is lost, and
 * since only marked ports get unmasked, P stays masked for ever. With the
 * lab's ports: P = 3 (timer, marks 4) after 1, P = 4 (netfront, marks the
 * unbound port 5) after 1 or 3.
 */
static void demux_word_ffs_bug(unsigned l1i)
{
	lab_shared_info_t *s = LAB_SHINFO;
	lab_ulong_t pending_l2 = s->evtchn_pending[l1i] & ~s->evtchn_mask[l1i];
	unsigned l2i = pending_l2 ? lab_ctz(pending_l2) : 0;

	while (pending_l2 != 0) {
		lab_ulong_t lowest = pending_l2 & -pending_l2;
		evtchn_callback_ml[l1i * LAB_BPW + l2i] = 1;
		__atomic_fetch_or(&s->evtchn_mask[l1i], lowest, __ATOMIC_SEQ_CST);
		__atomic_fetch_and(&s->evtchn_pending[l1i], ~lowest, __ATOMIC_SEQ_CST);
		pending_l2 = s->evtchn_pending[l1i] & ~s->evtchn_mask[l1i];
		l2i = lab_ffs1(pending_l2); /* BUG: 1-based result used as a bit index */
	}
}

/*
 * clear_linked(): drop LINKED and LINK, return the LINK (the next port). Linux does it
 * with cmpxchg, so a LINK Xen sets meanwhile is seen; fifo-lost-link reads the word and
 * stores it back, and a LINK set in between (hv_race) is wiped.
 */
static uint32_t fifo_clear_linked(uint32_t *word, bool race)
{
	uint32_t w = __atomic_load_n(word, __ATOMIC_SEQ_CST);

	if (race)
		hv_race(); /* Xen on another CPU, between the read and the write */
	if (lab_variant == LAB_FIFO_LOST_LINK) {
		/* BUG: not atomic: whatever Xen wrote since the read is lost */
		__atomic_store_n(word, w & ~(LAB_FIFO_LINKED | LAB_FIFO_LINK_MASK),
				 __ATOMIC_SEQ_CST);
		return w & LAB_FIFO_LINK_MASK;
	}
	while (!__atomic_compare_exchange_n(word, &w, w & ~(LAB_FIFO_LINKED | LAB_FIFO_LINK_MASK),
					    false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		;
	return w & LAB_FIFO_LINK_MASK;
}

/* consume_one_event() (Linux events_fifo.c): take the head of queue q, mark it. */
static bool fifo_consume_one(unsigned q, uint32_t *ready)
{
	uint32_t head = lab_fifo_queue_head[q], port, w;
	bool marked = false;

	if (head == 0)
		head = READ_ONCE(lab_control_block.head[q]);
	port = head;
	if (port == 0 || port >= hv_fifo_ports()) { /* nothing there: the bit was stale */
		*ready &= ~(1u << q);
		lab_fifo_queue_head[q] = 0;
		return false;
	}
	head = fifo_clear_linked(&lab_event_array[port], q == LAB_FIFO_PRIO_DEFAULT);
	if (head == 0)
		*ready &= ~(1u << q);
	w = __atomic_load_n(&lab_event_array[port], __ATOMIC_SEQ_CST);
	if ((w & LAB_FIFO_PENDING) && !(w & LAB_FIFO_MASKED)) {
		/* as the 2-level bottom half: mark, mask, clear (EVTCHNOP_unmask later) */
		if (port < LAB_NR_PORTS) /* the shadow has the 2-level ports only */
			evtchn_callback_ml[port] = 1;
		__atomic_fetch_or(&lab_event_array[port], LAB_FIFO_MASKED, __ATOMIC_SEQ_CST);
		__atomic_fetch_and(&lab_event_array[port], ~LAB_FIFO_PENDING, __ATOMIC_SEQ_CST);
		marked = true;
	}
	lab_fifo_queue_head[q] = head;
	return marked;
}

/*
 * evtchn_fifo_setup() -> expand_array(): a port past the pages in use needs a new page,
 * every word MASKED, handed to Xen (EVTCHNOP_expand_array: here, the pointer and then the
 * count), before the port is bound and unmasked.
 */
static void fifo_bind_high_port(void)
{
	uint32_t page = LAB_PORT_HIGH / LAB_FIFO_WORDS;

	while (lab_event_array_pages <= page && lab_event_array_pages < LAB_FIFO_MAX_PAGES) {
		uint32_t *words = &lab_event_array[lab_event_array_pages * LAB_FIFO_WORDS];

		for (unsigned p = 0; p < LAB_FIFO_WORDS; p++)
			words[p] = LAB_FIFO_MASKED;
		lab_event_pages[lab_event_array_pages] = words;
		__atomic_store_n(&lab_event_array_pages, lab_event_array_pages + 1, __ATOMIC_SEQ_CST);
	}
	evtchn_unmask(LAB_PORT_HIGH);
	hv_fifo_bind_notify(LAB_PORT_HIGH);
}

/* __evtchn_fifo_handle_events(): take ready with xchg, consume every ready queue. */
static bool fifo_demux_pending(void)
{
	uint32_t ready = __atomic_exchange_n(&lab_control_block.ready, 0, __ATOMIC_SEQ_CST);
	bool some = false;

	while (ready) {
		unsigned q = (unsigned)__builtin_ctz(ready);
		some |= fifo_consume_one(q, &ready);
		ready |= __atomic_exchange_n(&lab_control_block.ready, 0, __ATOMIC_SEQ_CST);
	}
	return some;
}

/*
 * The bottom half of the thread's message, with a 0-based find-first-set
 * (Mini-OS __ffs). Returns true if it marked any port.
 */
LAB_PROBE bool evtchn_demux_pending(void)
{
	lab_shared_info_t *s = LAB_SHINFO;
	lab_vcpu_info_t *vi = lab_vcpu0();
	bool some_pending = false;
	lab_ulong_t pending_l1, pending_l2;

	lab_demux_count++;
	WRITE_ONCE(vi->evtchn_upcall_pending, 0);
	if (LAB_IS_FIFO)
		return fifo_demux_pending();
	pending_l1 = __atomic_exchange_n(&vi->evtchn_pending_sel, 0, __ATOMIC_SEQ_CST);
	while (pending_l1 != 0) {
		unsigned l1i = lab_ctz(pending_l1);
		pending_l1 &= ~((lab_ulong_t)1 << l1i);

		if (lab_variant == LAB_FFS_OFF_BY_ONE) {
			if (s->evtchn_pending[l1i] & ~s->evtchn_mask[l1i])
				some_pending = true;
			demux_word_ffs_bug(l1i);
			continue;
		}
		/* Masking with the *current* mask: a port masked since the upcall stays put. */
		while ((pending_l2 = READ_ONCE(s->evtchn_pending[l1i]) &
				     ~READ_ONCE(s->evtchn_mask[l1i])) != 0) {
			unsigned l2i = lab_ctz(pending_l2);
			demux_port(l1i, l2i);
			some_pending = true;
		}
	}
	return some_pending;
}

/* ------------------------------------------------------------------------- */
/* "OCaml side": test and clear, handlers. */

/* mirage_xen_evtchn_test_and_clear(): consume the mark, unmask, let the handler run. */
static bool evtchn_test_and_clear(uint32_t port)
{
	if (!evtchn_callback_ml[port])
		return false;
	evtchn_callback_ml[port] = 0;
	if (lab_variant == LAB_UNMASK_NO_RERAISE) {
		/* BUG: clears the mask bit but never re-raises a port that went pending. */
		sync_clear_bit(port % LAB_BPW, &LAB_SHINFO->evtchn_mask[port / LAB_BPW]);
	} else {
		evtchn_unmask(port); /* EVTCHNOP_unmask */
	}
	return true;
}

/* A handler drains its ring: coalesced notifications lose no items. */
static void lab_handle_port(uint32_t port)
{
	uint32_t prod = READ_ONCE(lab_backend_prod[port]);
	uint32_t n = prod - lab_guest_cons[port];

	lab_guest_cons[port] = prod;
	lab_dispatch_count[port]++;
	hv_spend(LAB_HANDLER_COST + LAB_ITEM_COST * n);
}

static void lab_run_handlers(void)
{
	for (unsigned i = 0; i < LAB_NLISTEN; i++)
		if (evtchn_test_and_clear(lab_listen_ports[i]))
			lab_handle_port(lab_listen_ports[i]);
}

/* ------------------------------------------------------------------------- */
/* Sleep point. */

/*
 * A plain hlt with IF=1. While a vCPU is halted Xen runs; the model runs with
 * interrupts held (its cli is not the guest's) so that what it injects is taken
 * at the real hlt, as the wake-up.
 */
static void lab_hlt(void)
{
	plat_cli();
	plat_safe_halt();
}

LAB_PROBE void evtchn_block_domain(void)
{
	lab_vcpu_info_t *vi = lab_vcpu0();

	lab_block_count++;
	if (lab_variant == LAB_LOST_UPCALL) {
		/* Before the fix: nothing stops an upcall between here and hlt. */
		plat_sti();
		hv_window(); /* an upcall now: top half EOIs, nobody demuxes */
		lab_hlt();
		return;
	}
	/* mirage_xen_evtchn_block_domain(): cli; re-check; "sti; hlt". */
	plat_cli();
	if (READ_ONCE(vi->evtchn_upcall_pending)) {
		plat_sti();
		return;
	}
	hv_window(); /* an upcall now waits in the IRR until the hlt */
	plat_safe_halt();
}

/* ------------------------------------------------------------------------- */
/* Start-up. */

static bool str_eq(const char *a, const char *b, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		if (a[i] != b[i])
			return false;
	return b[n] == 0;
}

static bool parse_u64(const char *s, unsigned n, uint64_t *out)
{
	uint64_t v = 0;

	if (n == 0)
		return false;
	for (unsigned i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	*out = v;
	return true;
}

static void usage_error(const char *what, const char *tok, unsigned n)
{
	lab_printf("LAB-ERROR %s: '", what);
	for (unsigned i = 0; i < n; i++)
		plat_putc(tok[i]);
	lab_printf("' (usage: variant=correct|lost-upcall|unmask-no-reraise|ffs-off-by-one"
		   "|fifo|fifo-lost-link seed=N events=N)\n");
	plat_flush();
	plat_exit(2);
}

/* key=value words; words without '=' or with a '/' in the key (a path) are skipped. */
static void parse_cmdline(const char *c)
{
	while (*c) {
		const char *tok = c, *eq = 0, *slash = 0;
		unsigned n, k;
		uint64_t v;

		while (*c && *c != ' ') {
			if (*c == '=' && !eq)
				eq = c;
			if (*c == '/' && !eq)
				slash = c;
			c++;
		}
		n = (unsigned)(c - tok);
		while (*c == ' ')
			c++;
		if (!eq || slash || n == 0)
			continue;
		k = (unsigned)(eq - tok);
		const char *val = eq + 1;
		unsigned vn = n - k - 1;
		if (str_eq(tok, "variant", k)) {
			unsigned i;
			for (i = 0; i < sizeof(variant_names) / sizeof(variant_names[0]); i++)
				if (str_eq(val, variant_names[i], vn))
					break;
			if (i == sizeof(variant_names) / sizeof(variant_names[0]))
				usage_error("unknown variant", tok, n);
			lab_variant = (enum lab_variant)i;
		} else if (str_eq(tok, "seed", k)) {
			if (!parse_u64(val, vn, &v))
				usage_error("bad seed", tok, n);
			lab_seed = v;
		} else if (str_eq(tok, "events", k)) {
			if (!parse_u64(val, vn, &v) || v == 0 || v > 100000000)
				usage_error("bad events", tok, n);
			lab_events = (uint32_t)v;
		} else {
			usage_error("unknown option", tok, n);
		}
	}
}

void lab_main(const char *cmdline)
{
#if defined(LAB_STYLE_MINIOS)
	HYPERVISOR_shared_info = &lab_shared_page; /* "map" the page at boot */
#endif
	lab_shared_info_t *s = LAB_SHINFO;
	lab_vcpu_info_t *vi = lab_vcpu0();

	lab_variant = LAB_CORRECT;
	lab_seed = 1;
	lab_events = 2000;
	parse_cmdline(cmdline);
	lab_printf("LAB-START variant=%s seed=%U events=%u arch=%s "
		   "ports=1:xenstore,2:console,3:timer,4:netfront\n",
		   lab_variant_name(lab_variant), lab_seed, lab_events, LAB_ARCH);
	plat_flush();

	/* Solo5 evtchn_init(): mask everything; then listen on 1, 3, 4 (console stays masked). */
	for (unsigned w = 0; w < LAB_BPW; w++)
		s->evtchn_mask[w] = ~(lab_ulong_t)0;
	for (unsigned p = 0; p < LAB_FIFO_WORDS; p++) /* FIFO: Linux masks every event too */
		lab_event_array[p] = LAB_FIFO_MASKED;
	lab_event_pages[0] = lab_event_array; /* EVTCHNOP_init_control: the first page */
	lab_event_array_pages = 1;
	hv_init(lab_seed, lab_events);
	for (unsigned i = 0; i < LAB_NLISTEN; i++)
		evtchn_unmask(lab_listen_ports[i]);

	plat_sti(); /* the main loop runs with interrupts on, like OCaml code */
	bool grown = lab_variant != LAB_FIFO; /* only the correct FIFO variant grows */
	for (;;) {
		if (!grown && lab_handled() >= lab_events / 2) {
			fifo_bind_high_port();
			grown = true;
		}
		if (evtchn_demux_pending()) {
			hv_spend(LAB_DISPATCH_COST);
			lab_run_handlers();
		}
		if (lab_handled() >= lab_events)
			break;
		if (READ_ONCE(vi->evtchn_upcall_pending))
			continue; /* more arrived while the handlers ran */
		evtchn_block_domain();
	}
	lab_report("LAB-DONE");
	plat_flush();
	plat_exit(0);
}
