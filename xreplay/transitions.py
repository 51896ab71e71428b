"""What changed between two snapshots, bit by bit, in Xen's vocabulary.

Shared by ``xreplay show --changes``, the 2-level model in :mod:`xreplay.replay` and
``xreplay diff``: each change names the field (``evtchn_pending``, ``evtchn_mask``,
``evtchn_pending_sel``, ``evtchn_upcall_pending``, ``evtchn_upcall_mask``), the port or
selector word, the vCPU where it applies, and the direction (set or cleared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xreplay.abi import fifo as fifo_abi
from xreplay.abi import iter_bits
from xreplay.snapshot import FifoState, Snapshot


@dataclass(frozen=True, slots=True)
class BitChange:
    field: str  # evtchn_pending | evtchn_mask | evtchn_pending_sel | evtchn_upcall_*
    index: int  # port for bitmaps, selector word for evtchn_pending_sel, 0 for upcall bytes
    set: bool  # True: 0 -> 1, False: 1 -> 0
    vcpu: int | None = None  # for per-vCPU fields

    def describe(self, labels: dict[int, str] | None = None) -> str:
        arrow = "0->1" if self.set else "1->0"
        if self.field in ("evtchn_pending", "evtchn_mask") or self.field.startswith(
                "event_array."):
            label = (labels or {}).get(self.index)
            where = f"port {self.index}" + (f" ({label})" if label else "")
        elif self.field == "evtchn_pending_sel":
            where = f"vcpu {self.vcpu} selector word {self.index}"
        elif self.field == "control_block.ready":
            where = f"vcpu {self.vcpu} queue {self.index}"
        else:
            where = f"vcpu {self.vcpu}"
        return f"{self.field} {where} {arrow}"

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "index": self.index, "set": self.set, "vcpu": self.vcpu}


def _bits(field: str, old: int, new: int, vcpu: int | None = None) -> list[BitChange]:
    flipped = old ^ new
    return [BitChange(field, b, bool(new >> b & 1), vcpu) for b in iter_bits(flipped)]


_WORD_BITS = (("PENDING", fifo_abi.EVTCHN_FIFO_PENDING), ("MASKED", fifo_abi.EVTCHN_FIFO_MASKED),
              ("LINKED", fifo_abi.EVTCHN_FIFO_LINKED), ("BUSY", fifo_abi.EVTCHN_FIFO_BUSY))


def _fifo_changes(a: FifoState, b: FifoState) -> list[BitChange]:
    """A FIFO guest's event-word bits (``event_array.PENDING`` …, by port) and control-block
    ``ready`` bits (by queue) that differ; LINK and ``head`` values are in the port table."""
    out = []
    moved = [p for p, (wa, wb) in enumerate(zip(a.words, b.words, strict=False)) if wa != wb]
    for name, bit in _WORD_BITS:
        for p in moved:
            flipped = (a.words[p] ^ b.words[p]) >> bit & 1
            if flipped:
                out.append(BitChange(f"event_array.{name}", p, bool(b.words[p] >> bit & 1)))
    for v in sorted(set(a.control_blocks) & set(b.control_blocks)):
        out += _bits("control_block.ready", a.control_blocks[v].ready,
                     b.control_blocks[v].ready, v)
    return out


def bit_changes(a: Snapshot, b: Snapshot) -> list[BitChange]:
    """Every bit that differs from ``a`` to ``b``: ports first, then each vCPU."""
    # the replay passes its 2-level model (Evtchn2L) here too: it has no FIFO state
    fa, fb = getattr(a, "fifo", None), getattr(b, "fifo", None)
    fifo = fa is not None and fb is not None
    if fa is not None and fb is not None:
        out = _fifo_changes(fa, fb)
    else:
        out = _bits("evtchn_pending", a.evtchn_pending, b.evtchn_pending)
        out += _bits("evtchn_mask", a.evtchn_mask, b.evtchn_mask)
    for v in sorted(set(a.vcpus) | set(b.vcpus)):
        va, vb = a.vcpus.get(v), b.vcpus.get(v)
        if va is None or vb is None:
            continue
        if not fifo:  # FIFO guests leave evtchn_pending_sel alone
            out += _bits("evtchn_pending_sel", va.evtchn_pending_sel, vb.evtchn_pending_sel, v)
        if va.evtchn_upcall_pending != vb.evtchn_upcall_pending:
            out.append(BitChange("evtchn_upcall_pending", 0, bool(vb.evtchn_upcall_pending), v))
        if va.evtchn_upcall_mask != vb.evtchn_upcall_mask and vb.evtchn_upcall_mask is not None:
            out.append(BitChange("evtchn_upcall_mask", 0, bool(vb.evtchn_upcall_mask), v))
    return out


@dataclass(frozen=True, slots=True)
class ValueChange:
    """A FIFO field that holds a port number rather than a bit: an event word's LINK
    (``event_array.LINK``, index = port) or a queue's ``control_block.head`` (index = queue,
    with ``vcpu``)."""

    field: str
    index: int
    old: int
    new: int
    vcpu: int | None = None

    @property
    def set(self) -> bool:  # as a BitChange: the field now names a port
        return self.new != 0

    def describe(self, labels: dict[int, str] | None = None) -> str:
        if self.field == "event_array.LINK":
            label = (labels or {}).get(self.index)
            where = f"port {self.index}" + (f" ({label})" if label else "")
            return f"{self.field} {where} {self.old}->{self.new}"
        return f"control_block.head[{self.index}] vcpu {self.vcpu} {self.old}->{self.new}"

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "index": self.index, "old": self.old, "new": self.new,
                "vcpu": self.vcpu}


def value_changes(a: FifoState, b: FifoState) -> list[ValueChange]:
    """The LINKs and heads that differ from ``a`` to ``b`` (the bits are :func:`bit_changes`')."""
    mask = fifo_abi.EVTCHN_FIFO_LINK_MASK
    out = [ValueChange("event_array.LINK", p, wa & mask, wb & mask)
           for p, (wa, wb) in enumerate(zip(a.words, b.words, strict=False))
           if wa != wb and (wa ^ wb) & mask]
    for v in sorted(set(a.control_blocks) & set(b.control_blocks)):
        ha, hb = a.control_blocks[v].head, b.control_blocks[v].head
        out += [ValueChange("control_block.head", q, x, y, v)
                for q, (x, y) in enumerate(zip(ha, hb, strict=True)) if x != y]
    return out


def watch_changes(a: Snapshot, b: Snapshot) -> dict[str, int]:
    """Number of changed bytes per watch region."""
    out = {}
    for name, new in b.watch.items():
        old = a.watch.get(name)
        if old is not None and old != new:
            out[name] = sum(x != y for x, y in zip(old, new, strict=False))
    return out
