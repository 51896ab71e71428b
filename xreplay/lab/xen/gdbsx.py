"""Start Xen's gdbsx in the lab's dom0, one per gdb session.

Why one per session: gdbsx (tools/debugger/gdbsx) attaches to one domain, listens for one
gdb, **pauses the domain while it waits**, and **exits when gdb detaches** (the domain then
runs again). So every gdb visit (the profile's check, the recording, the cross-check) is
preceded by :func:`start_gdbsx`; the host reaches it through the lab's second QEMU
``hostfwd`` (``Lab.gdbsx_address``). dom0 commands keep working while the domU waits:
gdbsx stops only its own domain, unlike QEMU's whole-machine stub.
"""

from __future__ import annotations

import time

from xreplay.errors import XReplayError
from xreplay.lab.xen.lab import GDBSX_DOM0_PORT, Lab

GDBSX = "/usr/sbin/gdbsx"
LOG = "/tmp/gdbsx.log"
#: gdbsx's word size argument: the lab's guests are all x86_64.
BITNESS = 64


def _listening_cmd(port: int) -> str:
    """A dom0 shell test: something listens on ``port`` (busybox has no ss; read /proc)."""
    return f"grep -qi ':{port:04X} 00000000:0000 0A' /proc/net/tcp"


def stop_gdbsx(lab: Lab) -> None:
    """Stop any gdbsx left in dom0 (one that no gdb ever reached still pauses the domU)."""
    for _ in range(3):  # busybox sh in dom0 has been seen to die once (rc 139): retry
        rc, out = lab.dom0_run("for p in $(pidof gdbsx); do kill $p; done; sleep 0.2; "
                               "for p in $(pidof gdbsx); do kill -9 $p; done; "
                               "pidof gdbsx || echo NONE", timeout=30)
        if "NONE" in out:
            return
    raise XReplayError(f"cannot stop the gdbsx left in dom0 (rc={rc}): {out.strip()[-200:]}")


def start_gdbsx(lab: Lab, domid: int | None = None, *, timeout: float = 20.0) -> str:
    """Start gdbsx for ``domid`` (default: the lab's domU) and wait until it listens.

    Returns the host address to give gdb (``target remote``) or ``xreplay record --target``.
    A previous gdbsx still waiting is stopped first: only one can listen on the port.
    """
    address = lab.gdbsx_address  # raises for a lab booted without gdbsx
    domid = lab.domid if domid is None else domid
    if domid is None:
        raise XReplayError("the lab has no domU for gdbsx to attach to (booted with --domu none)")
    stop_gdbsx(lab)
    lab.dom0(f"rm -f {LOG}; (setsid {GDBSX} -a {domid} {BITNESS} {GDBSX_DOM0_PORT} "
             f"</dev/null >{LOG} 2>&1 &); true", timeout=30)
    deadline = time.monotonic() + timeout
    while True:
        rc, out = lab.dom0_run(f"{_listening_cmd(GDBSX_DOM0_PORT)} && echo LISTEN; "
                               f"pidof gdbsx >/dev/null || echo GONE; cat {LOG}", timeout=15)
        if "LISTEN" in out:
            return address
        if "GONE" in out or time.monotonic() > deadline:
            said = " ".join(line.strip() for line in out.splitlines()
                            if line.strip() and line.strip() not in ("GONE", "LISTEN"))
            why = "exited" if "GONE" in out else f"did not listen within {timeout:.0f} s"
            hint = (" (the hypervisor lacks CONFIG_GDBSX: boot with `xreplay lab up --stub "
                    "gdbsx`)" if "NOT enabled" in said else "")
            raise XReplayError(f"gdbsx -a {domid} in dom0 {why}: {said or 'no output'}{hint}")
        time.sleep(0.2)
