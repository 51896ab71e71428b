"""The two hit loops record the same thing: the in-gdb agent and the direct remote-protocol
loop (xreplay.record.direct) on the same guest, same seed, compared snapshot by snapshot.

The lab's process guest is deterministic (its Xen model runs from a seeded schedule), so
under gdbserver every decoded snapshot, register and region byte must be equal; QEMU's
bare-metal guest takes real LAPIC interrupts whose timing varies under TCG, so there the
verdict and the hang snapshot's state must agree.  Also: the fallback to the agent when
the options need gdb at each hit, and ``--hit-loop direct`` refusing loudly then.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from xreplay.demo import lab_record_options
from xreplay.errors import XReplayError
from xreplay.lab.guests import STYLE_PROFILE, GuestBuild, start_guest
from xreplay.record import Recorder, RecordResult
from xreplay.record.build import RecordChoices, build_options
from xreplay.replay import replay
from xreplay.xrr import XrrReader

pytestmark = pytest.mark.skipif(shutil.which("gdbserver") is None, reason="needs gdbserver")


def _record_lab(kind: str, variant: str, out: Path, hit_loop: str, **kw) -> RecordResult:
    with start_guest(kind, variant, seed=1, events=kw.pop("events", 600)) as guest:
        opts = lab_record_options(guest, out, hit_loop=hit_loop, **{"hang_after": 3.0, **kw})
        return Recorder(opts).run()


def _record_build(build: GuestBuild, variant: str, out: Path, hit_loop: str,
                  **choices) -> RecordResult:
    with start_guest(build, variant) as guest:
        opts = build_options(RecordChoices(
            output=out, target=guest.address, elf=guest.elf,
            profile=STYLE_PROFILE[build.style], hang_after=3.0, kill_target=True,
            hit_loop=hit_loop, **choices))
        return Recorder(opts).run()


def _records(path: Path) -> list[tuple]:
    """Everything stored per snapshot but the time; the hang snapshot's registers (where an
    interrupt happened to stop the guest) left out."""
    out = []
    with XrrReader(path) as r:
        for rec in r.records():
            regs = (None, None, None) if rec.hang else (rec.pc, rec.sp, rec.regflags)
            out.append((rec.probe, rec.vcpu, rec.hang, regs, tuple(rec.regions)))
        assert r.trailer is not None and r.problems == []  # known after a full pass
    return out


def _snapshots(path: Path) -> list:
    with XrrReader(path) as r:
        return [dataclasses.replace(s, t_ns=0, pc=0 if s.hang else s.pc,
                                    flags=None if s.hang else s.flags)
                for s in r.snapshots()]


def _hit_loop(path: Path) -> str:
    with XrrReader(path) as r:
        return str(r.header.target.get("hit_loop"))


def _assert_same(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    assert len(ra) == len(rb) > 10
    for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
        assert x == y, f"snapshot {i} differs between the agent's and the direct loop's"
    assert _snapshots(a) == _snapshots(b)


@pytest.mark.gdbserver
@pytest.mark.parametrize("variant", ["lost-upcall", "correct"])
def test_gdbserver_direct_loop_records_what_the_agent_records(variant: str,
                                                              tmp_path: Path) -> None:
    agent, fast = tmp_path / "agent.xrr", tmp_path / "direct.xrr"
    ra = _record_lab("process", variant, agent, "agent")
    rd = _record_lab("process", variant, fast, "direct")
    assert ra.hit_loop == "agent" and _hit_loop(agent) == "agent"
    assert rd.hit_loop.startswith("direct") and _hit_loop(fast) == "direct"
    assert "hardware breakpoints" in rd.hit_loop  # x86 gdbserver: Z1, no step-over
    assert ra.reason == rd.reason and ra.snapshots == rd.snapshots
    assert ra.hang_snapshot == rd.hang_snapshot
    assert rd.packets is not None and rd.packets_per_hit is not None
    assert rd.packets_per_hit < 4.5  # g, m (shared_info), m (shadow), vCont;c
    _assert_same(agent, fast)
    fa, fd = replay(agent).findings, replay(fast).findings
    assert [(f.kind, f.snapshot, f.ports) for f in fa] == [
        (f.kind, f.snapshot, f.ports) for f in fd]


@pytest.mark.gdbserver
@pytest.mark.parametrize("build", [GuestBuild("process", "solo5"),
                                   GuestBuild("process", "solo5", m32=True),
                                   GuestBuild("process", "minios", pie=True)],
                         ids=lambda b: b.name)
def test_declared_pages_and_followed_pointers_agree(build: GuestBuild, tmp_path: Path) -> None:
    """Solo5's 4096-byte page and Mini-OS's pointer set at boot (read through the pointer
    at every hit, the move noted) on both loops."""
    agent, fast = tmp_path / "agent.xrr", tmp_path / "direct.xrr"
    ra = _record_build(build, "lost-upcall", agent, "agent")
    rd = _record_build(build, "lost-upcall", fast, "direct")
    assert ra.reason == rd.reason == "hang" and rd.hit_loop.startswith("direct")
    _assert_same(agent, fast)
    with XrrReader(agent) as a, XrrReader(fast) as d:
        moved = [[n.data.get("address") for n in r.notes if n.data.get("event") ==
                  "region-moved"] for r in (a, d)]
    assert moved[0] == moved[1]


@pytest.mark.gdbserver
@pytest.mark.parametrize("variant", ["lost-upcall", "correct"])
def test_trace_loop_records_what_the_direct_loop_records(variant: str, tmp_path: Path) -> None:
    """gdbserver's tracepoints (xreplay.record.trace) against the direct loop: the same
    snapshots (probe, vCPU, pc/sp/flags, every region's bytes) at the same hit sequence, the
    same end (the hang judged on a batch with no hit) and the same verdicts."""
    fast, traced = tmp_path / "direct.xrr", tmp_path / "trace.xrr"
    rd = _record_lab("process", variant, fast, "direct")
    rt = _record_lab("process", variant, traced, "trace")
    assert _hit_loop(traced) == "trace" and "tracepoints" in rt.hit_loop
    assert rd.reason == rt.reason and rd.snapshots == rt.snapshots
    assert rd.hang_snapshot == rt.hang_snapshot
    _assert_same(fast, traced)
    fd, ft = replay(fast).findings, replay(traced).findings
    assert [(f.kind, f.snapshot, f.ports) for f in fd] == [
        (f.kind, f.snapshot, f.ports) for f in ft]
    with XrrReader(traced) as r:
        batches = [n.data for n in r.notes if n.data.get("event") == "trace-batches"]
    assert batches and batches[0]["snapshots"] == rt.snapshots - (1 if rt.hang_snapshot
                                                                 is not None else 0)
    # each snapshot's time is its hit's (gdbserver's timestamp), not the batch's fetch
    with XrrReader(traced) as r:
        times = [rec.t_ns for rec in r.records()]
    assert times == sorted(times) and len(set(times)) > len(times) // 2


@pytest.mark.gdbserver
def test_trace_loop_in_short_batches_loses_and_repeats_nothing(tmp_path: Path,
                                                               monkeypatch) -> None:
    """Batches of 7 hits (the buffer's floor is gdbserver's 5 MiB, so the batch size is
    forced here): each ends by itself at its 7th hit and the next starts from the stopped
    thread; the recording equals the direct loop's."""
    from xreplay.record import trace

    real = trace.TraceLoop.insert

    def small(self: trace.TraceLoop) -> None:
        real(self)
        self.batch = 7
        self._arm(self._want())

    monkeypatch.setattr(trace.TraceLoop, "insert", small)
    fast, traced = tmp_path / "direct.xrr", tmp_path / "trace.xrr"
    rd = _record_lab("process", "correct", fast, "direct", count=100, hang_after=None)
    rt = _record_lab("process", "correct", traced, "trace", count=100, hang_after=None)
    assert rd.reason == rt.reason == "count" and rt.snapshots == 100
    _assert_same(fast, traced)
    with XrrReader(traced) as r:
        batches = [n.data for n in r.notes if n.data.get("event") == "trace-batches"]
    assert [(b["batches"], b["snapshots"], b["batch"]) for b in batches] == [(15, 100, 7)]


@pytest.mark.gdbserver
def test_trace_loop_says_what_a_dying_gdbserver_took_with_it(tmp_path: Path) -> None:
    """gdbserver killed (by its PID) while a batch is in its buffer: the run ends as
    target-lost and the end note says the batch in progress was lost, never a silently
    shorter recording that looks complete."""
    import os
    import signal
    import threading
    import time

    out = tmp_path / "t.xrr"
    with start_guest("process", "lost-upcall", seed=1, events=600) as guest:
        opts = lab_record_options(guest, out, hit_loop="trace")  # no --hang-after: one batch
        result: list[RecordResult] = []
        t = threading.Thread(target=lambda: result.append(Recorder(opts).run()))
        t.start()
        time.sleep(3.0)  # the guest hangs within a second; its hits are in the buffer
        os.kill(guest.pid, signal.SIGKILL)
        t.join(30)
    assert result and result[0].reason == "target-lost"
    with XrrReader(out) as r:
        end = [n.data for n in r.notes if n.data.get("event") == "end"][-1]
        assert r.trailer is not None
    assert end["trace"]["snapshots"] == result[0].snapshots == 0
    assert "batch 1" in end["trace"]["lost"] and "not fetched" in end["trace"]["lost"]


@pytest.mark.gdbserver
def test_trace_loop_refuses_what_it_cannot_record(tmp_path: Path) -> None:
    """A region read through a pointer (Mini-OS's HYPERVISOR_shared_info set at boot): a
    tracepoint collects fixed addresses, so --hit-loop trace refuses in one line."""
    with pytest.raises(XReplayError, match="--hit-loop trace: a region is read through a "
                       "pointer"):
        _record_build(GuestBuild("process", "minios"), "lost-upcall", tmp_path / "m.xrr",
                      "trace")
    assert not (tmp_path / "m.xrr").exists()
    with pytest.raises(XReplayError, match="--hit-loop trace: --filter"):
        _record_lab("process", "lost-upcall", tmp_path / "g.xrr", "trace", filter="1")


@pytest.mark.gdbserver
def test_options_that_need_gdb_at_each_hit_fall_back_to_the_agent(tmp_path: Path) -> None:
    out = tmp_path / "f.xrr"
    res = _record_lab("process", "lost-upcall", out, "auto", filter="1")
    assert res.hit_loop == "agent" and res.reason == "hang"
    with pytest.raises(XReplayError, match="--hit-loop direct: --filter"):
        _record_lab("process", "lost-upcall", tmp_path / "g.xrr", "direct", filter="1")
    assert not (tmp_path / "g.xrr").exists()


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_qemu_direct_loop_agrees_with_the_agent(tmp_path: Path) -> None:
    agent, fast = tmp_path / "agent.xrr", tmp_path / "direct.xrr"
    ra = _record_lab("baremetal", "lost-upcall", agent, "agent", events=2000)
    rd = _record_lab("baremetal", "lost-upcall", fast, "direct", events=2000)
    assert rd.hit_loop.startswith("direct") and "software breakpoints" in rd.hit_loop
    assert ra.reason == rd.reason == "hang"
    fa, fd = replay(agent).findings, replay(fast).findings
    assert [(f.kind, f.ports) for f in fa if f.severity != "info"] == [
        (f.kind, f.ports) for f in fd if f.severity != "info"]
    with XrrReader(agent) as a, XrrReader(fast) as d:
        ha, hd = a.snapshot(ra.hang_snapshot), d.snapshot(rd.hang_snapshot)
        assert ha.hang and hd.hang
        assert {p.port: p.pms for p in ha.port_table()} == {
            p.port: p.pms for p in hd.port_table()}
        assert ha.vcpus == hd.vcpus
        # every stored hit is a probe's, with registers read, none repeated
        for s in d.snapshots():
            assert s.hang or (s.probe in ("upcall", "bottom-half", "block")
                              and s.flags is not None)
