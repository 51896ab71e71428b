"""``xreplay lab demo``: the seed's hang on the real Xen, found by xreplay.

Boots the gdbsx lab (Xen 4.17 rebuilt with gdbsx, no domU of its own), creates the lab
unikernel, records it through gdbsx from its first instruction until it hangs, then puts
side by side what Xen says (its 'e' key for the domain) and what xreplay recorded (the
hang snapshot as a ``[p/m/s]`` table), checks them port by port, and replays the
recording. The exit status is ``replay``'s: 1 when it finds a lost delivery.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xreplay.errors import XReplayError
from xreplay.lab.pvh.record import UnikernelRecording, cross_check, last_snapshot, record
from xreplay.lab.xen.lab import Lab
from xreplay.lab.xen.stage import Progress, quiet
from xreplay.replay.diff import DebugkeysCheck
from xreplay.replay.replayer import replay
from xreplay.replay.walk import ReplayResult
from xreplay.snapshot import Snapshot

WIDTH = 96


@dataclass
class DemoResult:
    recording: UnikernelRecording
    snapshot: Snapshot
    check: DebugkeysCheck
    replay: ReplayResult
    dump_path: Path

    @property
    def exit_code(self) -> int:
        return 1 if self.replay.failed else 0


def ensure_lab(run_dir: Path | None, progress: Progress = quiet) -> tuple[Lab, bool]:
    """The gdbsx lab running in ``run_dir`` (``False``: not ours to stop), or a new one
    booted there (``True``)."""
    try:
        lab = Lab.attach(run_dir)
    except XReplayError:
        lab = None
    if lab is not None:
        assert lab.state is not None
        if lab.state.stub != "gdbsx":
            raise XReplayError(f"the lab running in {lab.state.run_dir} has no gdbsx: stop it "
                               "(xreplay lab down) or give another --run-dir")
        progress(f"using the gdbsx lab running in {lab.state.run_dir}")
        return lab, False
    # single-threaded TCG, as tests/test_xenlab_pvh_gdbsx.py boots it: under multi-threaded
    # TCG QEMU 7.2 lost the unikernel's IDT page right after a gdbsx detach (README, Limits)
    lab = Lab(run_dir, domu="none", stub="gdbsx", progress=progress, tcg_thread="single")
    lab.start()
    return lab, True


def run(lab: Lab, variant: str, output: Path, *, hang_after: float = 5.0,
        count: int | None = None, progress: Progress = quiet) -> DemoResult:
    """Record ``variant`` until it hangs (or ``count`` snapshots), cross-check, replay."""
    rec = record(lab, variant, output, hang_after=hang_after, count=count, progress=progress)
    dump_path = output.with_name(output.name + ".e.txt")
    dump_path.write_text(rec.dump_text + "\n")
    snap = last_snapshot(output)
    check = cross_check(output, rec.dump) if rec.dump is not None else None
    assert check is not None
    return DemoResult(rec, snap, check, replay(output), dump_path)


def render(res: DemoResult) -> str:
    """Xen's 'e' dump and xreplay's last snapshot side by side, then both verdicts."""
    rec, snap, uk = res.recording, res.snapshot, res.recording.unikernel
    v = snap.vcpus.get(0)
    what = "hang snapshot" if snap.hang else "last snapshot"
    left = [f"Xen: xl debug-keys e, domain {uk.domid}", f"xl list: {rec.xl_state}"]
    left += [ln.replace("(XEN) ", "", 1) for ln in rec.dump_text.splitlines()[2:]]
    right = [f"xreplay: {what} #{snap.index}", f"vCPU 0 at pc {snap.pc:#x}, IF="
             f"{int(snap.interrupts_enabled) if snap.interrupts_enabled is not None else '?'}"]
    right.append("    port [p/m/s]")
    right += [p.render() for p in snap.port_table([p.port for p in rec.dump.ports])]
    if v is not None:
        right.append(f"upcall_pending={v.evtchn_upcall_pending} "
                     f"pending_sel={v.evtchn_pending_sel:#x}")
    half = max(len(x) for x in left) + 2
    rows = [f"{a:<{half}}| {b}" for a, b in zip(left + [""] * (len(right) - len(left)),
                                                right + [""] * (len(left) - len(right)),
                                                strict=True)]
    out = [f"The lab unikernel ({uk.variant}) on the lab's Xen 4.17, recorded through "
           f"gdbsx: {rec.result.snapshots} snapshots in {rec.result.elapsed:.1f} s, "
           f"ended by {rec.result.reason}", "", *rows, ""]
    agree = sum(1 for p in res.check.ports if p["agree"])
    n = len(res.check.ports)
    if rec.hung:
        verdict = "AGREE on all" if res.check.agree else f"DISAGREE: agree on {agree} of"
        out.append(f"cross-check (Xen's 'e' vs {what} #{snap.index}): {verdict} {n} ports")
        for p in res.check.ports:
            if not p["agree"]:
                out.append(f"  port {p['port']}: Xen {p['xen'] or '-'} xreplay {p['guest']} "
                           f"({', '.join(p['fields']) or 'only in the ' + str(p['only_in'])})")
    else:
        out.append(f"cross-check: not a witness here (agree on {agree} of {n} ports): the "
                   "guest did not hang and ran on after the recording, so Xen's dump shows "
                   "a later moment than the last snapshot")
    serious = [f for f in res.replay.findings if f.severity != "info"]
    if not serious:
        why = res.replay.incomplete()  # never a clean bill on data that was not read
        out.append(f"replay: no verdict: {why}" if why else "replay: no lost event delivery found")
    for f in serious:
        ports = ", ".join(map(str, f.ports or []))
        out.append(f"replay: {f.kind} at #{f.snapshot} (vCPU {f.vcpu}; fields "
                   f"{', '.join(f.fields or [])}; ports {ports})")
        out.append(textwrap.fill(f.message, WIDTH, initial_indent="  ",
                                 subsequent_indent="  "))
    out.append("")
    out.append(f"recording {rec.result.output}, Xen's dump {res.dump_path}; again: "
               f"xreplay replay {rec.result.output} --debugkeys {res.dump_path}")
    return "\n".join(out)


def demo(variant: str, output: Path, *, run_dir: Path | None = None, keep: bool = False,
         count: int | None = None, progress: Progress = quiet,
         say: Callable[[str], None] = print) -> int:
    """The whole demo; returns the exit status."""
    lab, ours = ensure_lab(run_dir, progress)
    try:
        res = run(lab, variant, output, count=count, progress=progress)
        say(render(res))
        return res.exit_code
    finally:
        if ours and not keep:
            lab.stop()
        elif ours:
            progress(f"lab left running (QEMU pid {lab.pid}): xreplay lab down"
                     + (f" --run-dir {run_dir}" if run_dir else ""))

