"""What recording through Xen's gdbsx needs, and how to tell gdbsx from other stubs.

gdbsx (xen/tools/debugger/gdbsx, run in dom0 as ``gdbsx -a DOMID 64 PORT``) is a
per-domain stub, unlike QEMU's whole-machine one. Facts read from its source
(``gx/gx_main.c``, ``xg/xg_main.c``) and measured in the lab:

* it answers ``qSupported`` with an empty packet (no PacketSize, no features, no
  target.xml), ``?`` with ``T05thread:0;``, ``qfThreadInfo`` with ``m0,1,..l``: one thread
  per vCPU, the vCPU id as thread id;
* ``g`` carries the general registers only (no ``fs_base``/``gs_base``): the guest's vCPU is
  the thread's id (``$xr_stub_thread()``), not Linux's per-cpu ``xen_vcpu_id`` via
  ``$gs_base``; gdb needs ``set architecture i386:x86-64``;
* memory is read by *guest virtual* address of its one domain: no dom0/domU filter, no
  machine-address mode;
* it answers no ``Z`` packets: gdb writes ``int3`` into guest memory and removes it
  around every stop (insert all, continue, remove all, step over, ...);
* it pauses the domain while it waits for gdb, serves exactly one connection and exits
  when gdb detaches (the domain runs on): one gdbsx per gdb session;
* ``c`` polls the paused domain every 10 ms (``xg_resume_n_wait``), so a hit costs at least
  that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIND = "gdbsx"
#: Sourced into gdb: defines ``$xr_stub_thread()``.
GDB_HELPERS = Path(__file__).with_name("gdb_gdbsx.py")
VCPU_EXPR = "$xr_stub_thread()"
GDB_ARCH = "i386:x86-64"


#: What the project's own gdbsx (xreplay/lab/xen/patches/gdbsx-fast.patch) adds to its
#: qSupported answer.
OWN_BUILD_FEATURE = "xreplay-gdbsx+"
#: gdb settings for gdbsx. Debian's announces no PacketSize, so gdb would cap ``m`` reads at
#: the size of its ``g`` reply (~160 bytes: a 4 KiB shared_info in ~26 packets); its buffer
#: is 4096 characters, so 4000 is safe. Breakpoints stay inserted between stops: without
#: it gdb removes and re-inserts every probe around every hit (Debian's gdbsx has no Z0,
#: so each of those is a memory write).
GDB_SETTINGS_DEBIAN = ("set remote memory-read-packet-size fixed",
                       "set remote memory-read-packet-size 4000")
GDB_SETTINGS = ("set breakpoint always-inserted on",)


def looks_like_gdbsx(qsupported: str, stop_reply: str | None = None) -> bool:
    """Whether a stub's answers are gdbsx's: an empty ``qSupported`` reply (gdbserver and
    QEMU both send ``PacketSize=...``; the project's own build adds
    :data:`OWN_BUILD_FEATURE`) and, when given, a ``T05thread:N;`` stop reply."""
    features = qsupported.strip()
    if features and OWN_BUILD_FEATURE not in features.split(";"):
        return False
    return stop_reply is None or stop_reply.strip().startswith("T05thread:")


def gdb_commands(own_build: bool = False) -> list[str]:
    """gdb commands to run before connecting to gdbsx (Debian's unless ``own_build``)."""
    return [f"source {GDB_HELPERS}", *GDB_SETTINGS,
            *(() if own_build else GDB_SETTINGS_DEBIAN)]


def adapt_options(options: Any, own_build: bool = False) -> Any:
    """Fit :class:`~xreplay.record.RecordOptions` to gdbsx (returns them).

    Per-domain stub: no domain filter; the vCPU from the thread id; x86-64 registers
    without a target description; :func:`gdb_commands`. De-duplication stays on: gdb has
    been seen to report one hit twice through gdbsx (same pc, sp and flags).
    """
    options.filter = None
    options.dedupe = True
    # gdbsx pauses the domain, not Xen: an event delivered between the read of the
    # control block (or vcpu_info) and the event words would give a state no moment had
    # (measured: a FIFO head LINKED with its ready bit clear, at a block hit)
    options.stable_reads = True
    options.vcpu_expr = VCPU_EXPR
    options.gdb_arch = options.gdb_arch or GDB_ARCH
    options.extra_gdb_commands = [*options.extra_gdb_commands,
                                  *(c for c in gdb_commands(own_build)
                                    if c not in options.extra_gdb_commands)]
    options.target_kind = KIND
    return options


def own_build(answers: dict[str, str]) -> bool:
    """Whether identification answers (``StubInfo.answers``) are the project's gdbsx."""
    return OWN_BUILD_FEATURE in answers.get("qSupported", "").split(";")


def prepare_session(gdb: Any, options: Any, answers: dict[str, str]) -> None:
    """What the recorder does once its gdb is attached and the stub found to be gdbsx:
    the gdb settings of :func:`gdb_commands` (they take effect for the next reads and
    breakpoints) and the vCPU from the thread id, unless the user gave a vCPU expression
    that does not need ``$gs_base`` (which gdbsx does not send)."""
    for cmd in gdb_commands(own_build(answers)):
        if cmd not in options.extra_gdb_commands:
            gdb.console_command(cmd)
    if options.vcpu_expr is None or "$gs_base" in options.vcpu_expr:
        options.vcpu_expr = VCPU_EXPR
