"""A PVH Linux domU recorded through gdbsx: the seed's guest type.

Why: QEMU's whole-machine stub cannot read a PVH guest's memory under TCG's nested
paging, so PVH can only be recorded through gdbsx (which reads through Xen). PVH Linux
takes its upcall through the HVM callback vector (sysvec_xen_hvm_callback ->
xen_evtchn_do_upcall on this kernel), demuxes in evtchn_2l_handle_events, idles in
native_safe_halt, and registers its own vcpu_info per vCPU as PV does. The saved and the
booted lab's recordings are of a 2-vCPU domU, checked with the SMP PV module's per-vCPU
assertions (the gdbsx lab boots Xen with the credit scheduler: under credit2 these
recordings stalled, see ``Lab.__init__``). One boot, one recording, the cross-check
against Xen's 'e' and 'q', and the domU running on afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_xenlab_gdbsx import Recorded, assert_runs_on, boot_gdbsx_lab, record_through_gdbsx
from test_xenlab_smp import (
    VCPUS,
    assert_both_vcpus_hit_with_live_copies,
    assert_timers_pend_in_their_own_selector,
    assert_upcalls_see_their_own_upcall_pending,
)

from xreplay.lab.xen import Lab
from xreplay.lab.xen.record import cross_check
from xreplay.profiles.linux import HVM_CALLBACK_VECTOR
from xreplay.replay import replay
from xreplay.xrr import XrrReader

COUNT = 240
REC = Path(__file__).parent.parent / "recordings" / "xenlab-pvh-domu-gdbsx.xrr"


# ---------------------------------------------------------------- no QEMU needed
def test_the_saved_pvh_recording_through_gdbsx_keeps_its_per_vcpu_facts() -> None:
    """recordings/xenlab-pvh-domu-gdbsx.xrr (made as recordings/README.md says)."""
    with XrrReader(REC) as reader:
        header, snaps = reader.header, list(reader.snapshots())
        assert reader.problems == [] and reader.trailer is not None
    assert len(snaps) == 300 and header.vcpus == VCPUS
    assert header.target["kind"] == "gdbsx" and "PVH" in header.target["description"]
    assert header.delivery["mechanism"] == "callback-vector"
    assert_both_vcpus_hit_with_live_copies(snaps)
    assert_upcalls_see_their_own_upcall_pending(snaps)
    assert_timers_pend_in_their_own_selector(header, snaps)
    assert [f for f in replay(REC).findings if f.severity == "error"] == []


# ---------------------------------------------------------------- the booted lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    yield from boot_gdbsx_lab(tmp_path_factory, "xenlab-gdbsx-pvh", domu="pvh",
                              domu_vcpus=len(VCPUS))


@pytest.fixture(scope="module")
def recorded(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    return record_through_gdbsx(lab, tmp_path_factory.mktemp("rec") / "pvh-gdbsx.xrr",
                                count=COUNT)


@pytest.mark.xenlab
def test_the_pvh_profile_probes_the_hvm_paths(lab: Lab, recorded: Recorded) -> None:
    facts, header = recorded.facts, recorded.header
    assert (facts.abi, facts.domain_type, facts.is_dom0) == ("2l", "hvm", False)
    syms = lab.symbols
    where = {p.role: int(p.location.lstrip("*"), 16) for p in header.probes
             if p.role != "other"}
    upcall = next(n for n in ("__xen_evtchn_do_upcall", "xen_evtchn_do_upcall",
                              "xen_hvm_evtchn_do_upcall") if n in syms)
    assert where["upcall"] == syms[upcall]
    assert where["bottom-half"] == syms["evtchn_2l_handle_events"]
    assert where["block"] == syms["native_safe_halt"]  # not xen_safe_halt: HLT idles PVH
    assert header.delivery == {"mechanism": "callback-vector", "vector": HVM_CALLBACK_VECTOR,
                               "block": "hlt"}
    # per-cpu vcpu_info registered by the guest, not shared_info's copy
    assert facts.vcpu_info_va.keys() == set(VCPUS)
    assert all(va != facts.shared_info_va for va in facts.vcpu_info_va.values())
    assert facts.shared_info_va >= 0xFFFF_8880_0000_0000  # a guest page, not a fixmap


@pytest.mark.xenlab
def test_the_pvh_domu_is_recorded_with_its_timer_cycle(recorded: Recorded) -> None:
    snaps, header = recorded.snaps, recorded.header
    assert recorded.result.reason == "count" and len(snaps) == COUNT
    assert header.vcpus == VCPUS and header.target["kind"] == "gdbsx"
    assert_both_vcpus_hit_with_live_copies(snaps)
    # each stop through gdbsx lasts ~0.1 s, long enough for the other vCPU's own upcall
    # to be waiting at most of them (0.71 measured): only "less often than its own"
    assert_upcalls_see_their_own_upcall_pending(snaps, theirs_at_most=None)
    assert_timers_pend_in_their_own_selector(header, snaps)
    timers = [p for p, name in header.labels.items() if name == "VIRQ_TIMER"]
    assert len(timers) == len(VCPUS)  # one per vCPU
    for timer in timers:
        rises = [b for a, b in zip(snaps, snaps[1:], strict=False)
                 if not a.is_pending(timer) and b.is_pending(timer)]
        assert len(rises) >= 5, (timer, len(rises))
    handled = [s for s in snaps if s.probe == "xen_timer_interrupt"]
    assert len(handled) >= 20
    assert recorded.result.duplicates == 0  # no hit reported twice (gdbsx-fast.patch 4.)
    errors = [f for f in replay(recorded.path).findings if f.severity == "error"]
    assert not errors, [f.message for f in errors]


@pytest.mark.xenlab
def test_paused_pvh_domu_agrees_with_xen_and_its_shared_info_copy_is_stale(
        lab: Lab, recorded: Recorded, tmp_path: Path) -> None:
    check = cross_check(lab, facts=recorded.facts, output=tmp_path / "paused.xrr",
                        progress=print)
    print(check.report())
    assert check.agrees, check.report()
    assert check.xen_vcpus.keys() == set(VCPUS) and check.snapshot.vcpus.keys() == set(VCPUS)
    assert {p.port: p.notify_vcpu for p in check.dump.ports} == recorded.header.notify
    # PVH Linux registered its own vcpu_info: the copy inside shared_info is not updated
    live = check.snapshot.vcpus
    assert any(check.stale_vcpu_info[v].evtchn_pending_sel != live[v].evtchn_pending_sel
               or check.stale_vcpu_info[v].evtchn_upcall_pending
               != live[v].evtchn_upcall_pending for v in live)
    with XrrReader(tmp_path / "paused.xrr") as reader:
        assert reader.header.vcpus == VCPUS
    assert_runs_on(lab)
