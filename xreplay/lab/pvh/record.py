"""Record the lab unikernel on the real Xen through gdbsx, until it hangs.

Why gdbsx: a PVH guest's memory is out of reach of QEMU's whole-machine stub under TCG;
Xen's own per-domain stub reads it by guest virtual address. The domain is created paused
(``xl create -p``); gdbsx adds its own pause while it waits for gdb, so xl's is dropped
before the recorder attaches, and the recorder's first continue starts the guest: the
recording starts at the guest's first instruction, and the LAB-READY ports are read from
its console while it is being recorded. The flood helper starts once the ports are known.
gdbsx ignores gdb's interrupt while the domain runs, so ending a recording (a hang, the
duration) pauses the domain from dom0 (``xl pause``), which gdbsx reports as the stop.

After a hang the recorder's hang snapshot is the guest's last state; the domain stays
hung after gdb detaches (nothing in the guest changes while it is blocked), so Xen's 'e'
dump taken next describes the same state, port by port.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from xreplay.debugkeys import DomainEvtchnDump
from xreplay.errors import XReplayError
from xreplay.lab import pvh
from xreplay.lab.xen import vmcb
from xreplay.lab.xen.lab import Lab
from xreplay.lab.xen.stage import Progress, quiet
from xreplay.record import Recorder, RecordOptions, RecordResult
from xreplay.record.build import RecordChoices, build_options
from xreplay.replay.diff import DebugkeysCheck, check_debugkeys
from xreplay.snapshot import Snapshot
from xreplay.xrr import XrrReader

PROFILE = "mirage"
"""The unikernel is recorded with ``xreplay record``'s mirage-xen preset (its names:
``solo5__xen_evtchn_vector_handler``, ``mirage_xen_evtchn_demux_pending``,
``mirage_xen_evtchn_block_domain``, ``solo5__xen_HYPERVISOR_SHARED_INFO``, the shadow
``evtchn_callback_ml``), as a MirageOS unikernel would be."""
DEFAULT_HANG_AFTER = 5.0
"""gdbsx costs ~0.1 s per hit and the timer ticks every 10 ms of guest time: 5 s without a
hit is far beyond any gap of a running guest."""


def record_options(uk: pvh.Unikernel, target: str, output: Path, *,
                   hang_after: float | None = DEFAULT_HANG_AFTER,
                   duration: float | None = None, count: int | None = None,
                   own_gdbsx: bool = False, remote_log: Path | None = None) -> RecordOptions:
    """RecordOptions for the unikernel behind ``target`` (a gdbsx address): the
    :data:`PROFILE` preset, then what gdbsx needs; with ``remote_log`` gdb writes every
    packet of the session there (``set remotelogfile``), for a failure to show its last."""
    from xreplay.gdb.gdbsx import adapt_options

    delivery = ({"mechanism": "callback-vector", "vector": pvh.UPCALL_VECTOR}
                if uk.variant == "callback-irq" else
                {"mechanism": "upcall-vector", "vector": pvh.UPCALL_VECTOR})
    opts = build_options(RecordChoices(
        output=Path(output), target=target, elf=uk.elf, arch=pvh.ARCH, profile=PROFILE,
        labels={uk.ports.get(k, d): k if k != "timer" else "VIRQ_TIMER" for k, d in
                (("xenstore", 1), ("console", 2), ("timer", 3), ("flood", 64))},
        count=count, duration=duration, hang_after=hang_after, kill_target=False))
    opts.description = (f"xreplay lab unikernel (PVH, x86_64) variant={uk.variant} on the "
                        f"lab's Xen 4.17, domain {uk.name} (domid {uk.domid}), via "
                        f"{'the project' if own_gdbsx else 'Debian'}'s gdbsx in dom0, "
                        f"--profile {PROFILE}")
    opts.delivery = delivery
    adapt_options(opts, own_build=own_gdbsx)
    if remote_log is not None:
        opts.extra_gdb_commands.append(f"set remotelogfile {remote_log}")
    return opts


class UnikernelStopped(XReplayError):
    """The unikernel stopped running during or right after its recording: the message is
    :meth:`pvh.Unikernel.fate` (xl's state, Xen's lines, the emulator's failure when
    Xen's dump shows it) and where the recording is."""


@dataclass
class UnikernelRecording:
    """One recorded run and what Xen said about the domain afterwards."""

    unikernel: pvh.Unikernel
    result: RecordResult
    xl_state: str
    dump: DomainEvtchnDump | None
    dump_text: str
    console: list[str] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)
    """What the debug session left in the vCPU's VMCB right after gdbsx detached, against
    the VMCB before it attached (:func:`xreplay.lab.xen.vmcb.left_behind`); empty: as found."""

    @property
    def hung(self) -> bool:
        return self.result.reason == "hang"


