"""Every bundled recording replays to exactly its pinned findings (see ``tests/pins.py``)."""

from __future__ import annotations

from pathlib import Path

import pins
import pytest

REC = Path(__file__).parent.parent / "recordings"


@pytest.mark.parametrize("name", sorted(p.name for p in REC.glob("*.xrr")))
def test_recording_findings_are_pinned(name: str) -> None:
    pins.check(f"recordings/{name}", REC / name)
