"""``replay --explain FROM..TO``: every change in a range of snapshots, who may have made
it, and the history in that range of each finding's own fields.

One walk for both ABIs: the probe roles say which intervals were quiet (every vCPU in its
block function), and each pair of consecutive snapshots goes to the ABI's explainer
(:func:`xreplay.replay.model.explain` for the 2-level rules,
:func:`xreplay.replay.fifo_explain.explain` for FIFO).  A finding's *history* is the
explained changes of what it names, up to its snapshot: its ports' bits (and FIFO LINKs),
its vCPU's upcall edges (and 2-level selector), and its queues' ``ready`` bit and ``head``
(FIFO; a port's queue is added once the port is seen LINKED on it).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from xreplay.errors import XReplayError
from xreplay.replay import fifo_explain
from xreplay.replay.model import Explanation, explain
from xreplay.replay.walk import HANG, Finding, ReplayOptions, Walk
from xreplay.snapshot import Snapshot, interrupts_enabled
from xreplay.transitions import bit_changes
from xreplay.xrr import XrrReader

HISTORY = 6  # changes kept per thing a finding names (the last ones before it)
_PORT = re.compile(r"event_array\[(\d+)\]")
_QUEUE = re.compile(r"control_block\[(\d+)\]\.(?:head\[(\d+)\]|(ready))")
_VCPU = re.compile(r"(?:vcpu_info|control_block)\[(\d+)\]")
_VCPU_FIELDS = ("evtchn_upcall_pending", "evtchn_pending_sel")


@dataclass
class History:
    """The explained changes of one finding's fields in the range, oldest first: the last
    :data:`HISTORY` of each thing it names (a port, a queue's ready bit and its head, a
    vCPU's upcall), so a busy upcall line does not push its port's own story out."""

    finding: Finding
    ports: set[int]
    vcpus: set[int]
    queues: set[tuple[int, int | None]]  # (vCPU, queue); queue None: any of its ready bits
    kept: dict[str, deque[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    earlier: int = 0  # changes before the ones kept
    _n: int = 0

    @classmethod
    def of(cls, f: Finding) -> History:
        text = " ".join(f.fields or [])
        ports = set(f.ports or []) | {int(p) for p in _PORT.findall(text)}
        queues = {(int(v), None if q == "" else int(q)) for v, q, _ in _QUEUE.findall(text)}
        named = {v for v, q in queues if q is not None}  # ready of a named queue: that one
        queues -= {(v, None) for v in named}
        vcpus = {int(v) for v in _VCPU.findall(text)} | ({f.vcpu} if f.vcpu is not None
                                                         else set())
        return cls(f, ports, vcpus, queues)

    def subject(self, e: Explanation) -> str | None:
        """What of the finding's ``e`` changes (None: nothing of it)."""
        c = e.change
        if c.field in ("evtchn_pending", "evtchn_mask") or c.field.startswith("event_array."):
            return f"port {c.index}" if c.index in self.ports else None
        if c.field.startswith("control_block."):
            if (c.vcpu, c.index) in self.queues or (
                    c.field == "control_block.ready" and (c.vcpu, None) in self.queues):
                return f"vCPU {c.vcpu} queue {c.index}"
            return None
        return f"vCPU {c.vcpu} upcall" if c.field in _VCPU_FIELDS and c.vcpu in self.vcpus \
            else None

    def add(self, at: dict[str, Any], e: Explanation, labels: dict[int, str]) -> None:
        key = self.subject(e)
        if key is None:
            return
        # a queue's rare head writes are kept apart from its ready bit's every toggle
        line = key + (" head" if e.change.field == "control_block.head" else "")
        kept = self.kept.setdefault(line, deque(maxlen=HISTORY))
        if len(kept) == kept.maxlen:
            self.earlier += 1
        self._n += 1
        kept.append((self._n, {"from": at["from"], "to": at["to"], "probe": at["probe"],
                               "quiet": at["quiet"], "subject": key, "change": e.to_json(),
                               "text": e.describe(labels)}))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [row for _, row in sorted(r for kept in self.kept.values() for r in kept)]

    @property
    def subjects(self) -> list[str]:
        return ([f"port {p}" for p in sorted(self.ports)]
                + [f"vCPU {v} queue {q}" for v, q in sorted(self.queues, key=str)
                   if q is not None] + [f"vCPU {v} upcall" for v in sorted(self.vcpus)])

    def to_json(self) -> dict[str, Any]:
        f = self.finding
        return {"kind": f.kind, "snapshot": f.snapshot, "vcpu": f.vcpu,
                "subjects": self.subjects, "earlier": self.earlier, "changes": self.rows}


def explain_range(reader: XrrReader, lo: int, hi: int | None,
                  findings: list[Finding] | tuple[Finding, ...] = ()
                  ) -> tuple[list[dict[str, Any]], list[History]]:
    """Explained transitions for snapshots ``lo..hi`` (walking from the start to know what
    was quiet), and the history of each finding whose snapshot lies in the range."""
    h = reader.header
    fifo = h.abi == "fifo"
    w = Walk(h, ReplayOptions())
    names = [p.name for p in h.probes]
    histories = [History.of(f) for f in findings
                 if lo < f.snapshot and (hi is None or f.snapshot <= hi)]
    prev: Snapshot | None = None
    last = None
    rows = []
    for hit in reader.deltas():  # only the range's snapshots are decoded whole
        if hi is not None and hit.seq > hi:
            break
        quiet = last is not None and w.quiet()
        role = HANG if hit.hang else w.roles.get(names[hit.probe], "other")
        w.update_track(hit.vcpu, hit.seq, hit.t_ns, role,
                       interrupts_enabled(h.arch, hit.regflags))
        last = hit.seq
        if hit.seq < lo:
            continue
        snap = reader.snapshot_of_hit(hit)
        if prev is not None:
            if fifo:
                ex = fifo_explain.explain(prev, snap, quiet=quiet,
                                          settled=role in ("block", HANG))
            else:
                ex = explain(prev, snap, w.geometry, w.routing, quiet=quiet,
                             changes=bit_changes(prev, snap))
            row = {"from": prev.index, "to": snap.index, "probe": snap.probe,
                   "vcpu": snap.vcpu, "quiet": quiet, "changes": [e.to_json() for e in ex],
                   "text": [e.describe(h.labels) for e in ex]}
            rows.append(row)
            _follow(histories, snap, row, ex, h.labels)
        prev = snap
    if prev is None or prev.index < lo:
        raise XReplayError(f"{reader.name}: no snapshot #{lo} (the recording has fewer)")
    return rows, histories


def _follow(histories: list[History], snap: Snapshot, row: dict[str, Any],
            ex: list[Explanation], labels: dict[int, str]) -> None:
    """Add ``row``'s changes to the histories of the findings at or after it."""
    mine = [hs for hs in histories if snap.index <= hs.finding.snapshot]
    if not mine:
        return
    if snap.fifo is not None:  # a port seen on a queue brings that queue's history in
        on = snap.fifo.queues()
        for hs in mine:
            hs.queues.update((v, q) for p, (v, q, _h) in on.items() if p in hs.ports)
    for hs in mine:
        for e in ex:
            hs.add(row, e, labels)
