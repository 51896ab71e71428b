"""Who may make each FIFO change between two snapshots: :func:`explain` for the FIFO ABI.

The counterpart of :func:`xreplay.replay.model.explain`, on the rules of
``xen/common/event_fifo.c`` and Linux's ``events_fifo.c``: Xen sets PENDING, LINKED, a tail
word's LINK (under BUSY), ``head[q]`` of an empty queue and then its ``ready`` bit, and raises
``evtchn_upcall_pending`` (``vcpu_mark_events_pending``); the guest takes ``ready`` with
xchg, clears LINKED and LINK together (``clear_linked``), PENDING once handled, and MASKED in
place only while not PENDING (``clear_masked_cond``; otherwise EVTCHNOP_unmask, where Xen
LINKs the event).  Only Xen writes ``head``: Linux walks a copy of its own.

A verdict of "breaks the FIFO ABI" needs the interval to be *quiet* (every vCPU sat in its
block function, so only Xen wrote) or, for a guest's write, the later hit to be a block or
hang (nothing of the guest's is in flight): anywhere else a legal sequence of steps the
probes did not see may explain the change, and it is said so.
"""

from __future__ import annotations

from xreplay.abi import fifo as fifo_abi
from xreplay.replay.model import EITHER, GUEST, XEN, Explanation
from xreplay.snapshot import FifoState, Snapshot
from xreplay.transitions import BitChange, ValueChange, bit_changes, value_changes

ABI = "FIFO"


def _ex(c: BitChange | ValueChange, actor: str, op: str, legal: bool = True,
        note: str = "") -> Explanation:
    return Explanation(c, actor, op, legal, note, ABI)


def _where(fs: FifoState, port: int) -> str:
    """Where a LINKED event sits: its queue and what leads to it (head or a LINK)."""
    at = fs.queues().get(port)
    before = [p for p, w in enumerate(fs.words) if p != port and w >> fifo_abi.EVTCHN_FIFO_LINKED
              & 1 and w & fifo_abi.EVTCHN_FIFO_LINK_MASK == port]
    if at is not None:
        v, q, head = at
        return (f"on vCPU {v} queue {q} as its head" if head == port else
                f"on vCPU {v} queue {q} behind port {before[0]}" if before else
                f"on vCPU {v} queue {q}")
    if before:
        return f"behind port {before[0]}, on no queue a head leads to"
    return "on no queue a head leads to"


