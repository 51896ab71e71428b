"""Recording a Linux guest on its default FIFO event channels (``lab up --evtchn fifo``).

The top half needs no QEMU: the FIFO configs and the profile's FIFO regions from a symbol
map.  The rest boots a lab whose domU runs without ``xen.fifo_events=0``, records it
through QEMU's gdbstub with the Linux profile (which finds the event array and the per-cpu
control blocks from dom0's kallsyms), asserts on what a FIFO guest must show, replays it
on the FIFO rules, and compares the paused domU with Xen's 'e' dump port by port (p, m and
the FIFO column's BUSY/LINK).  The module's lab is stopped by PID at its end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import boot_xen_lab

from xreplay.abi import fifo as fa
from xreplay.debugkeys import latest, parse
from xreplay.errors import XReplayError
from xreplay.lab.xen import Lab
from xreplay.lab.xen.initramfs import domu_config
from xreplay.lab.xen.record import cross_check, record_lab
from xreplay.profiles import linux_profile
from xreplay.profiles.linux import FIFO_SPARE_PAGES
from xreplay.replay import replay
from xreplay.xrr import XrrReader

# Addresses of Debian's 6.1.0 lab kernel, as in its /proc/kallsyms.
LAB_SYMBOLS = {
    "xen_vcpu": 0x1E0E0, "__per_cpu_offset": 0xFFFFFFFF8241CB60,
    "HYPERVISOR_shared_info": 0xFFFFFFFF82A25F00, "xen_start_flags": 0xFFFFFFFF8241B1C8,
    "xen_evtchn_do_upcall": 0xFFFFFFFF81661470,
    "evtchn_2l_handle_events": 0xFFFFFFFF81665110, "xen_safe_halt": 0xFFFFFFFF81027750,
    "evtchn_fifo_handle_events": 0xFFFFFFFF81665A90, "event_array": 0xFFFFFFFF82C43160,
    "event_array_pages": 0xFFFFFFFF82C43140, "cpu_control_block": 0x2F400,
}


def write_map(path: Path, syms: dict[str, int], filler: int = 120) -> Path:
    rows = dict(syms)
    rows.update({f"filler_{i}": 0xFFFFFFFF81000000 + 16 * i for i in range(filler)})
    path.write_text("".join(f"{a:016x} T {n}\n" for n, a in sorted(rows.items(),
                                                                     key=lambda kv: kv[1])))
    return path


# ---------------------------------------------------------------- no QEMU needed
def test_fifo_domu_config_and_kernel_argument(tmp_path: Path) -> None:
    assert "xen.fifo_events=0" not in domu_config("pv", "fifo")
    assert "xen.fifo_events=0" in domu_config("pv")
    with pytest.raises(XReplayError, match="event-channel ABI"):
        domu_config("pv", "3l")
    cmd = " ".join(Lab(tmp_path, evtchn="fifo").qemu_command(40001, 40002))
    assert "xreplay.domu_evtchn=fifo" in cmd
    assert "xreplay.domu_evtchn=2l" in " ".join(Lab(tmp_path).qemu_command(40001, 40002))
    with pytest.raises(XReplayError):
        Lab(tmp_path, evtchn="3l")


def test_profile_reads_the_fifo_pages_in_use_and_control_blocks(tmp_path: Path) -> None:
    m = write_map(tmp_path / "System.map", LAB_SYMBOLS)
    kw = linux_profile(m, vcpus=[0, 1], domain="domu", abi="fifo", fifo_pages=2)
    assert ("bottom-half", "*0xffffffff81665a90", "bottom-half") in [
        (p.name, p.location, p.role) for p in kw["probes"]]
    assert kw["fifo_control_block"] == {
        0: "$xr_u64($xr_u64(0xffffffff8241cb60) + 0x2f400)",
        1: "$xr_u64($xr_u64(0xffffffff8241cb68) + 0x2f400)"}
    # the pages in use at the check and FIFO_SPARE_PAGES more, each read only while
    # event_array_pages (read at every hit) counts it
    assert kw["fifo_event_pages"] == [f"$xr_u64({0xFFFFFFFF82C43160 + 8 * i:#x})"
                                      for i in range(2 + FIFO_SPARE_PAGES)]
    assert kw["fifo_page_count"] == "0xffffffff82c43140"
    assert len(linux_profile(m, abi="fifo", fifo_pages=128)["fifo_event_pages"]) == 128
    assert "FIFO" in kw["description"]
    assert "fifo_event_pages" not in linux_profile(m, vcpus=[0])  # 2-level: unchanged
    with pytest.raises(XReplayError, match="event_array_pages=0"):
        linux_profile(m, abi="fifo", fifo_pages=0)
    del LAB_SYMBOLS["cpu_control_block"]
    try:
        with pytest.raises(XReplayError, match="lacks cpu_control_block"):
            linux_profile(write_map(tmp_path / "m2", LAB_SYMBOLS), abi="fifo")
    finally:
        LAB_SYMBOLS["cpu_control_block"] = 0x2F400


# ---------------------------------------------------------------- the booted lab
@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    yield from boot_xen_lab(tmp_path_factory, "xenlab-fifo", evtchn="fifo")


@pytest.fixture(scope="module")
def recorded(lab: Lab, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("rec") / "domu-fifo.xrr"
    result, facts = record_lab(lab, path, count=300)
    print(f"recorded {result.snapshots} in {result.elapsed:.2f} s ({result.rate:.0f}/s), "
          f"{result.foreign} foreign, unreadable {result.unreadable}")
    return result, facts, path


@pytest.mark.xenlab
def test_the_domu_runs_fifo_and_xen_agrees(lab: Lab, recorded) -> None:
    _, facts, _ = recorded
    assert lab.state is not None and lab.state.domu_evtchn == "fifo"
    assert (facts.abi, facts.domain_type) == ("fifo", "pv")
    assert facts.fifo_pages == 1 and len(facts.event_page_va) == 1
    assert facts.control_block_va[0] and facts.control_block_ma[0] % 8 == 0
    dumps = latest(parse(lab.dom0("xl debug-keys e && xl dmesg", timeout=60), "xl dmesg"))
    assert dumps[lab.domid].abi == "fifo"


@pytest.mark.xenlab
def test_recording_shows_a_linux_fifo_guest_at_work(recorded) -> None:
    result, _, path = recorded
    assert result.reason == "count" and result.snapshots == 300
    assert not result.unreadable, result.unreadable
    with XrrReader(path) as reader:
        assert reader.header.abi == "fifo"
        assert [r.name for r in reader.header.regions if r.kind.startswith("fifo")] == [
            "control_block.0", "event_array_pages",
            *(f"event_array.{i}" for i in range(1 + FIFO_SPARE_PAGES))]
        labels = reader.header.labels
        timer = next(p for p, name in labels.items() if name == "VIRQ_TIMER")
        snaps = list(reader.snapshots())
    # event_array_pages read at every hit: one page in use, the spare ones not read and
    # not taken for unreadable (a hit reads the pages in use only)
    assert all(not s.missing and s.fifo.nr_ports == fa.EVENT_WORDS_PER_PAGE for s in snaps)
    by_probe: dict[str, list] = {}
    for s in snaps:
        by_probe.setdefault(s.probe, []).append(s)
    ups, bhs = by_probe["upcall"], by_probe["bottom-half"]
    assert len(ups) >= 30 and len(bhs) >= 30, {k: len(v) for k, v in by_probe.items()}

    def share(items, pred) -> float:
        return sum(1 for s in items if pred(s)) / len(items)

    # Linux raises VIRQ_TIMER to the highest priority (xen_setup_timer): queue 0
    q = fa.EVTCHN_FIFO_PRIORITY_MAX
    cb = [s.fifo.control_blocks[0] for s in snaps]
    # Xen queued the timer: at the upcall its word is PENDING+LINKED on queue 0, ready bit 0
    assert share(ups, lambda s: s.port_state(timer).pending and s.port_state(timer).linked
                 ) >= 0.5
    assert share(ups, lambda s: s.port_state(timer).priority == q) >= 0.5
    assert share(ups, lambda s: s.fifo.control_blocks[0].is_ready(q)) >= 0.5
    # queues in use: 0 (timer) and the default 7 (everything else), no other
    assert all(c.ready & ~(1 << q | 1 << fa.EVTCHN_FIFO_PRIORITY_DEFAULT) == 0 for c in cb)
    assert all(c.head[q] in (0, timer) for c in cb) and any(c.head[q] == timer for c in cb)
    # ready is taken by xchg in the bottom half; LINKED is cleared as the queue is walked
    edges = {"timer linked 1->0": 0, "timer linked 0->1": 0, "ready 1->0": 0, "ready 0->1": 0,
             "timer pending 1->0": 0}
    for a, b in zip(snaps, snaps[1:], strict=False):
        la, lb = a.port_state(timer).linked, b.port_state(timer).linked
        ra, rb = a.fifo.control_blocks[0].is_ready(q), b.fifo.control_blocks[0].is_ready(q)
        edges["timer linked 1->0"] += la and not lb
        edges["timer linked 0->1"] += lb and not la
        edges["ready 1->0"] += ra and not rb
        edges["ready 0->1"] += rb and not ra
        edges["timer pending 1->0"] += a.is_pending(timer) and not b.is_pending(timer)
    assert min(edges.values()) >= 5, edges
    # the guest unmasks exactly what it bound
    unmasked = {p for s in snaps for p in range(1, 1024) if not s.is_masked(p)}
    assert labels.keys() <= unmasked | {0} and max(unmasked) < 64


@pytest.mark.xenlab
def test_replay_of_the_healthy_fifo_guest_finds_no_error(recorded) -> None:
    _, _, path = recorded
    res = replay(path)
    assert res.stats["abi"] == "fifo" and res.stats["snapshots"] == 300
    assert [f for f in res.findings if f.severity != "info"] == [], [
        f.message for f in res.findings]


@pytest.mark.xenlab
def test_paused_fifo_domu_agrees_with_xens_e_key(lab: Lab, recorded, tmp_path: Path) -> None:
    _, facts, _ = recorded
    check = cross_check(lab, facts=facts, output=tmp_path / "paused.xrr", progress=print)
    print(check.report())
    assert check.dump.abi == "fifo"
    assert check.agrees, check.report()
    assert {p.port for p in check.ports} >= {p.port for p in check.dump.ports}
    # every port Xen lists has its FIFO column (BUSY, LINKED) on our side too
    assert all(p.linked is not None for p in check.ports)
    with XrrReader(tmp_path / "paused.xrr") as r:
        snap = next(r.snapshots())
    assert snap.abi == "fifo" and [p.fifo for p in snap.port_table(
        [p.port for p in check.dump.ports])] == [p.fifo for p in check.dump.ports]
