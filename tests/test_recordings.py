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