def record(lab: Lab, variant: str, output: Path, *,
           hang_after: float | None = DEFAULT_HANG_AFTER, duration: float | None = None,
           count: int | None = None, window_us: int = pvh.DEFAULT_WINDOW_US,
           period_ms: int = pvh.DEFAULT_PERIOD_MS,
           progress: Progress = quiet, destroy: bool = True) -> UnikernelRecording:
    """Create the unikernel paused, record it through gdbsx from its first instruction
    until it hangs (or ``count`` snapshots, or ``duration``), then read Xen's 'e' dump
    and ``xl list``. ``count`` ends at a probe hit, where the guest is stopped anyway; a
    ``duration`` end on a busy guest needs gdbsx to stop a running domain, which is
    unreliable (see :func:`record`'s ``on_interrupt``): prefer ``count`` there."""
    from xreplay.lab.xen.gdbsx import install_own_gdbsx, start_gdbsx, stop_gdbsx

    uk = pvh.boot(lab, variant, window_us=window_us, period_ms=period_ms, paused=True)
    progress(f"{uk.name}: domid {uk.domid}, created paused")
    try:
        before = _vmcbs(uk)  # the vCPU as the debugger finds it
        own = install_own_gdbsx(lab)  # the project's gdbsx when the lab built one
        target = start_gdbsx(lab, uk.domid)
        # gdbsx holds its own pause: dropping xl's now lets the recorder's first
        # "continue" start the guest (with xl's still held, gdbsx reports a stop at once)
        lab.dom0(f"xl unpause {uk.domid}", timeout=60)
        progress(f"gdbsx for domid {uk.domid} listens; recording to {output}")
        rsp_log = rsp_log_path(output)
        opts = record_options(uk, target, output, hang_after=hang_after, duration=duration,
                              count=count, own_gdbsx=own, remote_log=rsp_log)
        running = threading.Event()
        problems: list[BaseException] = []

        def on_progress(_p: object) -> None:
            running.set()

        paused_by_us = threading.Event()

        def on_interrupt() -> None:
            # gdbsx ignores gdb's interrupt while the domain runs (measured: nothing in
            # 10 s) and reports a stop once the domain is paused (XEN_DOMINF_paused). Its
            # own step-over-breakpoint cycle unpauses the domain once, which can eat one
            # pause: take two (xl pause counts), dropped again after the recording.
            lab.dom0(f"xl pause {uk.domid}; xl pause {uk.domid}", timeout=30)
            paused_by_us.set()

        rec = Recorder(opts, on_progress=on_progress, on_interrupt=on_interrupt)

        def start_guest() -> None:
            try:
                if not running.wait(120):
                    raise XReplayError("the recorder never let the unikernel run")
                pvh.wait_ready(uk, timeout=120)
                progress(f"{uk.name}: LAB-READY, ports {uk.ports}; flood started")
            except BaseException as exc:  # noqa: BLE001 - surfaced after the recording
                problems.append(exc)
                rec.request_stop("interrupted")

        helper = threading.Thread(target=start_guest, daemon=True)
        helper.start()
        result = rec.run()
        helper.join(130)
        if problems:
            raise problems[0]
        progress(f"recorded {result.snapshots} snapshots in {result.elapsed:.1f} s, "
                 f"ended by {result.reason}")
        stop_gdbsx(lab)  # a gdbsx whose gdb left has exited; make sure
        if paused_by_us.is_set():
            _unpause_all(lab, uk.domid)
        left = detach_state(uk, before)
        if left:
            progress(f"{uk.name}: the debug session left in the vCPU: {'; '.join(left)}")
        time.sleep(1.0)
        fate = uk.fate()
        if fate is not None:
            raise UnikernelStopped(f"{fate}; the recording ({result.snapshots} snapshots, "
                                   f"ended by {result.reason}) is in {output}; at detach "
                                   "the vCPU held: " + ("; ".join(left) or "its state from "
                                                        "before the session")
                                   + f"; {last_packets(rsp_log)}")
        state = uk.xl_state()
        dump, text = uk.e_dump()
        return UnikernelRecording(uk, result, state, dump, text, uk.console(), left)
    finally:
        if destroy:
            uk.destroy()


