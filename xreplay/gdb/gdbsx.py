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


def looks_like_gdbsx(qsupported: str, stop_reply: str | None = None) -> bool:
    """Whether a stub's answers are gdbsx's: an empty ``qSupported`` reply (gdbserver and
    QEMU both send ``PacketSize=...``) and, when given, a ``T05thread:N;`` stop reply."""
    if qsupported.strip():
        return False
    return stop_reply is None or stop_reply.strip().startswith("T05thread:")


def adapt_options(options: Any) -> Any:
    """Fit :class:`~xreplay.record.RecordOptions` to gdbsx (returns them).

    Per-domain stub: no domain filter, no de-duplication (each hit is reported once);
    the vCPU from the thread id; x86-64 registers without a target description.
    """
    options.filter = None
    options.dedupe = False
    options.vcpu_expr = VCPU_EXPR
    options.gdb_arch = options.gdb_arch or GDB_ARCH
    source = f"source {GDB_HELPERS}"
    if source not in options.extra_gdb_commands:
        options.extra_gdb_commands = [*options.extra_gdb_commands, source]
    options.target_kind = KIND
    return options
