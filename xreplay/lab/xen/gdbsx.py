"""Start Xen's gdbsx in the lab's dom0, one per gdb session.

Why one per session: gdbsx (tools/debugger/gdbsx) attaches to one domain, listens for one
gdb, **pauses the domain while it waits**, and **exits when gdb detaches** (the domain then
runs again). So every gdb visit (the profile's check, the recording, the cross-check) is
preceded by :func:`start_gdbsx`; the host reaches it through the lab's second QEMU
``hostfwd`` (``Lab.gdbsx_address``). dom0 commands keep working while the domU waits:
gdbsx stops only its own domain, unlike QEMU's whole-machine stub.
"""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

from xreplay.errors import XReplayError
from xreplay.lab.xen.lab import GDBSX_DOM0_PORT, Lab

GDBSX = "/usr/sbin/gdbsx"
#: The project's own build (xreplay/lab/xen/gdbsx_build.py): a tighter wait, Z0, a big
#: PacketSize. Debian's GDBSX stays the tested fallback.
GDBSX_XREPLAY = "/usr/sbin/gdbsx-xreplay"
NAMES = "gdbsx gdbsx-xreplay"
LOG = "/tmp/gdbsx.log"
#: Where the dom0 shell that runs gdbsx writes its exit status (``$?``).
RC = "/tmp/gdbsx.rc"
#: Attempts of :func:`start_gdbsx` when dom0's busybox segfaults meanwhile.
SEGV_ATTEMPTS = 3
#: gdbsx's word size argument: the lab's guests are all x86_64.
BITNESS = 64


def _listening_cmd(port: int) -> str:
    """A dom0 shell test: something listens on ``port`` (busybox has no ss; read /proc)."""
    return f"grep -qi ':{port:04X} 00000000:0000 0A' /proc/net/tcp"


def stop_gdbsx(lab: Lab) -> None:
    """End a gdbsx left waiting in dom0 (one no gdb ever reached still pauses the domU).

    Killing it would leave its pause on the domain (gdbsx unpauses only on its way out),
    so the way out is the protocol's: connect from dom0 and send ``D`` (detach), which
    makes it unpause and exit. Only one that does not go is killed.
    """
    rc, out = lab.dom0_run(f"pidof {NAMES} >/dev/null || {{ echo NONE; exit 0; }}; "
                           f"printf '$D#44' | nc -w 2 127.0.0.1 {GDBSX_DOM0_PORT} "
                           ">/dev/null 2>&1; sleep 0.3; pidof {NAMES} || echo NONE",
                           timeout=30)
    if "NONE" in out:
        return
    for _ in range(3):  # busybox sh in dom0 has been seen to die once (rc 139): retry
        rc, out = lab.dom0_run(f"for p in $(pidof {NAMES}); do kill -9 $p; done; "
                               f"sleep 0.2; pidof {NAMES} || echo NONE", timeout=30)
        if "NONE" in out:
            raise XReplayError("a gdbsx in dom0 did not detach and was killed: the domU may "
                               f"stay paused (`xreplay lab exec 'xl unpause {lab.domid}'`)")
    raise XReplayError(f"cannot stop the gdbsx left in dom0 (rc={rc}): {out.strip()[-200:]}")


def install_own_gdbsx(lab: Lab) -> bool:
    """Put the project's gdbsx (built on the host at boot) into dom0 once; False when the
    lab has none (then Debian's gdbsx is used)."""
    if lab.dom0_run(f"test -x {GDBSX_XREPLAY}", timeout=15)[0] == 0:
        return True
    host = lab.state.gdbsx_binary if lab.state else None
    if not host or not Path(host).exists():
        return False
    data = base64.b64encode(Path(host).read_bytes()).decode()
    lab.dom0(f"echo {data} | base64 -d > {GDBSX_XREPLAY}.tmp && chmod 755 {GDBSX_XREPLAY}.tmp"
             f" && mv {GDBSX_XREPLAY}.tmp {GDBSX_XREPLAY}", timeout=60)
    return True


def _exit_status(rc_text: str) -> str:
    """``exit status 1`` or ``killed by signal 11 (SIGSEGV)`` from the shell's ``$?``."""
    code = int(rc_text)
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = "?"
        return f"killed by signal {code - 128} ({name})"
    return f"exit status {code}"


