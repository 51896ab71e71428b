/*
 * hv.c - the hypervisor side of the lab: Xen's 2-level event channels for one
 * HVM/PVH vCPU with a per-vCPU LAPIC upcall vector, plus a seeded schedule of
 * backend events in virtual time.
 *
 * Rules mirrored (XEN@RELEASE-4.19.0):
 *   hv_set_pending()             xen/common/event_2l.c  evtchn_2l_set_pending()
 *   evtchn_unmask()              xen/common/event_2l.c  evtchn_2l_unmask()
 *   vcpu_mark_events_pending()   xen/arch/x86/domain.c  vcpu_mark_events_pending()
 *   injection                    HVMOP_set_evtchn_upcall_vector: vlapic_set_irq(), an
 *                                edge into the LAPIC IRR, once per 0->1 transition of
 *                                evtchn_upcall_pending; the guest must EOI.
 *
 * Virtual time: the hypervisor only runs at explicit points, so a run depends
 * on its seed and nothing else (no wall clock, no host timing):
 *   hv_spend(t)      the guest did t ticks of work; events due meanwhile are raised
 *                    (with the guest's IF=1, an injected upcall interrupts it there)
 *   hv_window()      the guest's last instructions before hlt. It takes no
 *                    virtual time, and events land in it once per run: at the
 *                    K-th sleep, K = 100 + (seeded value in [0, 200)), the next
 *                    xenstore reply and the next netfront packet are brought
 *                    forward into it, together. So the race of the thread (an
 *                    upcall after sti and before hlt) happens at a known place
 *                    in every variant; only lost-upcall has IF=1 there and loses
 *                    it. (Two ports at once also makes the next bottom half see
 *                    ports 1 and 4 pending together: ffs-off-by-one's trigger.)
 *   hv_vcpu_block()  the vCPU executed hlt: time jumps to the next event until one
 *                    injects the upcall; if none ever can, say so ('e' key dump).
 *
 * The schedule is finite: `events` backend items on ports 1, 3 and 4 (plus
 * console noise on port 2), ending with a netfront flood. After the last item
 * no source fires again, so a port left stranded or masked stays that way and
 * a blocked vCPU stays blocked: a stable end state for a debugger.
 */
#include "lab.h"

#define HV_NEVER UINT64_MAX

/* Schedule shape, in ticks (see also the guest's costs in guest.c). */
#define TIMER_PERIOD 1000u
#define XENSTORE_GAP_MIN 200u
#define XENSTORE_GAP_SPAN 4000u
#define CONSOLE_GAP_MIN 500u
#define CONSOLE_GAP_SPAN 6000u
#define NET_BURST_GAP_MIN 1500u
#define NET_BURST_GAP_SPAN 6000u
#define NET_BURST_LEN_MIN 4u
#define NET_BURST_LEN_SPAN 29u
#define NET_SPACING_MIN 20u
#define NET_SPACING_SPAN 160u
#define TAIL_MAX 64u /* items in the closing "ping -f" flood */
#define TAIL_SPACING_MIN 3u
#define TAIL_SPACING_SPAN 20u
#define WINDOW_HIT_MIN 100u /* the sleep whose window gets an event: MIN + [0, SPAN) */
#define WINDOW_HIT_SPAN 200u
#define RACE_HIT_MIN 20u /* the FIFO consume whose word race gets an event: MIN + [0, SPAN) */
#define RACE_HIT_SPAN 60u

enum { SRC_TIMER, SRC_XENSTORE, SRC_CONSOLE, SRC_NETFRONT, SRC_TAIL, NSRC };

struct hv_source {
	uint32_t port;
	bool counted; /* part of the guest's workload (console is not) */
	uint64_t next;
	uint64_t rng;
	uint32_t burst_left;
};

static struct hv_source hv_src[NSRC];
static uint64_t hv_vtime;
static uint32_t hv_main_quota, hv_tail_quota, hv_produced;
static uint32_t hv_windows, hv_window_hit;
static uint32_t hv_races, hv_race_hit;
static uint32_t hv_fifo_tail[LAB_FIFO_MAX_QUEUES]; /* Xen's own, not in the guest's view */

