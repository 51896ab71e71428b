"""Offline inspection of a recording: the summary and change listings behind ``xreplay show``.

Everything here streams the file once; nothing holds more than two snapshots.  Damage in
the middle of a file does not hide what was read before it: :func:`summary` reports the
intact part and where it stopped (``stopped``), :func:`iter_changes` yields every row before
the damage and then raises.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from xreplay.errors import RecordingFormatError, UsageError, XReplayError
from xreplay.snapshot import Snapshot
from xreplay.transitions import bit_changes, watch_changes
from xreplay.xrr import XrrReader

#: how many snapshot numbers ``summary`` lists per unreadable region
UNREAD_LISTED = 20


def summary(reader: XrrReader) -> dict[str, Any]:
    """Arch, target, probes with hit counts, snapshot count, duration, first/last snapshot."""
    h = reader.header
    hits: Counter[str] = Counter()
    first: Snapshot | None = None
    last: Snapshot | None = None
    count = 0
    hangs = 0
    unread: dict[str, list[int]] = {}
    unread_count: Counter[str] = Counter()
    stopped: RecordingFormatError | None = None
    try:
        for snap in reader.snapshots():
            if first is None:
                first = snap
            last = snap
            hits[snap.probe] += 1
            count += 1
            hangs += snap.hang
            for name in snap.missing:
                unread_count[name] += 1
                seen = unread.setdefault(name, [])
                if len(seen) < UNREAD_LISTED:
                    seen.append(snap.index)
    except RecordingFormatError as e:
        stopped = e
    return {
        "file": reader.name,
        "arch": h.arch,
        "target": h.target,
        "created": h.created,
        "tool": h.tool,
        "probes": [{"name": p.name, "location": p.location, "role": p.role,
                    "hits": hits.get(p.name, 0)} for p in h.probes],
        "regions": [{"name": r.name, "kind": r.kind, "size": r.size, "expr": r.expr}
                    for r in h.regions],
        "labels": {str(k): v for k, v in sorted(h.labels.items())},
        "snapshots": count,
        "hang_snapshots": hangs,
        "unreadable": {name: {"snapshots": unread_count[name], "first": unread[name]}
                       for name in sorted(unread)},
        "duration_s": (last.t_ns - first.t_ns) / 1e9 if first and last else 0.0,
        "closed_cleanly": reader.trailer is not None,
        "trailer": reader.trailer,
        "notes": [n.data for n in reader.notes],
        "problems": list(reader.problems),
        "stopped": None if stopped is None else {"offset": stopped.offset,
                                                 "message": str(stopped)},
        "first": first.to_json() if first else None,
        "last": last.to_json() if last else None,
        "_first": first,
        "_last": last,
        "_stopped": stopped,
    }


_RANGE = re.compile(r"^\s*(\d*)\s*\.\.\s*(\d*)\s*$")


def parse_range(text: str) -> tuple[int, int | None]:
    """``FROM..TO`` (either side may be empty) as an inclusive (from, to-or-None)."""
    m = _RANGE.match(text)
    if not m or not m.group(1).isascii() or not m.group(2).isascii():
        raise UsageError(f"bad range {text!r}: write FROM..TO, e.g. 10..20 or 100..")
    lo = int(m.group(1)) if m.group(1) else 0
    hi = int(m.group(2)) if m.group(2) else None
    if hi is not None and hi < lo:
        raise UsageError(f"bad range {text!r}: TO is before FROM")
    return lo, hi


def changes(reader: XrrReader, lo: int, hi: int | None) -> list[dict[str, Any]]:
    """Per consecutive pair (n-1 -> n) with n in (lo, hi]: the bits and watch bytes changed."""
    return list(iter_changes(reader, lo, hi))


def iter_changes(reader: XrrReader, lo: int, hi: int | None) -> Iterator[dict[str, Any]]:
    """:func:`changes` one row at a time (rows before damage come out before its error)."""
    prev: Snapshot | None = None
    for snap in reader.snapshots(lo):
        if hi is not None and snap.index > hi:
            break
        if prev is not None:
            bits = bit_changes(prev, snap)
            yield {
                "from": prev.index, "to": snap.index, "probe": snap.probe, "vcpu": snap.vcpu,
                "t_ns": snap.t_ns, "changes": [c.to_json() for c in bits],
                "text": [c.describe(snap.labels) for c in bits],
                "watch": watch_changes(prev, snap),
            }
        prev = snap
    if prev is None:
        raise XReplayError(f"{reader.name}: no snapshot #{lo} (the recording has fewer)")


def snapshot_at(reader: XrrReader, n: int) -> Snapshot:
    """Snapshot number ``n``; a negative ``n`` counts from the end (-1 is the last)."""
    if n >= 0:
        return reader.snapshot(n)
    from collections import deque

    tail = deque(reader.records(), maxlen=-n)
    if len(tail) < -n:
        raise XReplayError(f"{reader.name}: no snapshot {n} (the recording has {len(tail)})")
    return reader.snapshot_of(tail[0])
