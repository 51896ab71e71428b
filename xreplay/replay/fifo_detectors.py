"""Detectors for lost deliveries on Xen's FIFO event-channel ABI.

FIFO loses events in its own ways (``xen/common/event_fifo.c``; the guest's side in Linux's
``events_fifo.c``):

* ``fifo-stranded``: a port PENDING and not MASKED but on no ready queue (one whose
  ``ready`` bit is set, walked from its ``head``).
  Not LINKED: Xen LINKs an event only when it becomes pending while unmasked, or at
  EVTCHNOP_unmask, so a guest that clears MASKED in place while PENDING leaves it here.
  LINKED but unreachable: the guest dropped a LINK (a lost link); Xen's tail is behind it,
  so later events are appended there without ``ready`` or an upcall.
* ``fifo-ready-head``: ``ready`` bit *q* set while ``head[q]`` is 0 (Xen writes the head
  before the bit: never legitimate), or, where the guest is quiescent, a queue whose head
  event is still LINKED while its ``ready`` bit is clear (queued, but the guest will not look,
  and Xen appends without setting ``ready`` again).
* ``fifo-head-unlinked``: ``ready`` bit *q* set where the guest is quiescent but ``head[q]``
  names an event that is not LINKED, or a head outside the event array.
* ``fifo-missed-clear``: a vCPU blocked with ``evtchn_upcall_pending=1`` and ready queues
  at a hang, or at two block hits in a row with no upcall between (the FIFO form of the
  2-level missed clear).
* ``fifo-masked-pending`` (info): ports PENDING and MASKED at the end.
* ``fifo-no-quiescent-point`` (info): no block or hang snapshot at all, so the checks that
  need one (stranded, queued-but-not-ready, unlinked head, missed clear) never ran: a clean
  replay then says nothing about them.

"Quiescent" is a block-probe hit or a hang snapshot: inside the upcall and the bottom half
the guest legitimately holds states (LINKED cleared before the ack, ``ready`` taken with
xchg before its queues are walked) that would be losses anywhere else.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from xreplay.abi import fifo as fifo_abi
from xreplay.replay.walk import Finding, ReplayOptions, ReplayResult
from xreplay.snapshot import FifoState, Snapshot
from xreplay.xrr import RecordingHeader, XrrReader

FIFO_KINDS = ("fifo-stranded", "fifo-ready-head", "fifo-head-unlinked", "fifo-missed-clear",
              "fifo-masked-pending", "fifo-no-quiescent-point")
HANG = "hang"


class FifoReplayer:
    """Feed FIFO snapshots in recording order, then :meth:`finish`."""

    def __init__(self, header: RecordingHeader, options: ReplayOptions | None = None) -> None:
        self.header = header
        self.options = options or ReplayOptions()
        self.roles = {p.name: p.role for p in header.probes}
        # "no upcall ran between two block hits" can only be said where an upcall would
        # have been seen: a recording with the block probe alone says nothing about it
        self.sees_upcalls = bool({"upcall", "bottom-half"} & set(self.roles.values()))
        self.findings: list[Finding] = []
        self.seen: set[tuple[Any, ...]] = set()
        self.hits: Counter[str] = Counter()
        self.count = 0
        self.t0: int | None = None
        self.last: Snapshot | None = None
        # vCPU -> index of its last block hit with upcall pending and ready queues, cleared
        # by any upcall / bottom-half hit of that vCPU
        self.armed: dict[int, int] = {}
        self.unread: Counter[str] = Counter()

    def role_of(self, snap: Snapshot) -> str:
        return HANG if snap.hang else self.roles.get(snap.probe, "other")

    def name(self, port: int) -> str:
        label = self.header.labels.get(port)
        return f"{port} ({label})" if label else str(port)

    def add(self, key: tuple[Any, ...], f: Finding) -> None:
        """One finding per (kind, port/queue, vCPU) run: the first snapshot that shows it."""
        if key in self.seen:
            return
        self.seen.add(key)
        if sum(1 for g in self.findings if g.kind == f.kind) < self.options.max_findings:
            self.findings.append(f)

    def feed(self, snap: Snapshot) -> None:
        """Judge one snapshot; one with a region not read (or not FIFO) is counted only."""
        fs = snap.fifo
        if fs is None or snap.missing:
            self.unread.update(snap.missing)
            return
        if self.t0 is None:
            self.t0 = snap.t_ns
        self.count += 1
        role = self.role_of(snap)
        self.hits[role] += 1
        quiet = role in ("block", HANG)
        self._queues(snap, fs, quiet)
        if quiet:
            self._stranded(snap, fs)
        self._missed_clear(snap, fs, role)
        self.last = snap

    # -- the checks ---------------------------------------------------------------------

    def _stranded(self, snap: Snapshot, fs: FifoState) -> None:
        ready = fs.queues(ready_only=True)
        # reachable from a LINKED head whose ready bit is clear: fifo-ready-head says so
        queued = {p for p, (v, q, _h) in fs.queues().items()
                  if not fs.control_blocks[v].is_ready(q)}
        for port, raw in enumerate(fs.words):
            if port == 0 or not raw >> fifo_abi.EVTCHN_FIFO_PENDING & 1:
                continue
            w = fifo_abi.EventWord(raw)
            if w.masked or port in ready or port in queued:
                continue
            v = snap.notify.get(port, 0)
            why = ("it is LINKED, but on no queue a head leads to: the guest dropped the "
                   "LINK that led to it, and Xen appends later events behind it without "
                   "setting ready or raising an upcall" if w.linked else
                   "Xen links an event only when it becomes pending unmasked or at "
                   "EVTCHNOP_unmask (a guest that cleared MASKED in place while PENDING "
                   "instead of calling EVTCHNOP_unmask)")
            self.add(("fifo-stranded", port), Finding(
                "fifo-stranded", snap.index, vcpu=v, ports=[port],
                fields=[f"event_array[{port}].PENDING", f"event_array[{port}].MASKED",
                        f"event_array[{port}].LINKED"],
                message=(f"port {self.name(port)} is PENDING and unmasked but on no queue of "
                         f"vCPU {v} whose ready bit is set at {snap.probe} #{snap.index}, so "
                         "no upcall will come: "
                         + why)))

    def _queues(self, snap: Snapshot, fs: FifoState, quiet: bool) -> None:
        for v, cb in sorted(fs.control_blocks.items()):
            for q, head in enumerate(cb.head):
                ready = cb.is_ready(q)
                where = f"vCPU {v} queue {q}"
                if ready and head == 0:
                    self.add(("fifo-ready-head", v, q, "zero"), Finding(
                        "fifo-ready-head", snap.index, vcpu=v,
                        fields=[f"control_block[{v}].ready", f"control_block[{v}].head[{q}]"],
                        message=(f"{where}: ready bit {q} set while head[{q}]=0 at "
                                 f"#{snap.index}: Xen writes the head before setting ready, "
                                 "so the control block is corrupt or was reset under the "
                                 "guest")))
                    continue
                if head and not 0 < head < fs.nr_ports:
                    self.add(("fifo-head-unlinked", v, q, "range"), Finding(
                        "fifo-head-unlinked", snap.index, vcpu=v, ports=[head],
                        fields=[f"control_block[{v}].head[{q}]"],
                        message=(f"{where}: head[{q}]={head} lies outside the recorded "
                                 f"event array ({fs.nr_ports} ports) at #{snap.index}: the "
                                 "guest grew the array after the recording started "
                                 "(re-record), or head is corrupt"), severity="warning"))
                    continue
                if not quiet or not head:
                    continue
                linked = bool(fs.words[head] >> fifo_abi.EVTCHN_FIFO_LINKED & 1)
                if ready and not linked:
                    self.add(("fifo-head-unlinked", v, q), Finding(
                        "fifo-head-unlinked", snap.index, vcpu=v, ports=[head],
                        fields=[f"control_block[{v}].head[{q}]",
                                f"event_array[{head}].LINKED"],
                        message=(f"{where}: ready but head[{q}]={self.name(head)} is not "
                                 f"LINKED at {snap.probe} #{snap.index}: the guest unlinked "
                                 "the head without taking the ready bit, so the queue's "
                                 "events behind it are unreachable")))
                elif linked and not ready:
                    self.add(("fifo-ready-head", v, q, "queued"), Finding(
                        "fifo-ready-head", snap.index, vcpu=v, ports=[head],
                        fields=[f"control_block[{v}].ready", f"control_block[{v}].head[{q}]"],
                        message=(f"{where}: head[{q}]={self.name(head)} is LINKED but "
                                 f"ready bit {q} is clear at {snap.probe} #{snap.index}: "
                                 "events are queued that the guest will not look for (it "
                                 "took ready without walking the whole queue, or dropped a "
                                 "LINK and Xen linked this event behind the lost ones); Xen "
                                 "appends to a non-empty queue without setting ready or "
                                 "raising an upcall, so they are lost")))

    def _missed_clear(self, snap: Snapshot, fs: FifoState, role: str) -> None:
        v = snap.vcpu
        if role in ("upcall", "bottom-half"):
            self.armed.pop(v, None)
            return
        if role not in ("block", HANG) or (role == "block" and not self.sees_upcalls):
            return
        vi = snap.vcpus.get(v)
        cb = fs.control_blocks.get(v)
        if vi is None or cb is None or not (vi.evtchn_upcall_pending and cb.ready):
            self.armed.pop(v, None)
            return
        if role == HANG or v in self.armed:
            first = self.armed.get(v, snap.index)
            self.add(("fifo-missed-clear", v), Finding(
                "fifo-missed-clear", snap.index, block_snapshot=first, vcpu=v,
                fields=[f"vcpu_info[{v}].evtchn_upcall_pending", f"control_block[{v}].ready"],
                message=(f"vCPU {v} blocks with evtchn_upcall_pending=1 and ready queues "
                         f"{fifo_abi.ready_queues(cb.ready)} from #{first} to #{snap.index} and no "
                         "upcall ran between: the upcall that should walk those queues was "
                         "consumed without clearing or never taken")))
        else:
            self.armed[v] = snap.index

    def finish(self, trailer: dict[str, Any] | None = None,
               problems: tuple[str, ...] | list[str] = (), torn_at: int | None = None
               ) -> ReplayResult:
        last = self.last
        if last is not None and last.fifo is not None and self.options.info:
            ports = [p for p, raw in enumerate(last.fifo.words) if p and
                     raw >> fifo_abi.EVTCHN_FIFO_PENDING & 1
                     and raw >> fifo_abi.EVTCHN_FIFO_MASKED & 1]
            if ports:
                self.findings.append(Finding(
                    "fifo-masked-pending", last.index, ports=ports,
                    fields=[f"event_array[{p}].MASKED" for p in ports],
                    message=(f"at the end (#{last.index}) port(s) "
                             f"{', '.join(self.name(p) for p in ports)} are PENDING but "
                             "MASKED: Xen links them only at EVTCHNOP_unmask (fine for a "
                             "port ignored on purpose, a hang if the guest waits for it)"),
                    severity="info"))
        quiet = self.hits["block"] + self.hits[HANG]
        if self.count and not quiet:
            self.findings.append(Finding(
                "fifo-no-quiescent-point", last.index if last else 0,
                message=(f"none of the {self.count} snapshots was taken at a block probe or "
                         "a hang, where the guest is not in the middle of consuming its "
                         "queues: the stranded, queued-but-not-ready, unlinked-head and "
                         "missed-clear checks never ran (record with a block probe, or "
                         "until the guest idles or hangs)"), severity="info"))
        order = {k: i for i, k in enumerate(FIFO_KINDS)}
        findings = sorted(self.findings, key=lambda f: (f.snapshot, order.get(f.kind, 99)))
        stats = {
            "arch": self.header.arch, "abi": "fifo", "snapshots": self.count,
            "duration_s": 0.0 if last is None else (last.t_ns - (self.t0 or 0)) / 1e9,
            "start_t_ns": self.t0, "last_snapshot": None if last is None else last.index,
            "hits": dict(self.hits), "vcpus": sorted(self.header.vcpus), "shadow": None,
            "quiescent_snapshots": quiet,
            "end_reason": None if trailer is None else trailer.get("reason"),
            "closed_cleanly": trailer is not None, "torn_at": torn_at,
            "findings": dict(Counter(f.kind for f in findings)), "dropped": {},
            "problems": list(problems),
        }
        return ReplayResult(findings, stats)


def replay_fifo(reader: XrrReader, options: ReplayOptions | None = None) -> ReplayResult:
    """Replay a FIFO recording; snapshots with any region unread are counted, not judged."""
    r = FifoReplayer(reader.header, options)
    total = 0
    for snap in reader.snapshots():
        total += 1
        r.feed(snap)  # a verdict only on data that was read
    result = r.finish(reader.trailer, reader.problems, reader.torn_at)
    result.stats["recorded"] = total
    result.stats["unreadable"] = dict(r.unread)
    return result
