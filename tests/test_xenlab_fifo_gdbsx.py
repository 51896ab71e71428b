"""A FIFO PV domU recorded and cross-checked through Xen's own stub, gdbsx (issue 14).

Why its own module: gdbsx reads guest-virtual addresses of its one domain, so the per-cpu
``cpu_control_block`` and the ``event_array[]`` pages are followed as virtual addresses
(no machine-address walk as on QEMU's stub), and this is where the domU's block probe
(``xen_safe_halt``, the same PV idle the 2-level lab recordings hit) is really hit: through
QEMU's whole-machine stub the same domU, measured on this lab, idled at 1 of ~200 hits
with the upcall or bottom-half probe set (70 block hits in 15 s with the block probe
alone), so the block-time FIFO checks ran only on the lab guest. The module boots one
gdbsx lab with ``--evtchn fifo`` and stops it by PID at its end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_xenlab_gdbsx import assert_runs_on, boot_gdbsx_lab

from xreplay.abi import fifo as fa
from xreplay.lab.xen import Lab
from xreplay.lab.xen.record import cross_check, lab_record_options, record_lab
from xreplay.profiles.linux import FIFO_SPARE_PAGES
from xreplay.record import Recorder
from xreplay.replay import replay
from xreplay.xrr import XrrReader

pytestmark = pytest.mark.xenlab

COUNT = 300


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    yield from boot_gdbsx_lab(tmp_path_factory, "xenlab-fifo-gdbsx", domu="pv",
                              evtchn="fifo")


@pytest.fixture(scope="module")
def recorded(lab: Lab, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("rec") / "domu-fifo-gdbsx.xrr"
    result, facts = record_lab(lab, path, count=COUNT, duration=900.0, stub="gdbsx")
    print(f"recorded {result.snapshots} through gdbsx in {result.elapsed:.2f} s "
          f"({result.rate:.1f}/s), unreadable {result.unreadable}")
    with XrrReader(path) as reader:
        header, snaps = reader.header, list(reader.snapshots())
    return result, facts, path, header, snaps


@pytest.fixture(scope="module")
def blocks_only(lab: Lab, tmp_path_factory: pytest.TempPathFactory):
    """The domU with its block probe alone: with the event-path probes set as well, every
    stop through gdbsx (two read passes) outlasts the guest's tick and it seldom idles
    (0 block hits in 300 on a quiet machine, 14 in 200 before the second pass)."""
    path = tmp_path_factory.mktemp("blk") / "domu-fifo-blocks.xrr"
    options, _ = lab_record_options(lab, path, extra=(), count=40, duration=120.0,
                                    stub="gdbsx")
    options.probes = [p for p in options.probes if p.role == "block"]
    result = Recorder(options).run()
    with XrrReader(path) as reader:
        snaps = list(reader.snapshots())
    return result, path, snaps


def test_the_fifo_domu_blocks_with_events_masked_and_replay_checks_it_there(
        blocks_only) -> None:
    result, path, snaps = blocks_only
    assert result.snapshots >= 10 and all(s.probe == "block" for s in snaps), result
    # PV Linux blocks with events masked; SCHEDOP_block unmasks them as it blocks
    assert all(s.vcpus[s.vcpu].evtchn_upcall_mask == 1 for s in snaps)
    assert all(not s.missing for s in snaps)
    res = replay(path)
    assert res.stats["abi"] == "fifo" and res.stats["quiescent_snapshots"] == len(snaps)
    assert [f for f in res.findings if f.severity != "info"] == [], [
        f.message for f in res.findings]


def test_gdbsx_records_the_fifo_domu_by_virtual_address(recorded) -> None:
    result, facts, _, header, snaps = recorded
    assert (facts.abi, facts.domain_type, facts.fifo_pages) == ("fifo", "pv", 1)
    assert result.reason == "count" and result.snapshots == COUNT
    assert not result.unreadable, result.unreadable  # spare pages are not "unreadable"
    assert header.target["kind"] == "gdbsx" and header.abi == "fifo"
    # the page count, then the page in use and the spare ones it may grow into
    assert [r.name for r in header.regions if r.kind.startswith("fifo")] == [
        "control_block.0", "event_array_pages",
        *(f"event_array.{i}" for i in range(1 + FIFO_SPARE_PAGES))]
    assert all(not s.missing and s.fifo.nr_ports == fa.EVENT_WORDS_PER_PAGE for s in snaps)
    timer = next(p for p, name in header.labels.items() if name == "VIRQ_TIMER")
    entries = [s for s in snaps if s.probe in ("upcall", "bottom-half")]
    assert len(entries) >= COUNT // 3
    # Xen queued the timer on queue 0 (Linux's XEN_IRQ_PRIORITY_MAX), as through QEMU's
    # stub: at the upcall and at the bottom half's entry it is LINKED with ready bit 0 set
    # (measured: at every one of 124, 154 and 129 such hits in three recordings)
    q = fa.EVTCHN_FIFO_PRIORITY_MAX
    assert sum(s.port_state(timer).linked and s.fifo.control_blocks[0].is_ready(q)
               for s in entries) >= 0.9 * len(entries)


def test_the_fifo_domu_blocks_and_replay_runs_the_block_checks(recorded) -> None:
    _, _, path, header, snaps = recorded
    blocks = [i for i, s in enumerate(snaps) if s.probe == "block"]
    if not blocks:
        # measured: on a quiet machine 14 block hits in 200; with three labs on two cores
        # none in 300: each stop outlasts the guest's tick, Xen's clock runs on while gdbsx
        # holds the domain, and the guest is never idle (many bottom halves per upcall)
        hits = {p: sum(s.probe == p for s in snaps) for p in ("upcall", "bottom-half")}
        pytest.skip(f"the domU never reached xen_safe_halt in {len(snaps)} hits ({hits}): "
                    "the machine is too loaded for it to idle while recorded; the block "
                    "checks are asserted on recordings/xenlab-pv-domu-fifo-gdbsx.xrr")
    for i in blocks:
        s = snaps[i]
        # PV Linux blocks with events masked; SCHEDOP_block unmasks them as it blocks
        assert s.vcpus[s.vcpu].evtchn_upcall_mask == 1
        cb = s.fifo.control_blocks[s.vcpu]
        if s.vcpus[s.vcpu].evtchn_upcall_pending and cb.ready:
            # an event came meanwhile: SCHEDOP_block returns at once and Xen delivers it,
            # so this vCPU's next hit is an upcall, never another block
            nxt = next((t for t in snaps[i + 1:] if t.vcpu == s.vcpu), None)
            assert nxt is None or nxt.probe == "upcall", (s.index, nxt and nxt.probe)
    res = replay(path)
    assert res.stats["abi"] == "fifo" and res.stats["quiescent_snapshots"] == len(blocks)
    kinds = [f.kind for f in res.findings]
    assert "fifo-no-quiescent-point" not in kinds  # the block-time checks ran
    assert [f for f in res.findings if f.severity != "info"] == [], [
        f.message for f in res.findings]


def test_paused_fifo_domu_agrees_with_xens_e_key_through_gdbsx(lab: Lab, recorded,
                                                                tmp_path: Path) -> None:
    _, facts, _, _, _ = recorded
    check = cross_check(lab, facts=facts, output=tmp_path / "paused.xrr", progress=print,
                        stub="gdbsx")
    print(check.report())
    assert check.dump.abi == "fifo" and check.agrees, check.report()
    assert {p.port for p in check.ports} >= {p.port for p in check.dump.ports}
    assert all(p.linked is not None for p in check.ports)
    with XrrReader(tmp_path / "paused.xrr") as r:
        snap = next(r.snapshots())
    assert [p.fifo for p in snap.port_table([p.port for p in check.dump.ports])] == [
        p.fifo for p in check.dump.ports]
    assert_runs_on(lab)
