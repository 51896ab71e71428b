"""Replay a recording through a model of Xen's 2-level ABI; diff two recordings.

Library first (the CLI in :mod:`xreplay.replay.commands` is a thin layer)::

    from xreplay.replay import replay, diff_recordings
    result = replay("hang.xrr")            # ReplayResult(findings, stats)
    for f in result.findings: print(f.kind, f.snapshot, f.ports, f.message)
    d = diff_recordings("ok.xrr", "hang.xrr")  # DiffResult: first divergence, aligned states
"""

from xreplay.replay.diff import DiffResult, SnapshotDiff, diff_recordings, diff_snapshots
from xreplay.replay.model import Evtchn2L, Explanation, Geometry, Routing, explain
from xreplay.replay.replayer import Replayer, replay
from xreplay.replay.walk import KINDS, Finding, ReplayOptions, ReplayResult

__all__ = [
    "KINDS", "DiffResult", "Evtchn2L", "Explanation", "Finding", "Geometry", "ReplayOptions",
    "ReplayResult", "Replayer", "Routing", "SnapshotDiff", "diff_recordings", "diff_snapshots",
    "explain", "replay",
]
