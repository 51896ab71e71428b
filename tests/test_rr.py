"""QEMU record/replay end to end: ``rr record`` with no debugger, snapshots taken on replays
(``record --from-rr``) checked against the lab guests' own counters, the live verdict,
determinism, ``rr last-write`` against the guest's sources, and the refusals.

Real qemu-system-x86_64 and gdb on the bare-metal lab guest; every process is started and
stopped by PID by the code under test.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from xreplay.cli import main
from xreplay.demo import SHADOW, record_lab_guest
from xreplay.lab.guests import (
    GUEST_DIR,
    LAB_PROBES,
    VARIANTS,
    build_guest,
    guest_args,
    parse_summary,
    qemu_command,
)
from xreplay.record import RecordOptions, WatchSpec
from xreplay.replay import replay
from xreplay.rr.lastwrite import last_write
from xreplay.rr.launcher import record_from_rr
from xreplay.rr.rundir import RunDir
from xreplay.xrr import ProbeSpec, XrrReader

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None
                                or shutil.which("gdb") is None,
                                reason="needs qemu-system-x86 and gdb (make deps)")
EVENTS = {"correct": 300, "unmask-no-reraise": 300, "ffs-off-by-one": 300}
"""Few events: a correct guest finishes (LAB-DONE, QEMU exits), the others hang sooner."""


def _record_run(tmp: Path, variant: str) -> tuple[Path, str]:
    """``rr record`` a lab variant to its hang marker (or its exit); (run dir, serial text)."""
    elf = build_guest("baremetal")
    serial = tmp / f"{variant}.serial"
    argv = qemu_command(elf, guest_args(variant, events=EVENTS.get(variant, 2000)), serial,
                        None)
    run = tmp / f"{variant}.rr"
    res = CliRunner().invoke(main, ["rr", "record", "-o", str(run), "--until", "LAB-HUNG",
                                    "--linger", "0.6", "--duration", "60", "--", *argv])
    assert res.exit_code == 0, res.output
    assert "ended by" in res.output
    return run, (run / "serial0.log").read_text()


def _from_rr(run: Path, out: Path) -> object:
    opts = RecordOptions(output=out, arch="x86_32",
                         probes=[ProbeSpec(r, s, r) for r, s in LAB_PROBES.items()],
                         watch=[WatchSpec(SHADOW, f"&{SHADOW}", 64)], dedupe=True,
                         hang_after=0.5)
    return record_from_rr(run, opts)


def _key(path: Path) -> list[tuple]:
    with XrrReader(path) as r:
        times = r.guest_times()
        return [(x.seq, x.probe, x.pc, x.flags, tuple(x.regions), times.get(x.seq))
                for x in r.records()]


@pytest.fixture(scope="module")
def lost(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The lost-upcall variant: one rr run, one recording taken on its replay."""
    tmp = tmp_path_factory.mktemp("rr-lost")
    run, serial = _record_run(tmp, "lost-upcall")
    out = tmp / "replay.xrr"
    result = _from_rr(run, out)
    return {"tmp": tmp, "run": run, "serial": serial, "xrr": out, "result": result}


@needs_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "lost-upcall"])
def test_every_variant_replays_to_the_guests_own_counters(variant: str,
                                                          tmp_path: Path) -> None:
    run, serial = _record_run(tmp_path, variant)
    summary = parse_summary(serial)
    assert summary is not None, serial
    m = RunDir(run).read()
    if variant == "correct":
        assert summary["tag"] == "LAB-DONE" and m.ended_by == "guest-exit"
    else:
        assert summary["tag"] == "LAB-HUNG" and m.ended_by == "until"
        assert m.end_icount and m.until_icount and m.until_icount <= m.end_icount
    out = tmp_path / "r.xrr"
    result = _from_rr(run, out)
    _check_counts(out, summary)
    if variant != "correct":
        assert result.reason == "hang"  # the log ends with the guest blocked for good
        with XrrReader(out) as r:  # ... and the replay stopped there, not past it
            times = r.guest_times()
            assert times[max(times)] == m.end_icount


def _check_counts(out: Path, summary: dict[str, str]) -> None:
    with XrrReader(out) as r:
        names = [p.name for p in r.header.probes]
        hits = Counter(names[x.probe] for x in r.records())
        assert r.header.replay["kind"] == "qemu-rr"
        times = r.guest_times()
        assert len(times) == sum(hits.values())  # every snapshot has its icount
        assert list(times.values()) == sorted(times.values())
    assert hits["upcall"] == int(summary["upcalls"])
    assert hits["bottom-half"] == int(summary["bottom_halves"])
    assert hits["block"] == int(summary["blocks"])


@needs_qemu
@pytest.mark.qemu
def test_lost_upcall_replay_matches_counters_and_the_live_verdict(lost: dict) -> None:
    summary = parse_summary(lost["serial"])
    assert summary is not None and summary["tag"] == "LAB-HUNG"
    _check_counts(lost["xrr"], summary)
    assert lost["result"].reason == "hang"
    live_path = lost["tmp"] / "live.xrr"
    record_lab_guest("baremetal", "lost-upcall", live_path, hang_after=1.0)

    def verdict(path: Path) -> list[tuple]:
        return [(f.kind, f.snapshot, f.upcall_snapshot, f.ports, f.fields)
                for f in replay(path).findings if f.severity != "info"]

    live, replayed = verdict(live_path), verdict(lost["xrr"])
    assert live and live[0][0] == "missed-clear"
    assert replayed == live


