/*
 * lab.h - shared by both builds of the xreplay guest lab.
 *
 * One source tree, two builds:
 *   process   x86_64 Linux program (run under gdbserver), struct shared_info_x86_64
 *   baremetal 32-bit multiboot v1 ELF (run under QEMU TCG), struct shared_info_x86_32
 *
 * The program holds both sides of a Xen 2-level event-channel ABI: a model of
 * the hypervisor (hv.c, mirroring xen/common/event_2l.c) and a guest modelled on
 * the Solo5/MirageOS code in the June 2020 xen-devel thread (guest.c). Layouts
 * come from Xen's public "foreign" headers (Debian libxen-dev), so gdb sees the
 * same struct a real guest maps with XENMAPSPACE_shared_info.
 */
#ifndef XREPLAY_LAB_H
#define XREPLAY_LAB_H

#include <stdbool.h>
#include <stdint.h>

/* x86 guests have vcpu_info.evtchn_upcall_mask; the foreign headers leave it to us. */
#define XEN_HAVE_PV_UPCALL_MASK 1
#ifndef __XEN_INTERFACE_VERSION__
#define __XEN_INTERFACE_VERSION__ 0x00040e00 /* names vcpu_time_info.flags */
#endif

#if defined(__x86_64__)
#include <xen/foreign/x86_64.h>
typedef struct shared_info_x86_64 lab_shared_info_t;
typedef struct vcpu_info_x86_64 lab_vcpu_info_t;
typedef uint64_t lab_ulong_t; /* xen_ulong_t of this ABI */
#define LAB_ARCH "x86_64"
#elif defined(__i386__)
#include <xen/foreign/x86_32.h>
typedef struct shared_info_x86_32 lab_shared_info_t;
typedef struct vcpu_info_x86_32 lab_vcpu_info_t;
typedef uint32_t lab_ulong_t;
#define LAB_ARCH "x86_32"
#else
#error "the lab guest is x86 only"
#endif

/* 2-level ABI geometry (xen/include/public/event_channel.h EVTCHN_2L_NR_CHANNELS). */
#define LAB_BPW ((unsigned)(sizeof(lab_ulong_t) * 8))
#define LAB_NR_PORTS (LAB_BPW * LAB_BPW) /* 4096 on x86_64, 1024 on x86_32 */

/* The domain's channels: the layout of the hang in the xen-devel report. */
#define LAB_PORT_XENSTORE 1u
#define LAB_PORT_CONSOLE 2u /* bound, kept masked by the guest ("we don't care about") */
#define LAB_PORT_TIMER 3u   /* VIRQ_TIMER */
#define LAB_PORT_NETFRONT 4u
#define LAB_TRACKED_PORTS 8u /* size of the per-port lab counters below */

#define LAB_UPCALL_VECTOR 32 /* HVMOP_set_evtchn_upcall_vector(0, 32), as Solo5 */

enum lab_variant {
	LAB_CORRECT,
	LAB_LOST_UPCALL,
	LAB_UNMASK_NO_RERAISE,
	LAB_FFS_OFF_BY_ONE,
	LAB_FIFO,           /* the FIFO ABI, correct */
	LAB_FIFO_LOST_LINK, /* the FIFO ABI, clear_linked() without cmpxchg */
};
#define LAB_IS_FIFO (lab_variant >= LAB_FIFO)

/*
 * FIFO ABI (xen/include/public/event_channel.h): one event-array page of event_word_t
 * (PENDING 31, MASKED 30, LINKED 29, BUSY 28, 17-bit LINK) and vCPU 0's control block.
 * Declared here with the header's layout (tests check it against the header).
 */
#define LAB_FIFO_PENDING (1u << 31)
#define LAB_FIFO_MASKED (1u << 30)
#define LAB_FIFO_LINKED (1u << 29)
#define LAB_FIFO_BUSY (1u << 28)
#define LAB_FIFO_LINK_MASK ((1u << 17) - 1)
#define LAB_FIFO_MAX_QUEUES 16u
#define LAB_FIFO_WORDS 1024u /* PAGE_SIZE / sizeof(event_word_t) */
/* The event array grows a page at a time, as Linux's (evtchn_fifo_setup -> expand_array):
 * lab_event_pages[] are the page pointers, lab_event_array_pages how many are in use. The
 * fifo variant binds LAB_PORT_HIGH, on the second page, half way through its events. */
#define LAB_FIFO_MAX_PAGES 2u
#define LAB_PORT_HIGH 1100u
#define LAB_FIFO_PRIO_TIMER 0u /* Linux raises VIRQ_TIMER to XEN_IRQ_PRIORITY_MAX */
#define LAB_FIFO_PRIO_DEFAULT 7u
struct lab_fifo_control_block {
	uint32_t ready;
	uint32_t _rsvd;
	uint32_t head[LAB_FIFO_MAX_QUEUES];
};
extern uint32_t lab_event_array[LAB_FIFO_MAX_PAGES * LAB_FIFO_WORDS];
extern uint32_t *lab_event_pages[LAB_FIFO_MAX_PAGES];
extern uint32_t lab_event_array_pages;
extern struct lab_fifo_control_block lab_control_block;

/* Symbols a debugger uses: keep them global, out of line and never cloned. */
#define LAB_PROBE __attribute__((noipa, used, externally_visible))
#define LAB_DATA __attribute__((used))

#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
#define barrier() __asm__ __volatile__("" ::: "memory")

