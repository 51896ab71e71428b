"""From recorded bytes to the 2-level model: decode only the fields a delta rewrote.

A snapshot frame usually rewrites a few bytes of ``shared_info`` (a pending bit, a
selector word, ``evtchn_upcall_pending``, the time info).  :class:`Observer` knows where
each field the model needs lives (``evtchn_pending``, ``evtchn_mask``, and per vCPU the
head of its ``vcpu_info``: ``evtchn_upcall_pending``, ``evtchn_upcall_mask``,
``evtchn_pending_sel``, embedded in ``shared_info`` or registered in a region of its own).
For each region a :class:`~xreplay.xrr.deltas.Hit` rewrote (its ``touched`` bits) it
re-reads the fields that overlap the span rewritten there (the reader's ``hulls``) into an
:class:`~xreplay.replay.model.Evtchn2L`: a change of one word of ``evtchn_pending`` patches
those bytes of the int (``int.from_bytes`` costs about a nanosecond a byte, and the bitmap
is 512 bytes on x86_64).  It reads the same bytes the
:class:`~xreplay.snapshot.Snapshot` decoder does (offsets from :mod:`xreplay.abi`), so the
two paths agree field for field (``tests/test_observe.py`` walks both).
"""

from __future__ import annotations

from collections.abc import Iterator

from xreplay.abi import Geometry, layout
from xreplay.replay.model import Evtchn2L, Routing, VcpuBits
from xreplay.snapshot import Snapshot
from xreplay.xrr import XrrReader
from xreplay.xrr.deltas import Hit
from xreplay.xrr.header import RecordingHeader

_LOW = 64  # bytes of a bitmap decoded alone when the rest is zero (ports below 512 on x86_64)
_ZEROS = bytes(4096)


