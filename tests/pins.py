"""Findings pinned as the snapshot-by-snapshot replay computed them (issue 13).

The replay's fast path (deltas straight into the 2-level model) must give exactly the
findings the original Snapshot-comparing replay gave: kind, snapshot indexes, vCPU,
ports, fields, message and severity.  ``tests/data/pinned-findings.json`` holds them for
every recording in ``recordings/`` and for every recording the deterministic test modules
write; ``XREPLAY_PIN_WRITE=1 pytest ...`` rewrites the entries of the tests it runs (only
do that when a change of findings is intended, and say why in the commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PIN_FILE = Path(__file__).parent / "data" / "pinned-findings.json"
WRITE = os.environ.get("XREPLAY_PIN_WRITE") == "1"
# Modules whose recordings are scripted (GuestSim, PageBuilder): the same bytes every run.
PINNED_MODULES = ("test_replay.py", "test_diff.py", "test_snapshot_and_show.py",
                  "test_export.py")

_pins: dict[str, Any] | None = None
_written: dict[str, Any] = {}


def pins() -> dict[str, Any]:
    global _pins
    if _pins is None:
        _pins = json.loads(PIN_FILE.read_text()) if PIN_FILE.exists() else {}
    return _pins


def findings_of(path: Path) -> list[dict[str, Any]] | str:
    """The replay's findings for ``path`` (default options), or the error it raised."""
    from xreplay.errors import XReplayError
    from xreplay.replay import Replayer, replay
    from xreplay.xrr import XrrReader

    try:
        fast = [f.to_json() for f in replay(path).findings]
    except XReplayError as e:
        return f"error: {e}".replace(str(path), path.name)
    with XrrReader(path) as reader:  # the whole-snapshot path must agree with the deltas
        if reader.header.abi == "fifo":
            return fast  # judged on snapshots only (fifo_detectors): one path to pin
        r = Replayer(reader.header)
        for snap in reader.snapshots():
            if not snap.has_shared_info or f"vcpu_info.{snap.vcpu}" in snap.missing:
                continue  # what replay() does not judge (data not read)
            r.feed(snap)
        slow = [f.to_json() for f in r.finish(reader.trailer, reader.problems).findings]
    assert fast == slow, f"{path.name}: the delta and the snapshot paths disagree"
    return fast


def check(key: str, path: Path) -> None:
    got = findings_of(path)
    if WRITE:
        _written[key] = got
        return
    want = pins().get(key)
    assert want is not None, f"no pinned findings for {key}: run with XREPLAY_PIN_WRITE=1"
    assert got == want, f"findings of {key} differ from the pinned ones"


def save() -> None:
    if WRITE and _written:
        data = {**pins(), **_written}
        PIN_FILE.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