/* The FIFO ABI's shared memory (EVTCHNOP_init_control / EVTCHNOP_expand_array). */
LAB_DATA uint32_t lab_event_array[LAB_FIFO_MAX_PAGES * LAB_FIFO_WORDS]
	__attribute__((aligned(4096)));
LAB_DATA uint32_t *lab_event_pages[LAB_FIFO_MAX_PAGES]; /* Linux's event_array[] */
LAB_DATA uint32_t lab_event_array_pages;                /* Linux's event_array_pages */
LAB_DATA struct lab_fifo_control_block lab_control_block __attribute__((aligned(64)));

/* Backend ring producers (a guest handler consumes up to these). */
LAB_DATA uint32_t lab_backend_prod[LAB_TRACKED_PORTS];
/* Hypervisor-side statistics, for tests and humans. */
LAB_DATA uint32_t lab_hv_set_pending[LAB_TRACKED_PORTS]; /* evtchn_set_pending() calls */
LAB_DATA uint32_t lab_hv_pending_edges[LAB_TRACKED_PORTS]; /* ... that set pending 0->1 */
LAB_DATA uint32_t lab_hv_injections;                       /* upcall vector injections */
LAB_DATA bool lab_hv_vcpu_dead; /* blocked with no possible wake-up */

uint64_t hv_now(void)
{
	return hv_vtime;
}

/* splitmix64: small, seedable, the same on both builds. */
static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint32_t rnd(struct hv_source *s, uint32_t span)
{
	return (uint32_t)(splitmix64(&s->rng) >> 32) % span;
}

/* vcpu_mark_events_pending(): notify only on the 0->1 edge of upcall_pending. */
static void vcpu_mark_events_pending(void)
{
	lab_vcpu_info_t *vi = lab_vcpu0();

	if (__atomic_exchange_n(&vi->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST))
		return;
	lab_hv_injections++;
	plat_raise_upcall(); /* hvm_assert_evtchn_irq() -> vlapic_set_irq() */
}

static uint32_t fifo_priority(uint32_t port)
{
	return port == LAB_PORT_TIMER ? LAB_FIFO_PRIO_TIMER : LAB_FIFO_PRIO_DEFAULT;
}

/* evtchn_fifo_set_link(): LINK the tail word to `port` iff it is still LINKED. */
static bool fifo_set_link(uint32_t tail, uint32_t port)
{
	uint32_t *word = &lab_event_array[tail];
	uint32_t w = __atomic_load_n(word, __ATOMIC_SEQ_CST);

	for (;;) {
		if (!(w & LAB_FIFO_LINKED))
			return false; /* the guest consumed it: the queue is empty */
		uint32_t n = (w & ~(LAB_FIFO_BUSY | LAB_FIFO_LINK_MASK)) | port;
		if (__atomic_compare_exchange_n(word, &w, n, false, __ATOMIC_SEQ_CST,
						__ATOMIC_SEQ_CST))
			return true;
	}
}

/* evtchn_fifo_set_pending() for vCPU 0, after PENDING is set (`was` = the word before). */
static void fifo_link(uint32_t port)
{
	uint32_t *word = &lab_event_array[port];
	uint32_t q = fifo_priority(port), w = __atomic_load_n(word, __ATOMIC_SEQ_CST);

	if (w & (LAB_FIFO_MASKED | LAB_FIFO_LINKED))
		return; /* masked: linked at EVTCHNOP_unmask; linked: already queued */
	if (__atomic_fetch_or(word, LAB_FIFO_LINKED, __ATOMIC_SEQ_CST) & LAB_FIFO_LINKED)
		return;
	if (hv_fifo_tail[q] == port)
		hv_fifo_tail[q] = 0;
	bool linked = hv_fifo_tail[q] && fifo_set_link(hv_fifo_tail[q], port);
	if (!linked)
		WRITE_ONCE(lab_control_block.head[q], port);
	hv_fifo_tail[q] = port;
	if (!linked && !(__atomic_fetch_or(&lab_control_block.ready, 1u << q, __ATOMIC_SEQ_CST) &
			 (1u << q)))
		vcpu_mark_events_pending();
}

/* Xen has no event word for a port past the pages the guest gave it (expand_array). */
uint32_t hv_fifo_ports(void)
{
	return READ_ONCE(lab_event_array_pages) * LAB_FIFO_WORDS;
}

