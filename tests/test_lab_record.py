"""End to end: the recorder against the lab guests, under real gdbserver and real QEMU.

Each variant is recorded on each target and the recorded content is checked against what
the guest does (see xreplay/lab/guest/README.md), then replayed: the right detector must
fire at the right snapshot, naming the right ports and fields.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from xreplay.demo import SHADOW, lab_record_options, record_lab_guest
from xreplay.lab.guests import start_guest
from xreplay.record import Recorder
from xreplay.replay import replay
from xreplay.xrr import XrrReader

KINDS = ["process", pytest.param("baremetal", marks=pytest.mark.qemu)]
pytestmark = pytest.mark.skipif(shutil.which("gdbserver") is None
                                or shutil.which("qemu-system-x86_64") is None,
                                reason="needs gdbserver and qemu-system-x86 (make deps)")


def _findings(path: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in replay(path).findings:
        out.setdefault(f.kind, []).append(f)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_lost_upcall_hangs_at_1_0_1(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "lost.xrr"
    result = record_lab_guest(kind, "lost-upcall", out, hang_after=1.5)
    assert result.reason == "hang" and result.hang_snapshot is not None
    with XrrReader(out) as r:
        hang = r.snapshot(result.hang_snapshot)
        before = r.snapshot(result.hang_snapshot - 1)
        assert r.header.arch == ("x86_64" if kind == "process" else "x86_32")
    assert hang.hang and hang.probe == "hang"
    v0 = hang.vcpus[0]
    assert v0.evtchn_upcall_pending == 1 and v0.evtchn_pending_sel == 0x1
    pms = {p.port: p.pms for p in hang.port_table()}
    assert pms[1] == pms[3] == pms[4] == "[1/0/1]"
    assert pms[2] == "[1/1/1]"  # the console, kept masked
    assert before.probe == "upcall"  # the top half that EOI'd: no bottom half after it
    found = _findings(out)
    (mc,) = found["missed-clear"]
    assert mc.snapshot == result.hang_snapshot and mc.upcall_snapshot == before.index
    assert set(mc.ports) == {1, 3, 4}
    assert mc.fields == ["evtchn_upcall_pending", "evtchn_pending_sel"]


@pytest.mark.parametrize("kind", KINDS)
def test_correct_guest_runs_to_completion_without_findings(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "ok.xrr"
    result = record_lab_guest(kind, "correct", out, events=500, hang_after=5)
    # a process exits; QEMU quits through isa-debug-exit, so its stub goes away
    assert result.reason in ("target-exited", "target-lost")
    with XrrReader(out) as r:
        snaps = list(r.snapshots())
    roles = {s.probe for s in snaps}
    assert {"upcall", "bottom-half", "block"} <= roles
    # every bottom half clears evtchn_upcall_pending and the selector it took
    for a, b in zip(snaps, snaps[1:], strict=False):
        if a.probe == "bottom-half" and b.probe in ("block", "upcall"):
            assert b.vcpus[0].evtchn_pending_sel & a.vcpus[0].evtchn_pending_sel == 0 or \
                b.vcpus[0].evtchn_upcall_pending == 1
    serious = [f for f in replay(out).findings if f.severity != "info"]
    assert serious == []


@pytest.mark.parametrize("kind", KINDS)
def test_unmask_without_reraise_strands_netfront(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "strand.xrr"
    record_lab_guest(kind, "unmask-no-reraise", out, events=2000, hang_after=1.5)
    with XrrReader(out) as r:
        last = list(r.snapshots())[-1]
    assert last.port_state(4).pms == "[1/0/0]"  # pending, unmasked, no selector bit
    assert last.vcpus[0].evtchn_upcall_pending == 0
    found = _findings(out)
    assert any(4 in f.ports for f in found["stranded-port"])


@pytest.mark.parametrize("kind", KINDS)
def test_ffs_off_by_one_loses_a_pending_port(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "ffs.xrr"
    record_lab_guest(kind, "ffs-off-by-one", out, events=2000, hang_after=1.5)
    with XrrReader(out) as r:
        last = list(r.snapshots())[-1]
    shadow = last.watch[SHADOW]
    assert shadow[5] == 1  # the guest marked port 5 ...
    assert last.port_state(4).pms == "[1/1/0]"  # ... while port 4 stays masked, undelivered
    (lp, *_) = _findings(out)["lost-pending"]
    assert lp.ports == [4] and "evtchn_callback_ml[5]" in lp.message


@pytest.mark.parametrize("kind", KINDS)
def test_detach_lets_the_guest_finish(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "detach.xrr"
    with start_guest(kind, "correct", events=400) as guest:  # type: ignore[arg-type]
        opts = lab_record_options(guest, out, count=60, kill_target=False)
        result = Recorder(opts).run()
        assert result.reason == "count" and result.snapshots == 60
        text = guest.wait_for_output("LAB-DONE", timeout=60)
        assert "handled=400" in text
    with XrrReader(out) as r:
        assert len(list(r.records())) == 60 and r.trailer["reason"] == "count"


@pytest.mark.parametrize("kind", KINDS)
def test_target_killed_mid_recording_leaves_a_readable_file(kind: str,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "killed.xrr"
    with start_guest(kind, "correct", events=100000) as guest:  # type: ignore[arg-type]
        rec = Recorder(lab_record_options(guest, out))
        done: list = []
        t = threading.Thread(target=lambda: done.append(rec.run()))
        t.start()
        deadline = time.monotonic() + 30
        while rec.sink.count < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(guest.pid, signal.SIGKILL)
        t.join(60)
    assert done and done[0].reason in ("target-lost", "target-exited")
    with XrrReader(out) as r:
        snaps = list(r.snapshots())
    assert len(snaps) >= 50
    assert all(s.probe in ("upcall", "bottom-half", "block") for s in snaps)
