"""The bundled recordings stay readable and keep their verdicts (format compatibility)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xreplay.replay import replay
from xreplay.xrr import XrrReader

REC = Path(__file__).parent.parent / "recordings"
EXPECTED = {
    "correct": set(),
    "lost-upcall": {"missed-clear"},
    "unmask-no-reraise": {"stranded-port"},
    "ffs-off-by-one": {"lost-pending"},
}


@pytest.mark.parametrize("kind", ["process", "baremetal"])
@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_lab_recording_verdict(variant: str, kind: str) -> None:
    path = REC / f"{variant}-{kind}.xrr"
    with XrrReader(path) as r:
        n = sum(1 for _ in r.records())
        assert r.problems == [] and r.trailer is not None and r.trailer["snapshots"] == n
        assert r.header.arch == ("x86_64" if kind == "process" else "x86_32")
    kinds = {f.kind for f in replay(path).findings if f.severity == "error"}
    assert kinds == EXPECTED[variant]


def test_xenlab_recording_is_clean() -> None:
    path = REC / "xenlab-pv-domu.xrr"
    with XrrReader(path) as r:
        snaps = list(r.snapshots())
    assert len(snaps) == 300
    assert [f for f in replay(path).findings if f.severity == "error"] == []
    # the timer VIRQ (port 3) goes pending at upcalls in the live per-cpu vcpu_info
    ups = [s for s in snaps if s.probe == "upcall"]
    assert ups and all(s.vcpus[0].source == "registered" for s in ups)
    assert any(s.is_pending(3) and s.vcpus[0].evtchn_upcall_pending for s in ups)


def test_the_fifo_domu_blocks_in_its_gdbsx_recording() -> None:
    """recordings/xenlab-pv-domu-fifo-gdbsx.xrr: a Linux FIFO guest at its block probe
    (xen_safe_halt), so replay's block-time FIFO checks ran on a real Linux guest."""
    path = Path(__file__).parent.parent / "recordings" / "xenlab-pv-domu-fifo-gdbsx.xrr"
    with XrrReader(path) as r:
        assert r.header.abi == "fifo" and r.header.target["kind"] == "gdbsx"
        snaps = list(r.snapshots())
    blocks = [i for i, s in enumerate(snaps) if s.probe == "block"]
    assert len(blocks) == 14
    woke = 0
    for i in blocks:
        s = snaps[i]
        assert s.vcpus[0].evtchn_upcall_mask == 1  # PV Linux blocks masked (SCHEDOP_block)
        if s.vcpus[0].evtchn_upcall_pending and s.fifo.control_blocks[0].ready:
            woke += 1  # an event came meanwhile: the next hit is its upcall
            assert snaps[i + 1].probe == "upcall"
            assert s.port_state(3).pending and s.port_state(3).linked  # VIRQ_TIMER
    assert woke == 9
    res = replay(path)
    assert res.stats["quiescent_snapshots"] == 14
    assert [f.kind for f in res.findings] == []