static void hv_fifo_set_pending(uint32_t port)
{
	if (port >= hv_fifo_ports())
		return;
	uint32_t was = __atomic_fetch_or(&lab_event_array[port], LAB_FIFO_PENDING,
					 __ATOMIC_SEQ_CST);

	if (!(was & LAB_FIFO_PENDING) && port < LAB_TRACKED_PORTS)
		lab_hv_pending_edges[port]++;
	fifo_link(port);
}

/* evtchn_2l_set_pending() for vCPU 0. */
static void hv_set_pending(uint32_t port)
{
	lab_shared_info_t *s = LAB_SHPAGE;
	unsigned w = port / LAB_BPW, bit = port % LAB_BPW;

	if (port < LAB_TRACKED_PORTS)
		lab_hv_set_pending[port]++;
	if (sync_test_and_set_bit(bit, &s->evtchn_pending[w]))
		return; /* already pending: coalesced, nothing else happens */
	if (port < LAB_TRACKED_PORTS)
		lab_hv_pending_edges[port]++;
	if (!sync_test_bit(bit, &s->evtchn_mask[w]) &&
	    !sync_test_and_set_bit(w, &lab_vcpu0()->evtchn_pending_sel))
		vcpu_mark_events_pending();
}

/*
 * EVTCHNOP_unmask -> evtchn_2l_unmask(): clear the mask and, if the port is
 * pending, re-raise it through the selector, as the edge it missed while masked.
 */
LAB_PROBE void evtchn_unmask(uint32_t port)
{
	lab_shared_info_t *s = LAB_SHPAGE;
	unsigned w = port / LAB_BPW, bit = port % LAB_BPW;

	if (LAB_IS_FIFO) { /* evtchn_fifo_unmask(): clear MASKED, relink if PENDING */
		if (port >= hv_fifo_ports())
			return;
		__atomic_fetch_and(&lab_event_array[port], ~LAB_FIFO_MASKED, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&lab_event_array[port], __ATOMIC_SEQ_CST) & LAB_FIFO_PENDING)
			fifo_link(port);
		return;
	}
	if (port >= LAB_NR_PORTS)
		return;
	if (sync_test_and_clear_bit(bit, &s->evtchn_mask[w]) &&
	    sync_test_bit(bit, &s->evtchn_pending[w]) &&
	    !sync_test_and_set_bit(w, &lab_vcpu0()->evtchn_pending_sel))
		vcpu_mark_events_pending();
}

static void hv_stop_main_sources(uint64_t now)
{
	struct hv_source *t = &hv_src[SRC_TAIL];

	for (int i = 0; i < SRC_TAIL; i++)
		hv_src[i].next = HV_NEVER;
	if (hv_tail_quota) {
		t->burst_left = hv_tail_quota;
		t->next = now + 50 + rnd(t, 200);
	}
}

/* A backend's first notify on a port the guest just bound (evtchn_fifo_set_pending). */
void hv_fifo_bind_notify(uint32_t port)
{
	hv_fifo_set_pending(port);
}

/* One backend event at hv_vtime: produce an item, notify, plan the next. */
static void hv_fire(int i)
{
	struct hv_source *s = &hv_src[i < NSRC ? i : 0];

	lab_backend_prod[s->port]++;
	if (LAB_IS_FIFO) { /* evtchn_fifo_set_pending() */
		if (s->port < LAB_TRACKED_PORTS)
			lab_hv_set_pending[s->port]++;
		hv_fifo_set_pending(s->port);
	} else {
		hv_set_pending(s->port);
	}
	switch (i) {
	case SRC_TIMER:
		s->next += TIMER_PERIOD;
		break;
	case SRC_XENSTORE:
		s->next += XENSTORE_GAP_MIN + rnd(s, XENSTORE_GAP_SPAN);
		break;
	case SRC_CONSOLE:
		s->next += CONSOLE_GAP_MIN + rnd(s, CONSOLE_GAP_SPAN);
		break;
	case SRC_NETFRONT:
		if (--s->burst_left) {
			s->next += NET_SPACING_MIN + rnd(s, NET_SPACING_SPAN);
		} else {
			s->burst_left = NET_BURST_LEN_MIN + rnd(s, NET_BURST_LEN_SPAN);
			s->next += NET_BURST_GAP_MIN + rnd(s, NET_BURST_GAP_SPAN);
		}
		break;
	case SRC_TAIL:
		s->next = --s->burst_left ? s->next + TAIL_SPACING_MIN + rnd(s, TAIL_SPACING_SPAN)
					  : HV_NEVER;
		break;
	}
	if (s->counted && i != SRC_TAIL && ++hv_produced == hv_main_quota)
		hv_stop_main_sources(hv_vtime);
}