/*
 * ---- the shared page and the guest's data (guest.c) ----
 * Declared the way each kind of guest declares it (LAB_STYLE_*, chosen by the build, which
 * also renames the probe functions with -D so assembly sees the same names):
 *   default  the struct itself, HYPERVISOR_shared_info (xreplay's lab)
 *   SOLO5    uint8_t HYPERVISOR_SHARED_INFO[4096] and Mirage's alias
 *            solo5__xen_HYPERVISOR_SHARED_INFO (Solo5 bindings/xen, mirage-xen)
 *   MINIOS   shared_info_t *HYPERVISOR_shared_info, NULL until boot sets it (Mini-OS);
 *            with LAB_SHINFO_STATIC statically initialised (in a PIE it holds its link-time
 *            value until the dynamic loader relocates it)
 * LAB_SHPAGE is the page itself (the hypervisor side); LAB_SHINFO the guest's way to it.
 */
#if defined(LAB_STYLE_SOLO5)
extern uint8_t HYPERVISOR_SHARED_INFO[4096];
#define LAB_SHPAGE ((lab_shared_info_t *)HYPERVISOR_SHARED_INFO)
#define LAB_SHINFO LAB_SHPAGE
#elif defined(LAB_STYLE_MINIOS)
extern lab_shared_info_t lab_shared_page;
extern lab_shared_info_t *HYPERVISOR_shared_info;
#define LAB_SHPAGE (&lab_shared_page)
#define LAB_SHINFO HYPERVISOR_shared_info
#else
extern lab_shared_info_t HYPERVISOR_shared_info;
#define LAB_SHPAGE (&HYPERVISOR_shared_info)
#define LAB_SHINFO LAB_SHPAGE
#endif
extern uint8_t evtchn_callback_ml[LAB_NR_PORTS];
extern uint32_t lab_dispatch_count[LAB_NR_PORTS];
extern uint32_t lab_guest_cons[LAB_TRACKED_PORTS];
extern enum lab_variant lab_variant;
extern volatile uint32_t lab_upcall_count;

/* ---- probe functions (guest.c), same names in both builds ---- */
void evtchn_upcall_handler(void); /* top half, interrupt context */
bool evtchn_demux_pending(void);  /* bottom half */
void evtchn_block_domain(void);   /* sleep point */
/* ---- the hypervisor model (hv.c) ---- */
void evtchn_unmask(uint32_t port); /* EVTCHNOP_unmask, evtchn_2l_unmask() */

extern uint32_t lab_backend_prod[LAB_TRACKED_PORTS];
void hv_init(uint64_t seed, uint32_t events);
void hv_spend(uint32_t ticks);
void hv_window(void);
bool hv_vcpu_block(void);
void hv_race(void); /* FIFO: Xen runs between the guest's read and write of a word */
uint32_t hv_fifo_ports(void); /* FIFO: ports with an event word (the pages in use) */
void hv_fifo_bind_notify(uint32_t port); /* FIFO: a backend's first notify on a new port */
uint64_t hv_now(void);

/* ---- lab console / entry (guest.c) ---- */
void lab_main(const char *cmdline) __attribute__((noreturn));
void lab_printf(const char *fmt, ...);
const char *lab_variant_name(enum lab_variant v);
uint32_t lab_handled(void);
void lab_report(const char *tag);

/* ---- platform layer (plat_process.c / plat_baremetal.c) ---- */
void plat_putc(char c);
void plat_flush(void);
void plat_exit(int code) __attribute__((noreturn));
void plat_cli(void);
void plat_sti(void);
void plat_safe_halt(void); /* "sti; hlt" with IF=0 on entry (atomic via the sti shadow) */
void plat_raise_upcall(void); /* hypervisor side: vlapic_set_irq(LAB_UPCALL_VECTOR) */
void plat_eoi(void);          /* guest side: LAPIC EOI */
bool plat_upcall_in_irr(void); /* is the upcall vector waiting in the LAPIC IRR? */

/* ---- bit operations on the shared page (LSB-first in little-endian words) ---- */
static inline bool sync_test_and_set_bit(unsigned nr, lab_ulong_t *w)
{
	lab_ulong_t m = (lab_ulong_t)1 << nr;
	return (__atomic_fetch_or(w, m, __ATOMIC_SEQ_CST) & m) != 0;
}

static inline bool sync_test_and_clear_bit(unsigned nr, lab_ulong_t *w)
{
	lab_ulong_t m = (lab_ulong_t)1 << nr;
	return (__atomic_fetch_and(w, ~m, __ATOMIC_SEQ_CST) & m) != 0;
}

static inline bool sync_test_bit(unsigned nr, lab_ulong_t *w)
{
	return (__atomic_load_n(w, __ATOMIC_SEQ_CST) >> nr) & 1;
}

static inline void sync_set_bit(unsigned nr, lab_ulong_t *w)
{
	__atomic_fetch_or(w, (lab_ulong_t)1 << nr, __ATOMIC_SEQ_CST);
}

static inline void sync_clear_bit(unsigned nr, lab_ulong_t *w)
{
	__atomic_fetch_and(w, ~((lab_ulong_t)1 << nr), __ATOMIC_SEQ_CST);
}

/* 0-based index of the lowest set bit (x != 0), like Mini-OS __ffs(). */
static inline unsigned lab_ctz(lab_ulong_t x)
{
	if (sizeof(x) == 4)
		return (unsigned)__builtin_ctz((unsigned)x);
	return (unsigned)__builtin_ctzll((unsigned long long)x);
}

/* libc ffs(): 1-based, 0 for 0. Only the ffs-off-by-one variant uses it. */
static inline unsigned lab_ffs1(lab_ulong_t x)
{
	return x ? lab_ctz(x) + 1 : 0;
}

static inline lab_vcpu_info_t *lab_vcpu0(void)
{
	return &LAB_SHPAGE->vcpu_info[0];
}

#endif /* XREPLAY_LAB_H */
