/* A minimal recorder target: a page-aligned x86_64 shared_info whose evtchn_pending word 0
 * holds the iteration number when the probe function is called, so tests can check that
 * record i carries counter i (no loss, no duplicates).  argv: N [spin]
 * With "spin" it loops for ever after N iterations without calling the probe (a "hang");
 * with "exit-after-detach" it keeps counting after N and writes a marker file on exit;
 * with "trap" it raises SIGTRAP outside the probe after N (a stop nothing asked for). */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xen/foreign/x86_64.h>

struct shared_info_x86_64 HYPERVISOR_shared_info __attribute__((aligned(4096)));
volatile uint8_t shadow[64];

__attribute__((noinline, used)) void evtchn_upcall_handler(unsigned long i)
{
    __asm__ volatile("" ::"r"(i) : "memory");
}

int main(int argc, char **argv)
{
    unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 0) : 100;
    const char *mode = argc > 2 ? argv[2] : "";
    for (unsigned long i = 0; i < n; i++) {
        HYPERVISOR_shared_info.evtchn_pending[0] = i;
        HYPERVISOR_shared_info.vcpu_info[0].evtchn_upcall_pending = i & 1;
        shadow[i % 64] = (uint8_t)i;
        evtchn_upcall_handler(i);
        if (!strcmp(mode, "slow"))
            usleep(20000);
    }
    if (!strcmp(mode, "trap"))
        raise(SIGTRAP);
    if (!strcmp(mode, "spin"))
        for (;;)
            __asm__ volatile("pause");
    if (argc > 3) {
        FILE *f = fopen(argv[3], "w");
        if (f) {
            fprintf(f, "done %lu\n", n);
            fclose(f);
        }
    }
    return 0;
}