static int hv_next_source(void)
{
	int best = -1;

	for (int i = 0; i < NSRC; i++)
		if (hv_src[i].next != HV_NEVER && (best < 0 || hv_src[i].next < hv_src[best].next))
			best = i;
	return best;
}

/* Raise every event due up to `until`, in time order, then set the clock. */
static void hv_advance(uint64_t until)
{
	int i;

	while ((i = hv_next_source()) >= 0 && hv_src[i].next <= until) {
		hv_vtime = hv_src[i].next;
		hv_fire(i);
	}
	if (until > hv_vtime)
		hv_vtime = until;
}

void hv_spend(uint32_t ticks)
{
	hv_advance(hv_vtime + ticks);
}

void hv_window(void)
{
	static const int forward[] = {SRC_XENSTORE, SRC_NETFRONT, SRC_TAIL};

	if (++hv_windows != hv_window_hit)
		return;
	for (unsigned j = 0; j < sizeof(forward) / sizeof(forward[0]); j++) {
		struct hv_source *s = &hv_src[forward[j]];
		if (s->next == HV_NEVER)
			continue;
		s->next = hv_vtime; /* the backend answers right now */
		hv_fire(forward[j]);
	}
}

/*
 * FIFO variants: the guest reads an event word and writes it back (clear_linked). At the
 * K-th such gap on the default queue, K = RACE_HIT_MIN + (seeded value in [0, SPAN)), the
 * next xenstore reply lands in it: Xen links it behind the word being consumed. A guest
 * that writes back with a plain store (fifo-lost-link) wipes that LINK; cmpxchg sees it.
 */
void hv_race(void)
{
	struct hv_source *s = &hv_src[SRC_XENSTORE];

	if (++hv_races != hv_race_hit || s->next == HV_NEVER)
		return;
	s->next = hv_vtime;
	hv_fire(SRC_XENSTORE);
}

/* Xen's FIFO 's' column (evtchn_fifo_print_state): "%c %-4u", "%c -   " or "?     ". */
static void hv_print_fifo_state(uint32_t port)
{
	uint32_t w = READ_ONCE(lab_event_array[port]);
	char busy = (w & LAB_FIFO_BUSY) ? 'B' : ' ';

	if (w & LAB_FIFO_LINKED) {
		uint32_t link = w & LAB_FIFO_LINK_MASK;
		int digits = 1;
		for (uint32_t v = link; v >= 10; v /= 10)
			digits++;
		lab_printf("%s %u", busy == 'B' ? "B" : " ", link);
		for (; digits < 4; digits++)
			plat_putc(' ');
	} else {
		lab_printf("%s -   ", busy == 'B' ? "B" : " ");
	}
}

/* 'e' debug key, format of domain_dump_evtchn_info() (xen/common/event_channel.c). */
static void hv_dump_evtchn(void)
{
	lab_shared_info_t *s = LAB_SHPAGE;
	lab_vcpu_info_t *vi = lab_vcpu0();

	lab_printf("(XEN) 'e' pressed -> dumping event-channel info\n");
	lab_printf("(XEN) Event channel information for domain 1:\n");
	lab_printf("(XEN) Polling vCPUs: {}\n");
	lab_printf("(XEN)     port [p/m/s]\n");
	for (uint32_t port = 1; port <= LAB_PORT_NETFRONT; port++) {
		unsigned w = port / LAB_BPW, bit = port % LAB_BPW;
		if (LAB_IS_FIFO) {
			uint32_t ew = READ_ONCE(lab_event_array[port]);
			lab_printf("(XEN)     %4u [%u/%u/", port, (unsigned)!!(ew & LAB_FIFO_PENDING),
				   (unsigned)!!(ew & LAB_FIFO_MASKED));
			hv_print_fifo_state(port);
			lab_printf("]: ");
		} else {
			lab_printf("(XEN)     %4u [%u/%u/%u]: ", port,
				   (unsigned)sync_test_bit(bit, &s->evtchn_pending[w]),
				   (unsigned)sync_test_bit(bit, &s->evtchn_mask[w]),
				   (unsigned)sync_test_bit(w, &vi->evtchn_pending_sel));
		}
		if (port == LAB_PORT_TIMER)
			lab_printf("s=5 n=0 x=0 v=0\n");
		else /* interdomain, remote ports as in the report */
			lab_printf("s=3 n=0 x=0 d=0 p=%u\n", port == LAB_PORT_NETFRONT ? 35u : 32 + port);
	}
}