def bitmap(raw: bytes | bytearray) -> int:
    """``evtchn_pending``/``evtchn_mask`` bytes as an int, port *p* = bit *p*.
    ``int.from_bytes`` costs about a nanosecond a byte whatever the value, and a guest's
    ports sit at the bottom of a 512-byte (x86_64) bitmap: when the top is zero (one
    ``memcmp``) only the bottom is converted."""
    if len(raw) > _LOW and raw[_LOW:] == _ZEROS[:len(raw) - _LOW]:
        return int.from_bytes(raw[:_LOW], "little")
    return int.from_bytes(raw, "little")


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
        self.sel0, self.sel1 = sel_off, sel_off + sel_size
        self.head = sel_off + sel_size  # the fields we decode end with evtchn_pending_sel
        self.vcpu_info_size = s.vcpu_info.sizeof()
        self.legacy_max = s.legacy_max_vcpus
        self.shared = next(i for i, r in enumerate(header.regions) if r.kind == "shared_info")
        self.registered: dict[int, int] = {}  # vCPU -> its vcpu_info region (last one wins)
        for i, r in enumerate(header.regions):
            if r.kind == "vcpu_info" and r.vcpu is not None:
                self.registered[r.vcpu] = i
        self.vcpus = list(dict.fromkeys(header.vcpus))
        # per vCPU: (region, offset) of its vcpu_info in the current buffers, or None
        self.source: dict[int, tuple[int, int] | None] = {}
        self.missing: int | None = None  # the regions unread at the last hit (None: no hit)
        self.embedded: list[tuple[int, int]] = []  # (vCPU, offset) read from shared_info
        self.registered_now: list[tuple[int, int]] = []  # (region, vCPU) it is the source of
        self.registered_bits = 0  # those regions as bits
        self.embedded_end = 0  # where the last embedded vcpu_info head ends

    def _sources(self, missing: int) -> None:
        """Which copy of each vCPU's vcpu_info a snapshot decodes (as
        :meth:`XrrReader.snapshot_of` does): its registered region when that was read at
        this hit (else none: the legacy slot is stale), or ``shared_info.vcpu_info[v]``."""
        self.missing = missing
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
        self.registered_now = [(src[0], v) for v, src in self.source.items()
                               if src is not None and src[0] != self.shared]
        self.registered_bits = 0
        for region, _ in self.registered_now:
            self.registered_bits |= 1 << region

    def full(self, m: Evtchn2L, bufs: list[bytearray | None], missing: int) -> None:
        """Decode every field (the first hit, a hit after a seek, a hit where the set of
        regions not read changed); ``missing`` bit *i*: region *i* not read at this hit."""
        self._sources(missing)
        shared = None if missing >> self.shared & 1 else bufs[self.shared]
        if shared is None:
            m.evtchn_pending = m.evtchn_mask = 0
        else:
            m.evtchn_pending = bitmap(shared[self.pending[0]:self.pending[1]])
            m.evtchn_mask = bitmap(shared[self.mask[0]:self.mask[1]])
        m.vcpu_info = {}
        for v in self.vcpus:
            src = self.source[v]
            if src is not None:
                region, at = src
                self._vcpu_changed(m, v, bufs[region][at:at + self.head])  # type: ignore[index]

    def apply(self, m: Evtchn2L, bufs: list[bytearray | None], touched: int,
              reset: bool = False, missing: int = 0,
              hulls: list[tuple[int, int]] | None = None) -> bool:
        """Refresh the fields of the regions ``touched`` rewrote (bit *i*: region *i*);
        True if any value changed.  ``hulls[i]``: the span region *i* was rewritten in (see
        :meth:`XrrReader.raw_deltas`; None: anywhere).  ``missing``: the hit's
        :attr:`~xreplay.xrr.deltas.Hit.missing` regions (unknown there: a region not read
        contributes no field, as in a decoded snapshot).

        A refreshed vCPU gets a new :class:`VcpuBits` (never mutated in place), so a copy of
        the previous state taken with :meth:`Evtchn2L.assign` stays valid.
        """
        if reset or missing != self.missing:
            return self._full_changed(m, bufs, missing)
        changed = False
        head = self.head
        si = self.shared
        if touched >> si & 1:
            shared = bufs[si]
            lo, hi = (0, len(shared)) if hulls is None else hulls[si]  # type: ignore[arg-type]
            p0, p1 = self.pending
            if lo < p1 and hi > p0:
                a = lo if lo > p0 else p0  # the overlap (no max()/min() calls: per hit)
                z = hi if hi < p1 else p1
                old = m.evtchn_pending
                if z - a <= 8:  # a word or less: patch those bytes of the int
                    shift = (a - p0) << 3
                    value = (old & ~(((1 << ((z - a) << 3)) - 1) << shift)
                             | int.from_bytes(shared[a:z], "little") << shift)  # type: ignore[index]
                else:
                    value = bitmap(shared[p0:p1])  # type: ignore[index]
                if value != old:
                    m.evtchn_pending, changed = value, True
            m0, m1 = self.mask
            if lo < m1 and hi > m0:
                value = bitmap(shared[m0:m1])  # type: ignore[index]
                if value != m.evtchn_mask:
                    m.evtchn_mask, changed = value, True
            if lo < self.embedded_end:
                for v, at in self.embedded:
                    if lo < at + head and hi > at and self._vcpu_changed(
                            m, v, shared[at:at + head]):  # type: ignore[index]
                        changed = True
        if touched & self.registered_bits:
            for region, v in self.registered_now:
                if touched >> region & 1 and (hulls is None or hulls[region][0] < head) \
                        and self._vcpu_changed(m, v, bufs[region][:head]):  # type: ignore[index]
                    changed = True
        return changed

    def _vcpu_changed(self, m: Evtchn2L, v: int, raw: bytes) -> bool:
        """Decode vCPU ``v``'s vcpu_info head (``raw``: its first :attr:`head` bytes) into
        ``m``; True if a field (not only padding) changed."""
        up, mask = raw[0], raw[1] if self.has_upcall_mask else None
        sel = int.from_bytes(raw[self.sel0:self.sel1], "little")
        old = m.vcpu_info.get(v)
        if (old is not None and old.evtchn_upcall_pending == up
                and old.evtchn_upcall_mask == mask and old.evtchn_pending_sel == sel):
            return False
        m.vcpu_info[v] = VcpuBits(up, mask, sel)
        return True

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
        obs.apply(m, reader.buffers, hit.touched, hit.reset, hit.missing, reader.hulls)
        yield hit, m