def explain(prev: Snapshot, cur: Snapshot, *, quiet: bool = False,
            settled: bool = False) -> list[Explanation]:
    """Explain every FIFO bit and value that changed from ``prev`` to ``cur``.

    ``quiet``: only Xen could write in between; ``settled``: ``cur`` is a block or hang hit,
    so the guest has no step of its own half done."""
    a, b = prev.fifo, cur.fifo
    if a is None or b is None:
        return []
    out: list[Explanation] = []
    changes: list[BitChange | ValueChange] = [*bit_changes(prev, cur), *value_changes(a, b)]
    for c in changes:
        f = c.field
        word = b.word(c.index) if f.startswith("event_array.") else None
        w = fifo_abi.EventWord(word or 0)
        if f == "event_array.PENDING":
            if not c.set:
                out.append(_ex(c, GUEST, "clear_evtchn: the handler acknowledges the event"))
            elif w.masked:
                out.append(_ex(c, XEN, "evtchn_fifo_set_pending", True,
                               "MASKED: not LINKED until EVTCHNOP_unmask"))
            elif w.linked:
                out.append(_ex(c, XEN, "evtchn_fifo_set_pending", True,
                               "LINKED " + _where(b, c.index)))
            else:
                out.append(_ex(c, XEN, "evtchn_fifo_set_pending", not quiet,
                               "unmasked yet not LINKED, where set_pending LINKs an unmasked "
                               "event" if quiet else "not LINKED now: the guest consumed it "
                               "since"))
        elif f == "event_array.MASKED":
            if c.set:
                out.append(_ex(c, GUEST, "mask_evtchn"))
            elif not w.pending:
                out.append(_ex(c, GUEST, "clear_masked_cond (in place: not PENDING)"))
            elif w.linked:
                out.append(_ex(c, GUEST, "EVTCHNOP_unmask", True,
                               "PENDING: Xen LINKed it (evtchn_fifo_unmask) "
                               + _where(b, c.index)))
            else:
                out.append(_ex(c, GUEST, "a direct clear of MASKED", not settled,
                               "PENDING yet not LINKED, where EVTCHNOP_unmask would have "
                               "LINKed it (Linux leaves MASKED set while PENDING): the event "
                               "is stranded" + ("" if settled else
                                                ", unless the guest consumed it since")))
        elif f == "event_array.LINKED":
            if not c.set:
                out.append(_ex(c, GUEST, "clear_linked while walking its queue"))
            elif not w.pending and quiet:
                out.append(_ex(c, XEN, "evtchn_fifo_set_pending", False,
                               "LINKED without PENDING: Xen sets PENDING first"))
            else:
                out.append(_ex(c, XEN, "evtchn_fifo_set_pending / evtchn_fifo_unmask", True,
                               _where(b, c.index)))
        elif f == "event_array.BUSY":
            out.append(_ex(c, XEN if c.set else EITHER,
                           "evtchn_fifo_set_link's BUSY lock" if c.set else
                           "BUSY released (Xen's set_link, or the guest's unmask)"))
        elif f == "event_array.LINK":
            assert isinstance(c, ValueChange)
            if c.new and not c.old:
                cut = w.linked and c.index not in b.queues()
                out.append(_ex(c, XEN, "evtchn_fifo_set_link", True,
                               f"port {c.new} queued behind it" + (
                                   f", but no head leads to port {c.index}: port {c.new} "
                                   "is lost with it (Xen's tail was an event the guest "
                                   "dropped)" if cut else "")))
            elif not c.new and w.linked:
                nxt = b.word(c.old)
                lost = nxt is not None and nxt >> fifo_abi.EVTCHN_FIFO_LINKED & 1 and \
                    c.old not in b.queues()
                out.append(_ex(c, GUEST, "a write of the word that kept LINKED", not lost,
                               f"port {c.old} was queued behind it and is now on no queue a "
                               "head leads to: the LINK Xen set was overwritten (clear_linked "
                               "must be a cmpxchg)" if lost else "LINKED kept, LINK cleared"))
            elif not c.new:
                out.append(_ex(c, GUEST, "clear_linked (LINKED and LINK together)", True,
                               f"the guest goes on to port {c.old}"))
            else:
                out.append(_ex(c, EITHER, "evtchn_fifo_set_link / clear_linked", True,
                               f"now queued behind it: port {c.new}"))
        elif f == "control_block.ready":
            assert c.vcpu is not None
            cb = b.control_blocks[c.vcpu]
            if not c.set:
                out.append(_ex(c, GUEST, "xchg(ready) in __evtchn_fifo_handle_events"))
            elif not cb.head[c.index]:
                out.append(_ex(c, XEN, "evtchn_fifo_set_pending", not quiet,
                               f"head[{c.index}]=0, where Xen writes the head before ready"))
            else:
                out.append(_ex(c, XEN, "evtchn_fifo_set_pending", True,
                               f"queue {c.index} became non-empty: head[{c.index}]="
                               f"{cb.head[c.index]}"))
        elif f == "control_block.head":
            out.append(_ex(c, XEN, "evtchn_fifo_set_pending", True,
                           f"port {c.new} LINKed into an empty queue {c.index} (Xen's tail "
                           "was no longer LINKED)" if c.new else "head reset"))
        elif f == "evtchn_upcall_pending":
            assert c.vcpu is not None
            if not c.set:
                out.append(_ex(c, GUEST, "xen_evtchn_do_upcall clears it before looking"))
                continue
            cb = b.control_blocks.get(c.vcpu)
            ready = 0 if cb is None else cb.ready
            out.append(_ex(c, XEN, "vcpu_mark_events_pending", True,
                           f"ready queues {fifo_abi.ready_queues(ready)}" if ready else
                           "no ready queue: a spurious upcall, or the queues were taken "
                           "since"))
        else:  # evtchn_upcall_mask
            out.append(_ex(c, GUEST, "the PV guest's local_irq_disable/enable"))
    return out
