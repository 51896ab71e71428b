"""Every bundled recording replays to exactly its pinned findings (see ``tests/pins.py``),
as stored (format 1.0) and rewritten snapshot for snapshot in the current format."""

from __future__ import annotations

from pathlib import Path

import pins
import pytest

REC = Path(__file__).parent.parent / "recordings"


@pytest.mark.parametrize("name", sorted(p.name for p in REC.glob("*.xrr")))
def test_recording_findings_are_pinned(name: str) -> None:
    pins.check(f"recordings/{name}", REC / name)


@pytest.mark.parametrize("name", sorted(p.name for p in REC.glob("*.xrr")))
def test_recording_rewritten_in_the_current_format_keeps_its_findings(
        name: str, tmp_path: Path) -> None:
    from xreplay.xrr import XrrReader, XrrWriter

    out = tmp_path / name
    with XrrReader(REC / name) as r:
        assert r.version == (1, 0) and r.trailer is not None  # (notes do not judge)
        w = XrrWriter(out, r.header)
        for rec in r.records():
            w.append(probe=rec.probe, vcpu=rec.vcpu, pc=rec.pc, sp=rec.sp,
                     regflags=rec.regflags, t_ns=rec.t_ns, hang=rec.hang,
                     regions=[None if rec.unread >> i & 1 else data
                              for i, data in enumerate(rec.regions)])
        w.close(**{k: v for k, v in r.trailer.items() if k != "snapshots"})
    pins.check(f"recordings/{name}", out)
    assert out.stat().st_size < (REC / name).stat().st_size * 0.7