@needs_qemu
@pytest.mark.qemu
def test_a_run_replays_to_the_same_snapshots_twice(lost: dict) -> None:
    again = lost["tmp"] / "again.xrr"
    _from_rr(lost["run"], again)
    assert _key(again) == _key(lost["xrr"])
    last = _key(again)[-1]
    res = CliRunner().invoke(main, ["show", str(again), "--at", str(last[0]), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["icount"] == last[-1]


def _source_line(path: Path, pattern: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.search(pattern, line):
            return n
    raise AssertionError(f"{pattern!r} not in {path}")


def _lost_snapshots(lost: dict) -> tuple[list, list[str]]:
    with XrrReader(lost["xrr"]) as r:
        return list(r.records()), [p.name for p in r.header.probes]


@needs_qemu
@pytest.mark.qemu
def test_replay_names_the_last_writer_of_upcall_pending_and_nothing_after_it(
        lost: dict) -> None:
    """``replay`` of a from-rr recording: the lost upcall's evtchn_upcall_pending was set by
    Xen's vcpu_mark_events_pending just before the last upcall, and never cleared."""
    recs, names = _lost_snapshots(lost)
    hang = recs[-1].seq
    last_upcall = max(x.seq for x in recs if names[x.probe] == "upcall")
    res = CliRunner().invoke(main, ["replay", "--json", str(lost["xrr"])])
    assert res.exit_code == 1, res.output
    data = json.loads(res.output)
    (mc,) = [f for f in data["findings"] if f["kind"] == "missed-clear"]
    writers = {w["field"]: w for w in data["last_writers"]}
    assert set(writers) == {"vcpu 0 evtchn_upcall_pending", "vcpu 0 evtchn_pending_sel"}
    w = writers["vcpu 0 evtchn_upcall_pending"]["write"]
    assert (w["old"], w["new"]) == (0, 1) and mc["snapshot"] == hang
    assert w["function"] == "vcpu_mark_events_pending" and Path(w["file"]).name == "hv.c"
    assert w["line"] == _source_line(GUEST_DIR / "hv.c",
                                     r"__atomic_exchange_n\(&vi->evtchn_upcall")
    assert (w["after_snapshot"], w["before_snapshot"]) == (last_upcall - 1, last_upcall)
    sel = writers["vcpu 0 evtchn_pending_sel"]["write"]
    assert sel["function"] == "sync_test_and_set_bit" and sel["new"] & ~sel["old"]
    assert sel["icount"] < w["icount"]  # Xen sets the selector bit, then upcall_pending


@needs_qemu
@pytest.mark.qemu
def test_last_write_names_the_writer_of_a_pending_word(lost: dict) -> None:
    recs, names = _lost_snapshots(lost)
    # a pending word is written at every (coalesced) set_pending: stop the replay early, at
    # an upcall (Xen set a port's bit, then the selector and upcall_pending, then it fired)
    early = next(x.seq for x in recs if x.seq > 40 and names[x.probe] == "upcall")
    word = "HYPERVISOR_shared_info.evtchn_pending[0]"
    res = CliRunner().invoke(main, ["rr", "last-write", str(lost["run"]), word,
                                    "--before", str(early), "--json"])
    assert res.exit_code == 0, res.output
    w = json.loads(res.output)["last"]
    assert w is not None and w["new"] is not None and w["old"] is not None
    assert w["before_snapshot"] is not None and w["before_snapshot"] <= early
    assert w["new"] & ~w["old"] and not w["old"] & ~w["new"]  # Xen set a bit, none cleared
    assert w["function"] == "sync_test_and_set_bit" and Path(w["file"]).name == "lab.h"
    assert w["line"] == _source_line(GUEST_DIR / "lab.h", r"__atomic_fetch_or\(w, m")
    assert "hv_set_pending" in w["backtrace"][0]
    vi = "HYPERVISOR_shared_info.vcpu_info[0].evtchn_upcall_pending"
    every = last_write(lost["run"], vi, before=early, every=True)
    assert len(every.writes) > 10
    assert [x.new for x in every.writes[:4]] == [1, 0, 1, 0]  # set by Xen, cleared by the guest
    assert all(x.icount <= every.before_icount for x in every.writes)


@pytest.mark.parametrize("args, needle", [
    (["-accel", "kvm"], "-accel kvm cannot be recorded: record/replay needs TCG"),
    (["-enable-kvm"], "-enable-kvm cannot be recorded"),
    (["-machine", "pc,accel=kvm"], "needs TCG"),
    (["-s"], "-s cannot be recorded: the recording runs without a debugger"),
    (["-gdb", "tcp::1234"], "-gdb cannot be recorded"),
    (["-icount", "shift=3,sleep=off"], "sleep=off with rr= hangs"),
    (["-icount", "shift=3,rr=replay,rrfile=x"], "xreplay adds rr=record"),
    (["-drive", "file=disk.img"], "blkreplay"),
    (["-nic", "user"], "filter-replay"),
])
def test_refusals_are_one_line_and_exit_2(args: list[str], needle: str,
                                         tmp_path: Path) -> None:
    out = tmp_path / "x.rr"
    res = CliRunner().invoke(main, ["rr", "record", "-o", str(out), "--",
                                    "qemu-system-x86_64", "-kernel", "k", *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.output
    assert not out.exists()  # refused before anything was created