def rsp_log_path(output: Path) -> Path:
    """Where a lab recording keeps gdb's log of its gdbsx session: ``FILE.rsp.log``."""
    output = Path(output)
    return output.with_name(output.name + ".rsp.log")


def last_packets(log: Path, n: int = 6) -> str:
    """The session's last ``n`` packets from gdb's remote log (``w``: gdb sent, ``r``: the
    stub answered), for a failure message; or that there is none."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError as exc:
        return f"no gdbsx packet log ({exc.strerror}: {log})"
    tail = [ln if len(ln) <= 80 else ln[:77] + "..." for ln in lines[-n:]]
    return f"the gdbsx session's last packets ({log}): " + " | ".join(tail)


def _vmcbs(uk: pvh.Unikernel) -> list[vmcb.Vmcb] | str:
    """The domain's VMCBs, or why Xen's 'v' key did not give them (said, not fatal)."""
    try:
        return uk.vmcbs()
    except XReplayError as exc:
        return str(exc)


def detach_state(uk: pvh.Unikernel, before: list[vmcb.Vmcb] | str) -> list[str]:
    """What the vCPU holds after gdbsx detached that it did not hold before the session
    (intercepts, RFLAGS.TF, DR6.BS, DR7, a latched event), read back from Xen's VMCB."""
    after = _vmcbs(uk)
    if isinstance(after, str) or isinstance(before, str):
        why = after if isinstance(after, str) else before
        return [f"unknown: the VMCB could not be read ({why})"]
    left = vmcb.left_behind(before, after)
    if any("intercept" in item for item in left):
        # Xen drops the debugger's intercepts lazily, when the vCPU is next scheduled in
        # (svm_do_resume's debug_state_latch): a vCPU blocked since the detach shows them
        state = pvh.Unikernel.state_of(uk.lab, uk.domid)
        if "b" in state or "p" in state:
            left.append(f"(the domain is {state!r}: its vCPU has not been scheduled in since "
                        "the detach, and Xen re-latches the intercepts when it is)")
    return left


def _unpause_all(lab: Lab, domid: int, most: int = 4) -> None:
    """Drop the pauses we took (gdbsx may have dropped one of them itself)."""
    for _ in range(most):
        if "p" not in pvh.Unikernel.state_of(lab, domid):
            return
        lab.dom0(f"xl unpause {domid}", timeout=30)


# ----------------------------------------------------------------------------- cross-check


def last_snapshot(path: Path) -> Snapshot:
    """The recording's last snapshot (the hang snapshot after a hang)."""
    with XrrReader(path) as reader:
        last = None
        for last in reader.snapshots():  # noqa: B007 - we want the last one
            pass
    if last is None:
        raise XReplayError(f"{path}: no snapshot recorded")
    return last


def cross_check(path: Path, dump: DomainEvtchnDump) -> DebugkeysCheck:
    """The recording's last snapshot against Xen's 'e' dump, port by port (what
    ``xreplay replay --debugkeys`` does)."""
    return check_debugkeys(last_snapshot(path), dump)
