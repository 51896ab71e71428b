/* Benchmark target: a user-space stand-in for a Xen guest's event-channel upcall.
 *
 * HYPERVISOR_shared_info has the real x86_64 shared_info layout, page-aligned like the
 * guest's shared page.  Before call i the loop stores i in wc_version (the counter every
 * benchmark checks: record i must hold i) and flips a pending bit, so consecutive
 * snapshots differ the way a live guest's do.  Usage: target N
 *
 * Built with -DTARGET_SOLO5 (and the probe renamed solo5__xen_evtchn_vector_handler), the
 * page is declared as Solo5's bindings/xen declares it, a page-sized byte array
 * (uint8_t HYPERVISOR_SHARED_INFO[4096]), and reached through a cast: the same loop, the
 * declaration `--profile solo5` expects.
 */
#include <stdint.h>
#include <stdlib.h>
#include <xen/foreign/x86_64.h>

#ifdef TARGET_SOLO5
uint8_t HYPERVISOR_SHARED_INFO[4096] __attribute__((aligned(4096)));
#define SHINFO (*(struct shared_info_x86_64 *)HYPERVISOR_SHARED_INFO)
#else
struct shared_info_x86_64 HYPERVISOR_shared_info __attribute__((aligned(4096)));
#define SHINFO HYPERVISOR_shared_info
#endif

volatile unsigned long evtchn_upcall_sink;

/* noinline, and the empty asm keeps gcc from proving the stores before the call dead. */
__attribute__((noinline)) void evtchn_upcall_handler(unsigned int i)
{
    __asm__ volatile("" ::: "memory");
    SHINFO.vcpu_info[0].evtchn_upcall_pending = 0;
    evtchn_upcall_sink += i;
}

int main(int argc, char **argv)
{
    unsigned int n = argc > 1 ? (unsigned int)strtoul(argv[1], NULL, 0) : 1000;
    volatile struct shared_info_x86_64 *s = &SHINFO;

    for (unsigned int i = 0; i < n; i++) {
        s->wc_version = i;
        s->evtchn_pending[(i / 64) % 8] ^= 1UL << (i % 64);
        s->vcpu_info[0].evtchn_upcall_pending = 1;
        evtchn_upcall_handler(i);
    }
    return 0;
}
