/*
 * flood.c - dom0 helper of xreplay's lab unikernel: bind to the guest's flood port and
 * kick it (IOCTL_EVTCHN_NOTIFY) in a loop.
 *
 *   xreplay-flood DOMID PORT [INTERVAL_US [SECONDS]]
 *
 * Freestanding (raw Linux syscalls, no libc) so the static binary is a few KiB and needs
 * nothing from dom0's busybox initramfs. Prints one line when bound and one when done;
 * stop it early with kill PID (closing /dev/xen/evtchn unbinds the port).
 */
#include <stdint.h>
#include <stddef.h>
#include <linux/ioctl.h>
typedef uint16_t domid_t;
#include <xen/sys/evtchn.h>

#define SYS_write 1
#define SYS_open 2
#define SYS_ioctl 16
#define SYS_nanosleep 35
#define SYS_exit 60
#define O_RDWR 2

static long syscall3(long nr, long a, long b, long c)
{
	long ret;

	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static void out(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	syscall3(SYS_write, 1, (long)s, (long)n);
}

static void out_u(unsigned long v)
{
	char buf[24];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	out(&buf[i]);
}

static void die(const char *what, long rc)
{
	out("xreplay-flood: ");
	out(what);
	out(" failed, errno ");
	out_u((unsigned long)-rc);
	out("\n");
	syscall3(SYS_exit, 1, 0, 0);
}

static unsigned long number(const char *s)
{
	unsigned long v = 0;

	for (; *s >= '0' && *s <= '9'; s++)
		v = v * 10 + (unsigned long)(*s - '0');
	return v;
}

struct timespec_k {
	long tv_sec, tv_nsec;
};

void flood_main(long argc, char **argv);
void flood_main(long argc, char **argv)
{
	if (argc < 3) {
		out("usage: xreplay-flood DOMID PORT [INTERVAL_US [SECONDS]]\n");
		syscall3(SYS_exit, 2, 0, 0);
	}
	unsigned long interval_us = argc > 3 ? number(argv[3]) : 1000;
	unsigned long seconds = argc > 4 ? number(argv[4]) : 3600;
	long fd = syscall3(SYS_open, (long)"/dev/xen/evtchn", O_RDWR, 0);
	if (fd < 0)
		die("open /dev/xen/evtchn", fd);
	struct ioctl_evtchn_bind_interdomain bind = {
		.remote_domain = (unsigned)number(argv[1]), .remote_port = (unsigned)number(argv[2]),
	};
	long port = syscall3(SYS_ioctl, fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, (long)&bind);
	if (port < 0)
		die("IOCTL_EVTCHN_BIND_INTERDOMAIN", port);
	out("xreplay-flood: dom0 port ");
	out_u((unsigned long)port);
	out(" bound to ");
	out(argv[1]);
	out(":");
	out(argv[2]);
	out("\n");
	struct ioctl_evtchn_notify notify = { .port = (unsigned)port };
	struct timespec_k ts = { (long)(interval_us / 1000000), (long)(interval_us % 1000000) * 1000 };
	unsigned long n = 0, total = interval_us ? seconds * 1000000 / interval_us : 0;
	for (; n < total; n++) {
		long rc = syscall3(SYS_ioctl, fd, IOCTL_EVTCHN_NOTIFY, (long)&notify);
		if (rc < 0)
			die("IOCTL_EVTCHN_NOTIFY", rc);
		syscall3(SYS_nanosleep, (long)&ts, 0, 0);
	}
	out("xreplay-flood: done, ");
	out_u(n);
	out(" notifications\n");
	syscall3(SYS_exit, 0, 0, 0);
}

/* The kernel starts us with %rsp -> argc, argv[0], ... */
__asm__(".globl _start\n_start:\n"
	"  movq (%rsp), %rdi\n"
	"  leaq 8(%rsp), %rsi\n"
	"  andq $-16, %rsp\n"
	"  call flood_main\n"
	"  hlt\n");
