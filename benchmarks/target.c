/* Benchmark target: a user-space stand-in for a Xen guest's event-channel upcall.
 *
 * HYPERVISOR_shared_info has the real x86_64 shared_info layout, page-aligned like the
 * guest's shared page.  Before call i the loop stores i in wc_version (the counter every
 * benchmark checks: record i must hold i) and flips a pending bit, so consecutive
 * snapshots differ the way a live guest's do.  Usage: target N
 */
#include <stdint.h>
#include <stdlib.h>
#include <xen/foreign/x86_64.h>

struct shared_info_x86_64 HYPERVISOR_shared_info __attribute__((aligned(4096)));

volatile unsigned long evtchn_upcall_sink;

/* noinline, and the empty asm keeps gcc from proving the stores before the call dead. */
__attribute__((noinline)) void evtchn_upcall_handler(unsigned int i)
{
    __asm__ volatile("" ::: "memory");
    HYPERVISOR_shared_info.vcpu_info[0].evtchn_upcall_pending = 0;
    evtchn_upcall_sink += i;
}

int main(int argc, char **argv)
{
    unsigned int n = argc > 1 ? (unsigned int)strtoul(argv[1], NULL, 0) : 1000;
    volatile struct shared_info_x86_64 *s = &HYPERVISOR_shared_info;

    for (unsigned int i = 0; i < n; i++) {
        s->wc_version = i;
        s->evtchn_pending[(i / 64) % 8] ^= 1UL << (i % 64);
        s->vcpu_info[0].evtchn_upcall_pending = 1;
        evtchn_upcall_handler(i);
    }
    return 0;
}
