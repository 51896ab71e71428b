"""From recorded bytes to the 2-level model: decode only the fields a delta rewrote.

A snapshot frame usually rewrites a few bytes of ``shared_info`` (a pending bit, a
selector word, ``evtchn_upcall_pending``).  :class:`Observer` knows where each field the
model needs lives (``evtchn_pending``, ``evtchn_mask``, and per vCPU the head of its
``vcpu_info``: ``evtchn_upcall_pending``, ``evtchn_upcall_mask``,
``evtchn_pending_sel``, embedded in ``shared_info`` or registered in a region of its
own), takes a :class:`~xreplay.xrr.deltas.Hit`'s dirty spans and writes the fields they
touch into an :class:`~xreplay.replay.model.Evtchn2L`.  It reads the same bytes the
:class:`~xreplay.snapshot.Snapshot` decoder does (offsets from :mod:`xreplay.abi`), so the
two paths agree field for field.
"""

from __future__ import annotations

from collections.abc import Iterator

from xreplay.abi import Geometry, layout
from xreplay.replay.model import Evtchn2L, Routing, VcpuBits
from xreplay.snapshot import Snapshot
from xreplay.xrr import XrrReader
from xreplay.xrr.deltas import Hit
from xreplay.xrr.header import RecordingHeader


class Observer:
    """Where the model's fields sit in a recording's regions, and how to refresh them."""

    def __init__(self, header: RecordingHeader) -> None:
        s = layout(header.arch)
        shared = s.fields("shared_info")
        vi = s.fields("vcpu_info")
        self.pending = (shared["evtchn_pending"][0], sum(shared["evtchn_pending"]))
        self.mask = (shared["evtchn_mask"][0], sum(shared["evtchn_mask"]))
        self.has_upcall_mask = s.spec.has_upcall_mask
        sel_off, sel_size = vi["evtchn_pending_sel"]
        self.sel = (sel_off, sel_off + sel_size)
        self.head = sel_off + sel_size  # the fields we decode end with evtchn_pending_sel
        self.vcpu_info_size = s.vcpu_info.sizeof()
        self.legacy_max = s.legacy_max_vcpus
        self.shared = next(i for i, r in enumerate(header.regions) if r.kind == "shared_info")
        self.registered: dict[int, int] = {}  # vCPU -> its vcpu_info region (last one wins)
        for i, r in enumerate(header.regions):
            if r.kind == "vcpu_info" and r.vcpu is not None:
                self.registered[r.vcpu] = i
        self.vcpus = list(dict.fromkeys(header.vcpus))
        self.sizes = [r.size for r in header.regions]
        # per vCPU: (region, offset) of its vcpu_info in the current buffers, or None
        self.source: dict[int, tuple[int, int] | None] = {}
        self._missing: int | None = None  # the regions unread at the last hit (None: no hit)
        self.embedded: list[tuple[int, int]] = []  # (vCPU, offset) read from shared_info
        self.embedded_end = 0
        self.registered_now: dict[int, int] = {}  # region -> the vCPU it is the source of

    def _sources(self, missing: int) -> None:
        """Which copy of each vCPU's vcpu_info a snapshot decodes (as
        :meth:`XrrReader.snapshot_of` does): its registered region when that was read at
        this hit (else none: the legacy slot is stale), or ``shared_info.vcpu_info[v]``."""
        self._missing = missing
        have_shared = not missing >> self.shared & 1
        for v in self.vcpus:
            reg = self.registered.get(v)
            if reg is not None:
                self.source[v] = None if missing >> reg & 1 else (reg, 0)
            elif have_shared and v < self.legacy_max:
                self.source[v] = (self.shared, v * self.vcpu_info_size)
            else:
                self.source[v] = None
        self.embedded = [(v, src[1]) for v, src in self.source.items()
                         if src is not None and src[0] == self.shared]
        self.embedded_end = max((at + self.head for _, at in self.embedded), default=0)
        self.registered_now = {src[0]: v for v, src in self.source.items()
                               if src is not None and src[0] != self.shared}

    def _vcpu(self, buf: bytearray, at: int) -> VcpuBits:
        lo, hi = self.sel
        return VcpuBits(buf[at], buf[at + 1] if self.has_upcall_mask else None,
                        int.from_bytes(buf[at + lo:at + hi], "little"))

    def full(self, m: Evtchn2L, bufs: list[bytearray | None], missing: int) -> None:
        """Decode every field (the first hit, a hit after a seek, a hit where the set of
        regions not read changed); ``missing`` bit *i*: region *i* not read at this hit."""
        self._sources(missing)
        shared = None if missing >> self.shared & 1 else bufs[self.shared]
        if shared is None:
            m.evtchn_pending = m.evtchn_mask = 0
        else:
            m.evtchn_pending = int.from_bytes(shared[self.pending[0]:self.pending[1]], "little")
            m.evtchn_mask = int.from_bytes(shared[self.mask[0]:self.mask[1]], "little")
        vcpus: dict[int, VcpuBits] = {}
        for v in self.vcpus:
            src = self.source[v]
            if src is not None:
                vcpus[v] = self._vcpu(bufs[src[0]], src[1])  # type: ignore[arg-type]
        m.vcpu_info = vcpus

    def apply(self, m: Evtchn2L, bufs: list[bytearray | None],
              dirty: list[tuple[int, int, int]], reset: bool = False, missing: int = 0
              ) -> bool:
        """Refresh the fields the ``dirty`` spans touch; True if any value changed.
        ``missing``: the hit's :attr:`~xreplay.xrr.deltas.Hit.missing` regions (unknown
        there: a region not read contributes no field, as in a decoded snapshot).

        A refreshed vCPU gets a new :class:`VcpuBits` (never mutated in place), so a copy of
        the previous state taken with :meth:`Evtchn2L.assign` stays valid.
        """
        if reset or missing != self._missing:
            return self._full_changed(m, bufs, missing)
        if not dirty:
            return False
        shared_i = self.shared
        p0, p1 = self.pending
        m0, m1 = self.mask
        head = self.head
        touch_pending = touch_mask = False
        touched: list[int] = []
        for region, lo, hi in dirty:
            if region == shared_i:
                if lo < p1 and hi > p0:
                    touch_pending = True
                if lo < m1 and hi > m0:
                    touch_mask = True
                if lo < self.embedded_end:
                    for v, at in self.embedded:
                        if lo < at + head and hi > at and (not touched or touched[-1] != v):
                            touched.append(v)  # spans ascend: a repeat is the last one
            else:
                v = self.registered_now.get(region)
                if v is not None and lo < head and (not touched or touched[-1] != v):
                    touched.append(v)
        changed = False
        shared = bufs[shared_i]
        if touch_pending:
            value = int.from_bytes(shared[p0:p1], "little")  # type: ignore[index]
            if value != m.evtchn_pending:
                m.evtchn_pending, changed = value, True
        if touch_mask:
            value = int.from_bytes(shared[m0:m1], "little")  # type: ignore[index]
            if value != m.evtchn_mask:
                m.evtchn_mask, changed = value, True
        sel0, sel1 = self.sel
        for v in touched:
            region, at = self.source[v]  # type: ignore[misc]
            buf = bufs[region]
            up = buf[at]  # type: ignore[index]
            mask = buf[at + 1] if self.has_upcall_mask else None  # type: ignore[index]
            sel = int.from_bytes(buf[at + sel0:at + sel1], "little")  # type: ignore[index]
            old = m.vcpu_info.get(v)
            if (old is None or old.evtchn_upcall_pending != up
                    or old.evtchn_upcall_mask != mask or old.evtchn_pending_sel != sel):
                m.vcpu_info[v], changed = VcpuBits(up, mask, sel), True
        return changed

    def _full_changed(self, m: Evtchn2L, bufs: list[bytearray | None], missing: int) -> bool:
        before = (m.evtchn_pending, m.evtchn_mask, dict(m.vcpu_info))
        self.full(m, bufs, missing)
        return before != (m.evtchn_pending, m.evtchn_mask, m.vcpu_info)


def observe_snapshot(m: Evtchn2L, snap: Snapshot) -> None:
    """Write a decoded :class:`Snapshot`'s fields into ``m`` (the slow, whole-state path)."""
    m.evtchn_pending = snap.evtchn_pending
    m.evtchn_mask = snap.evtchn_mask
    m.vcpu_info = {v: VcpuBits(s.evtchn_upcall_pending, s.evtchn_upcall_mask,
                               s.evtchn_pending_sel) for v, s in snap.vcpus.items()}


def states(reader: XrrReader) -> Iterator[tuple[Hit, Evtchn2L]]:
    """Each hit of a recording with the model's state there, on the delta path (the same
    :class:`Evtchn2L`, refreshed in place: read it before asking for the next)."""
    h = reader.header
    g = Geometry.for_arch(h.arch)
    m = Evtchn2L(g, Routing(g, h.vcpus, h.notify), vcpu_info={})
    obs = Observer(h)
    for hit in reader.deltas():
        obs.apply(m, reader.buffers, hit.dirty, hit.reset, hit.missing)
        yield hit, m