def start_gdbsx(lab: Lab, domid: int | None = None, *, binary: str | None = None,
                timeout: float = 20.0) -> str:
    """Start gdbsx for ``domid`` (default: the lab's domU) and wait until it listens.

    Returns the host address to give gdb (``target remote``) or ``xreplay record --target``.
    A previous gdbsx still waiting is stopped first: only one can listen on the port.
    ``binary`` defaults to the project's build when dom0 has it, else Debian's.

    gdbsx runs under a dom0 shell that writes its exit status to :data:`RC`, so the wait
    ends on one of two real conditions: it listens, or it has exited (and how: its own
    words in :data:`LOG`, or the signal that killed it, with dom0's last kernel lines).
    ``pidof`` is not one: right after the start the background shell may not have
    exec'd gdbsx yet, and a "gone" taken from that moment would be a false one.

    A failure is retried (:data:`SEGV_ATTEMPTS` in all) on one named condition only:
    dom0's kernel logged a new busybox segfault during the attempt
    (:func:`busybox_segfaults`). Seen in the lab under load: the start command's shell
    died with rc 139, dom0's dmesg saying ``exe[273]: segfault at ffffff0000000000 ...
    in busybox``; its code bytes are a ``%fs``-relative (thread-local) load that returned
    that pointer: a wrong FS base or TLS in a busybox process of the PV dom0 on Xen under
    QEMU TCG, below gdbsx and xreplay.
    """
    last: XReplayError | None = None
    for attempt in range(1, SEGV_ATTEMPTS + 1):
        before = len(busybox_segfaults(lab))
        try:
            return _start_once(lab, domid, binary=binary, timeout=timeout)
        except XReplayError as exc:
            segv = busybox_segfaults(lab)[before:]
            if not segv:
                raise
            last = XReplayError(f"{exc}; dom0's busybox segfaulted meanwhile "
                                f"({attempt} of {SEGV_ATTEMPTS} attempts): {segv[-1]}")
    assert last is not None
    raise last


def busybox_segfaults(lab: Lab) -> list[str]:
    """dom0's kernel lines ``NAME[PID]: segfault at ... in busybox[...]`` so far (a dom0
    shell or applet killed by SIGSEGV, rc 139), oldest first; compare two calls' counts
    to see a new one (dmesg's clock is not /proc/uptime's)."""
    try:
        rc, out = lab.dom0_run("dmesg | grep 'segfault at' | grep busybox; true", timeout=15)
    except XReplayError:
        return []
    return [line.strip() for line in out.splitlines() if "segfault at" in line]


def _start_once(lab: Lab, domid: int | None, *, binary: str | None, timeout: float) -> str:
    address = lab.gdbsx_address  # raises for a lab booted without gdbsx
    domid = lab.domid if domid is None else domid
    if domid is None:
        raise XReplayError("the lab has no domU for gdbsx to attach to (booted with --domu none)")
    stop_gdbsx(lab)
    if binary is None:
        binary = GDBSX_XREPLAY if install_own_gdbsx(lab) else GDBSX
    run = f"{binary} -a {domid} {BITNESS} {GDBSX_DOM0_PORT}"
    rc, out = lab.dom0_run(f"rm -f {LOG} {RC}; (setsid sh -c '{run}; echo $? > {RC}.tmp; "
                           f"mv {RC}.tmp {RC}' </dev/null >{LOG} 2>&1 &); true", timeout=30)
    if rc != 0:
        raise XReplayError(f"starting gdbsx -a {domid} in dom0 failed: the shell exited "
                           f"with {_exit_status(str(rc))}: {out.strip()[-200:] or 'no output'}")
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        _rc, out = lab.dom0_run(f"{_listening_cmd(GDBSX_DOM0_PORT)} && echo LISTEN; "
                               f"[ -f {RC} ] && echo EXITED $(cat {RC}); cat {LOG}", timeout=15)
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        if "LISTEN" in lines:
            return address
        exited = next((ln.split()[1:] for ln in lines if ln.startswith("EXITED")), None)
        if exited is None and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        said = " ".join(ln for ln in lines if ln != "LISTEN" and not ln.startswith("EXITED"))
        if exited is not None:
            how = _exit_status(exited[0]) if exited and exited[0].isdigit() else "exited"
            why = f"exited ({how}) after {time.monotonic() - t0:.1f} s"
        else:
            why = (f"did not listen within {timeout:.0f} s ("
                   + _still_there(lab) + ")")
        hint = (" (the hypervisor lacks CONFIG_GDBSX: boot with `xreplay lab up --stub "
                "gdbsx`)" if "NOT enabled" in said else "")
        raise XReplayError(f"gdbsx -a {domid} in dom0 {why}: "
                           f"{'its output: ' + said if said else 'it printed nothing'}{hint}; "
                           f"{_dom0_context(lab, domid)} (Xen's serial log: {lab.serial_log})")


def _still_there(lab: Lab) -> str:
    """Whether a gdbsx runs in dom0 (for a start that timed out)."""
    try:
        pids = lab.dom0_run(f"pidof {NAMES} || echo none", timeout=15)[1].strip()
    except XReplayError as exc:
        return f"dom0 did not say whether gdbsx runs: {exc}"
    return ("no gdbsx process and no exit status: the dom0 shell that started it died"
            if pids == "none" else f"gdbsx pid {pids} is running but not listening")


def _dom0_context(lab: Lab, domid: int) -> str:
    """dom0's last kernel lines (a segfault is logged there) and the domain's xl state."""
    try:
        out = lab.dom0_run(f"dmesg | tail -n 3; xl list {domid} 2>&1 | tail -n 1",
                           timeout=15)[1]
    except XReplayError as exc:
        return f"dom0 did not answer for more ({exc})"
    return "dom0 dmesg and xl list: " + " | ".join(
        ln.strip() for ln in out.splitlines() if ln.strip())
