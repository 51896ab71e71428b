"""The delta path's model state equals the whole-snapshot decode at every hit.

:mod:`xreplay.replay.observe` decodes only the fields a delta's spans touch (a byte map of
``shared_info``, registered ``vcpu_info`` regions); a span it misjudged would leave a stale
field in the model and every detector would judge the wrong state.  Here every 2-level
recording in ``recordings/`` (x86_64 and x86_32, embedded and registered ``vcpu_info``,
unread regions) and a synthetic one with spans crossing field boundaries are walked both
ways, hit by hit.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from xreplay.replay.observe import observe_snapshot, states
from xreplay.xrr import XrrReader

RECORDINGS = Path(__file__).parent.parent / "recordings"


def _bits(m) -> tuple:
    return (m.evtchn_pending, m.evtchn_mask,
            {v: (b.evtchn_upcall_pending, b.evtchn_upcall_mask, b.evtchn_pending_sel)
             for v, b in m.vcpu_info.items()})


def _walk_both(path: Path) -> int:
    with XrrReader(path) as fast, XrrReader(path) as slow:
        snaps = slow.snapshots()
        n = 0
        for hit, m in states(fast):
            snap = next(snaps)
            assert snap.index == hit.seq
            whole = type(m)(m.geometry, m.routing, vcpu_info={})
            observe_snapshot(whole, snap)
            if not snap.has_shared_info:
                whole.evtchn_pending = whole.evtchn_mask = 0  # as the delta path models it
            assert _bits(m) == _bits(whole), f"{path.name} #{hit.seq}"
            n += 1
        assert next(snaps, None) is None
    return n


@pytest.mark.parametrize("name", sorted(
    p.name for p in RECORDINGS.glob("*.xrr") if "fifo" not in p.name))
def test_delta_state_equals_snapshot_state(name: str) -> None:
    assert _walk_both(RECORDINGS / name) > 0


def test_spans_across_field_boundaries(tmp_path: Path) -> None:
    """Random multi-byte writes anywhere in shared_info, many crossing the edges of
    evtchn_pending, evtchn_mask and the vcpu_info heads, and in vCPU 1's registered
    vcpu_info (so its legacy slot in shared_info is not its source)."""
    from xreplay.abi import layout
    from xreplay.xrr import ProbeSpec, RecordingHeader, XrrWriter

    s = layout("x86_64")
    f = s.fields("shared_info")
    size = s.shared_info.sizeof()
    edges = [0, 1, 2, 8, 16, 64, 65, 72, 80]  # vcpu_info[0] and [1] heads
    for name in ("evtchn_pending", "evtchn_mask"):
        off, n = f[name]
        edges += [off, off + n]
    header = RecordingHeader.for_arch("x86_64", [ProbeSpec("upcall", "u", "upcall")],
                                      vcpus=[0, 1], vcpu_info_exprs={1: "&vi1"})
    rng = random.Random(7)
    page, vi1 = bytearray(size), bytearray(s.vcpu_info.sizeof())
    path = tmp_path / "spans.xrr"
    with XrrWriter(path, header) as w:
        for i in range(600):
            for _ in range(rng.randint(1, 4)):
                buf = vi1 if rng.random() < 0.2 else page
                at = max(0, rng.choice(edges) % len(buf) + rng.randint(-20, 20))
                n = rng.randint(1, 40)
                buf[at:at + n] = rng.randbytes(len(buf[at:at + n]))
            w.append(probe=0, vcpu=i % 2, t_ns=i * 1000, pc=0x1000,
                     regions=[bytes(page), bytes(vi1)])
    assert _walk_both(path) == 600