/*
 * The vCPU executed hlt (the model runs with the guest's IF=0, so an injection
 * lands in the IRR and is taken at the real hlt). Time jumps from event to
 * event until the upcall vector is in the IRR, and returns true. Returns false
 * when none can ever be injected again, after raising what is left of the
 * schedule (as Xen would while the vCPU sleeps): Xen keeps the vCPU blocked for
 * ever, so the caller's hlt never returns.
 */
bool hv_vcpu_block(void)
{
	int i;

	while (!plat_upcall_in_irr()) {
		if ((i = hv_next_source()) < 0)
			goto dead;
		hv_vtime = hv_src[i].next;
		hv_fire(i);
	}
	return true;

dead:
	lab_hv_vcpu_dead = true;
	lab_printf("(XEN) d1v0 blocked for ever: upcall_pending=%u pending_sel=%X vtime=%U\n",
		   (unsigned)READ_ONCE(lab_vcpu0()->evtchn_upcall_pending),
		   (uint64_t)READ_ONCE(lab_vcpu0()->evtchn_pending_sel), hv_vtime);
	hv_dump_evtchn();
	lab_report("LAB-HUNG");
	plat_flush();
	return false;
}

void hv_init(uint64_t seed, uint32_t events)
{
	static const uint32_t ports[NSRC] = {
		[SRC_TIMER] = LAB_PORT_TIMER,       [SRC_XENSTORE] = LAB_PORT_XENSTORE,
		[SRC_CONSOLE] = LAB_PORT_CONSOLE,   [SRC_NETFRONT] = LAB_PORT_NETFRONT,
		[SRC_TAIL] = LAB_PORT_NETFRONT,
	};

	struct hv_source k = {.rng = seed ^ 0x5eedull};
	hv_window_hit = WINDOW_HIT_MIN + rnd(&k, WINDOW_HIT_SPAN);
	hv_windows = 0;
	hv_race_hit = RACE_HIT_MIN + rnd(&k, RACE_HIT_SPAN);
	hv_races = 0;
	for (unsigned q = 0; q < LAB_FIFO_MAX_QUEUES; q++)
		hv_fifo_tail[q] = 0;
	hv_tail_quota = events / 4 < TAIL_MAX ? events / 4 : TAIL_MAX;
	hv_main_quota = events - hv_tail_quota;
	for (int i = 0; i < NSRC; i++) {
		struct hv_source *s = &hv_src[i];
		s->port = ports[i];
		s->counted = i != SRC_CONSOLE;
		s->rng = seed * 0x100000001b3ull + (uint64_t)(i + 1) * 0x2545f4914f6cdd1dull;
		s->next = HV_NEVER;
	}
	hv_src[SRC_TIMER].next = 1 + rnd(&hv_src[SRC_TIMER], TIMER_PERIOD);
	hv_src[SRC_XENSTORE].next = 1 + rnd(&hv_src[SRC_XENSTORE], XENSTORE_GAP_SPAN);
	hv_src[SRC_CONSOLE].next = 1 + rnd(&hv_src[SRC_CONSOLE], CONSOLE_GAP_SPAN);
	hv_src[SRC_NETFRONT].burst_left = NET_BURST_LEN_MIN + rnd(&hv_src[SRC_NETFRONT],
								  NET_BURST_LEN_SPAN);
	hv_src[SRC_NETFRONT].next = 1 + rnd(&hv_src[SRC_NETFRONT], NET_BURST_GAP_SPAN);
	if (hv_main_quota == 0)
		hv_stop_main_sources(0);
}
