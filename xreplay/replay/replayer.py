"""The replay engine: every probe hit of a recording through the model and the detectors.

:class:`Replayer` streams a recording's deltas into the 2-level model
(:class:`~xreplay.replay.model.Evtchn2L`, through :mod:`xreplay.replay.observe`), keeps the
state at the previous and the current probe hit and the per-vCPU probe history
(:class:`~xreplay.replay.walk.Walk`), and hands each hit to the detectors
(:mod:`xreplay.replay.detectors`).  Full :class:`~xreplay.snapshot.Snapshot`\\ s are decoded
only for what a command prints.  :func:`replay` is the whole walk of a file (a FIFO
recording goes to :mod:`xreplay.replay.fifo_detectors`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from xreplay.abi import iter_bits
from xreplay.replay.detectors import LostPending, default_detectors
from xreplay.replay.observe import Observer, observe_snapshot
from xreplay.replay.walk import (
    HANG,
    KINDS,
    End,
    ReplayOptions,
    ReplayResult,
    Step,
    Walk,
)
from xreplay.snapshot import Snapshot, interrupts_enabled
from xreplay.xrr import RecordingHeader, XrrReader
from xreplay.xrr.deltas import Hit, HitFields
from xreplay.xrr.format import FLAG_HANG

_HANG = int(FLAG_HANG)


class _Buffers:
    """The ``buffers`` of one hit fed on its own (:meth:`Replayer.feed_hit`)."""

    __slots__ = ("buffers", "hulls")

    def __init__(self, buffers: list[bytearray | None]) -> None:
        self.buffers = buffers
        self.hulls = None  # the whole of each region it rewrote


class Replayer:
    """Feed probe hits in recording order (:meth:`feed_hit` from a reader's deltas, or
    :meth:`feed` with decoded snapshots), then :meth:`finish`."""

    def __init__(self, header: RecordingHeader, options: ReplayOptions | None = None) -> None:
        self.walk = w = Walk(header, options or ReplayOptions())
        self.detectors = default_detectors(w)
        self.observer = Observer(header)
        self.cur = w.model()  # the state at the current hit
        self.prev = w.model()  # ... and at the one before (valid once a hit was fed)
        self._step = Step()
        self._probe_roles = [(p.name, w.roles.get(p.name, "other")) for p in header.probes]
        self._nprobes = len(self._probe_roles)
        self.shadow = next((d.shadow for d in self.detectors if isinstance(d, LostPending)),
                           None)
        regions = header.regions
        self._shadow_region = next(  # the last watch region of that name, as Snapshot.watch
            (i for i in reversed(range(len(regions)))
             if regions[i].name == self.shadow and regions[i].kind == "watch"), None)
        self._shadow: bytes | None = None
        # role -> the detectors' step methods for its hits: [unchanged, changed]
        self._by_role: dict[str, list[list[Callable[[Walk, Step], None]]]] = {}
        for role in {*w.roles.values(), HANG, "other"}:
            self._detectors(role)
        self._unfed = False  # the model changed in hits skipped since the last one fed
        self._irq_of: dict[int, bool | None] = {}  # flags register -> interrupts enabled
        self.unread: Counter[str] = Counter()  # hits where each region was not read
        self.skipped = 0  # hits not judged (what the detectors need was not read)
        self._region_names = [spec.name for spec in regions]
        # per probed vCPU: the regions without which its hits are not judged (shared_info
        # and its own registered vcpu_info; None: any other vCPU)
        shared = 1 << next(i for i, spec in enumerate(regions) if spec.kind == "shared_info")
        self._needs: dict[int | None, int] = {None: shared}
        for i, spec in enumerate(regions):
            if spec.name == f"vcpu_info.{spec.vcpu}":
                self._needs[spec.vcpu] = shared | 1 << i

    def _detectors(self, role: str) -> None:
        """The ``step`` methods of the detectors that look at hits of ``role``, for a hit
        where no field changed and for one where some did (bound once: the replay calls
        them at every hit)."""
        ds = [d for d in self.detectors if d.roles is None or role in d.roles]
        self._by_role[role] = [
            [d.step for d in ds if d.unchanged_roles is None or role in d.unchanged_roles],
            [d.step for d in ds]]

    @property
    def last(self) -> int | None:
        """The number of the last hit judged (None: none yet)."""
        return self._step.index if self.walk.count else None

    @property
    def recorded(self) -> int:
        """Hits fed, judged or not."""
        return self.walk.count + self.skipped

    def feed(self, snap: Snapshot) -> None:
        """One decoded snapshot (the whole state at once)."""
        observe_snapshot(self.cur, snap)
        shadow = None if self.shadow is None else snap.watch.get(self.shadow)
        item = ((snap.index, snap.t_ns, 0, snap.vcpu, _HANG if snap.hang else 0, 0, None,
                 snap.flags, 0, 0), 0, False, 0)
        self.run((item,), None, whole=(snap.probe, self.walk.role_of(snap), shadow))

    def feed_hit(self, hit: Hit, buffers: list[bytearray | None]) -> str:
        """One hit from :meth:`XrrReader.deltas`, ``buffers`` its live region buffers;
        returns the hit's role."""
        item = ((hit.seq, hit.t_ns, hit.probe, hit.vcpu, hit.flags, hit.pc, hit.sp,
                 hit.regflags, hit.touched, hit.unread), hit.missing, hit.reset, hit.offset)
        return self.run((item,), _Buffers(buffers), judge_unread=True)  # type: ignore[return-value]

    def run(self, source: Iterable[tuple[HitFields, int, bool, int]], holder: Any, *,
            judge_unread: bool = False, whole: tuple[str, str, bytes | None] | None = None,
            each: Callable[[int, int, str], None] | None = None) -> str | None:
        """Feed every hit of ``source`` (:meth:`XrrReader.raw_deltas` items; ``holder``
        has their live region ``buffers``, e.g. the reader) and return the last one's role.

        The replay's inner loop: the walk's state is bound to locals once for the whole
        recording, not once a hit.  A hit that lacks what the detectors need (shared_info,
        or the probed vCPU's own vcpu_info) is not judged unless ``judge_unread``: the model
        follows it, and the next judged hit compares with the last one judged.  ``whole``
        (probe name, role, shadow): the single hit of ``source`` was already observed into
        :attr:`cur` from a decoded snapshot (:meth:`feed`).  ``each(index, vcpu, role)`` is
        called after every judged hit."""
        w, s, cur, prev = self.walk, self._step, self.cur, self.prev
        observer = self.observer
        apply, by_role, update_track = observer.apply, self._by_role, w.update_track
        probe_roles, nprobes = self._probe_roles, self._nprobes
        hits = dict.fromkeys(by_role, 0)  # a plain dict (a Counter's += is slower), merged below
        sr, irq_of, unread = self._shadow_region, self._irq_of, self.unread
        needs, names = self._needs, self._region_names
        buffers: list[bytearray | None] = []
        role = None
        try:
            for (index, t_ns, probe, vcpu, flags, _, _, regflags, touched, _), missing, reset, _ \
                    in source:
                if whole is None:
                    buffers, hulls = holder.buffers, holder.hulls
                    # nothing rewritten and the same regions unread: nothing to observe
                    changed = (touched or reset or missing != observer.missing) and apply(
                        cur, buffers, touched, reset, missing, hulls)
                    if sr is not None and (reset or touched >> sr & 1):
                        data = buffers[sr]
                        self._shadow = None if data is None else bytes(data)
                    if missing:
                        unread.update(names[i] for i in iter_bits(missing))
                        if not judge_unread and missing & (needs.get(vcpu) or needs[None]):
                            self._unfed = self._unfed or changed
                            self.skipped += 1
                            continue  # a verdict only on data that was read
                    if self._unfed:
                        changed, self._unfed = True, False
                    # not read at this hit: left out, as Snapshot.watch does
                    shadow = None if sr is None or missing >> sr & 1 else self._shadow
                    if probe < nprobes:
                        name, role = probe_roles[probe]
                    else:
                        name, role = f"probe{probe}", "other"
                else:
                    changed = True
                    name, role, shadow = whole
                hang = bool(flags & _HANG)
                if hang:
                    role = HANG
                if regflags is None:
                    irq = None
                else:  # a handful of distinct flags values in a whole recording
                    irq = irq_of.get(regflags)
                    if irq is None:
                        if len(irq_of) >= 64:  # memory stays constant on any file
                            irq_of.clear()
                        irq = irq_of[regflags] = interrupts_enabled(w.header.arch, regflags)
                # -- judge the hit
                if w.count:
                    s.quiet = not w.loud
                else:  # the first
                    w.t0 = t_ns
                    s.quiet, s.cur, s.prev = False, cur, None
                    changed = True
                s.changed = changed
                w.count += 1
                hits[role] += 1
                update_track(vcpu, index, t_ns, role, irq)
                s.index, s.t_ns, s.probe, s.vcpu, s.role = index, t_ns, name, vcpu, role
                s.hang, s.interrupts_enabled, s.shadow = hang, irq, shadow
                for step in by_role[role][changed]:
                    step(w, s)
                if changed:
                    prev.assign(cur)
                s.prev, s.prev_index, s.prev_probe, s.prev_shadow = prev, index, name, shadow
                if each is not None:
                    each(index, vcpu, role)
        finally:
            for r, n in hits.items():
                if n:
                    w.hits[r] += n
        return role

    def finish(self, trailer: dict[str, Any] | None = None,
               problems: Iterable[str] = (), torn_at: int | None = None) -> ReplayResult:
        w = self.walk
        end = End(self.last, self._step.hang, self.cur, trailer)
        for d in self.detectors:
            d.finish(w, end)
        order = {k: i for i, k in enumerate(KINDS)}
        findings = sorted(w.findings, key=lambda f: (f.snapshot, order.get(f.kind, 99)))
        last = self.last
        stats = {
            "arch": w.header.arch,
            "snapshots": w.count,
            "duration_s": 0.0 if last is None else (self._step.t_ns - (w.t0 or 0)) / 1e9,
            "start_t_ns": w.t0,
            "last_snapshot": last,
            "hits": dict(w.hits),
            "vcpus": sorted(w.tracks),
            "shadow": self.shadow,
            "end_reason": end.reason,
            "closed_cleanly": trailer is not None,
            "torn_at": torn_at,
            "findings": dict(Counter(f.kind for f in findings)),
            "dropped": dict(w.dropped),
            "problems": list(problems),
        }
        return ReplayResult(findings, stats)


def replay(source: XrrReader | str | os.PathLike[str],
           options: ReplayOptions | None = None) -> ReplayResult:
    """Replay a whole recording (a reader, or a path) and return its findings."""
    if isinstance(source, XrrReader):
        return _replay_reader(source, options)
    with XrrReader(source) as reader:
        return _replay_reader(reader, options)


def _replay_reader(reader: XrrReader, options: ReplayOptions | None) -> ReplayResult:
    if reader.header.abi == "fifo":  # the FIFO rules live in their own modules
        from xreplay.replay.fifo_detectors import replay_fifo
        return replay_fifo(reader, options)
    r = Replayer(reader.header, options)
    r.run(reader.raw_deltas(), reader)
    result = r.finish(reader.trailer, reader.problems, reader.torn_at)
    result.stats["recorded"] = r.recorded
    result.stats["unreadable"] = dict(r.unread)
    return result
