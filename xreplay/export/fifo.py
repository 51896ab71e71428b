"""What a viewer is shown of a FIFO recording: the ports, vCPUs and queues that move.

A FIFO guest's event array is one page (1024 ports) or more, each word with four bits and a
LINK: a signal per bit of every word would bury the few ports in use, so, as the 2-level
export does, only ports whose event word ever changes (or that are PENDING at any snapshot)
are shown, plus labelled ones; and per vCPU only the queues whose ``ready`` bit or ``head``
is ever non-zero.  Values are read from each snapshot's decoded :class:`FifoState`; a field
whose region was not read at a hit is None (the exports show it as unknown, never as 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from xreplay.abi import fifo as fifo_abi
from xreplay.snapshot import Snapshot
from xreplay.xrr import XrrReader

#: the event word's fields as signals: (name, width); LINK is the next port of the queue
WORD_FIELDS = (("pending", 1), ("masked", 1), ("linked", 1), ("busy", 1),
               ("link", fifo_abi.EVTCHN_FIFO_LINK_BITS))
#: one vCPU's: (name, width); head[q] per shown queue follows
VCPU_FIELDS = (("evtchn_upcall_pending", 1), ("evtchn_upcall_mask", 1),
               ("ready", fifo_abi.EVTCHN_FIFO_MAX_QUEUES))
HEAD_WIDTH = fifo_abi.EVTCHN_FIFO_LINK_BITS  # a head is a port number
_MASKED = 1 << fifo_abi.EVTCHN_FIFO_MASKED  # a fresh event word, as Linux hands it over


@dataclass(slots=True)
class FifoSelection:
    """Pass 1 over a FIFO recording: what the exports declare."""

    ports: list[int]
    vcpus: list[int]  # with a vcpu_info or a control block at some snapshot
    queues: dict[int, list[int]] = field(default_factory=dict)  # vCPU -> queues shown


def select(r: XrrReader) -> FifoSelection:
    """Ports whose event word changes between snapshots or is PENDING at the first (hence
    PENDING at some snapshot or changing), ports of a page added later that are not just
    MASKED, labelled ports, and each vCPU's queues in use."""
    moved: set[int] = set()
    prev: list[int] | None = None
    vcpus: set[int] = set()
    queues: dict[int, set[int]] = {}
    nr_ports = 0
    for snap in r.snapshots():
        vcpus.update(snap.vcpus)
        fs = snap.fifo
        if fs is None:
            continue
        for v, cb in fs.control_blocks.items():
            qs = queues.setdefault(v, set())
            qs.update(q for q, head in enumerate(cb.head) if head or cb.ready >> q & 1)
        words = fs.words
        nr_ports = max(nr_ports, len(words))
        if prev is None:
            moved.update(p for p, w in enumerate(words) if w >> fifo_abi.EVTCHN_FIFO_PENDING & 1)
        elif words != prev:  # a C comparison; the Python loop only where something moved
            moved.update(p for p, (a, b) in enumerate(zip(prev, words, strict=False)) if a != b)
            # a page the guest added since (Linux grows the array a page at a time, every
            # word MASKED): its ports that are anything but masked and idle
            moved.update(p for p in range(len(prev), len(words)) if words[p] != _MASKED)
        if words:  # a hit whose pages were not read says nothing about change
            prev = words
    ports = (moved | {p for p in r.header.labels if p < nr_ports}) - {0}  # 0 is never bound
    vcpus |= set(queues)
    return FifoSelection(sorted(ports), sorted(vcpus),
                         {v: sorted(queues.get(v, ())) for v in sorted(vcpus)})


def port_values(snap: Snapshot, port: int) -> dict[str, int | None]:
    """One port's word fields at ``snap`` (None each: no word read for it)."""
    raw = None if snap.fifo is None else snap.fifo.word(port)
    if raw is None:
        return dict.fromkeys((n for n, _ in WORD_FIELDS), None)
    w = fifo_abi.EventWord(raw)
    return {"pending": int(w.pending), "masked": int(w.masked), "linked": int(w.linked),
            "busy": int(w.busy), "link": w.link}


def vcpu_values(snap: Snapshot, v: int, queues: list[int]) -> dict[str, int | None]:
    """One vCPU's upcall bytes, ``ready`` and the shown queues' ``head[q]`` at ``snap``."""
    vi = snap.vcpus.get(v)
    cb = None if snap.fifo is None else snap.fifo.control_blocks.get(v)
    out: dict[str, int | None] = {
        "evtchn_upcall_pending": None if vi is None else vi.evtchn_upcall_pending & 1,
        "evtchn_upcall_mask": None if vi is None or vi.evtchn_upcall_mask is None
        else vi.evtchn_upcall_mask & 1,
        "ready": None if cb is None else cb.ready}
    for q in queues:
        out[head_name(q)] = None if cb is None else cb.head[q]
    return out


def head_name(q: int) -> str:
    """``head[q]`` as a signal name (VCD reads ``[7]`` as a bit select)."""
    return f"head_{q}"


def frames(r: XrrReader, sel: FifoSelection) -> Iterator[tuple[Snapshot, dict[str, int | None]]]:
    """Pass 2: each snapshot with its values keyed ``p{port}.{field}`` / ``v{vcpu}.{field}``."""
    for snap in r.snapshots():
        values: dict[str, int | None] = {}
        for v in sel.vcpus:
            for name, value in vcpu_values(snap, v, sel.queues.get(v, [])).items():
                values[f"v{v}.{name}"] = value
        for p in sel.ports:
            for name, value in port_values(snap, p).items():
                values[f"p{p}.{name}"] = value
        yield snap, values
