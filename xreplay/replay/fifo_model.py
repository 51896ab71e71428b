"""A model of Xen's FIFO event-channel ABI and of a Linux guest driving it.

Xen's side follows ``xen/common/event_fifo.c``: :meth:`EvtchnFifo.evtchn_fifo_set_pending`
sets PENDING and, when the event is unmasked and not LINKED, LINKs it onto the tail of its
priority's queue on the notify vCPU (through the tail word's LINK, with the BUSY lock when
the guest races it; into ``head`` when the queue was empty, which also sets the ``ready``
bit and marks the vCPU's upcall pending); :meth:`evtchn_fifo_unmask` (EVTCHNOP_unmask)
clears MASKED and re-runs set_pending when PENDING.  The guest's side follows Linux's
``drivers/xen/events/events_fifo.c``: ``ready`` taken with xchg, each ready queue walked from
the guest's own copy of ``head`` clearing LINKED (``clear_linked``), PENDING cleared when the
handler acks, unmask by clearing MASKED only while not PENDING (``clear_masked_cond``) and
by hypercall otherwise.  :meth:`guest_unmask_unsafe` is the classic bug: MASKED cleared with
PENDING set and no hypercall, so nothing ever LINKs the event.

The model's state serialises to the recording's ``fifo_event_page`` and
``fifo_control_block`` regions, so tests write real recordings from it.
"""

from __future__ import annotations

from xreplay.abi import fifo as f

_P = 1 << f.EVTCHN_FIFO_PENDING
_M = 1 << f.EVTCHN_FIFO_MASKED
_L = 1 << f.EVTCHN_FIFO_LINKED
_B = 1 << f.EVTCHN_FIFO_BUSY
_LINK = f.EVTCHN_FIFO_LINK_MASK


class EvtchnFifo:
    """Event words, per-vCPU control blocks and Xen's private queue tails."""

    def __init__(self, vcpus: tuple[int, ...] = (0,), pages: int = 1) -> None:
        self.words = [_M] * (pages * f.EVENT_WORDS_PER_PAGE)  # Linux masks every port first
        self.ready = {v: 0 for v in vcpus}
        self.head = {v: [0] * f.EVTCHN_FIFO_MAX_QUEUES for v in vcpus}
        self.tail = {v: [0] * f.EVTCHN_FIFO_MAX_QUEUES for v in vcpus}  # Xen's, not shared
        self.guest_head = {v: [0] * f.EVTCHN_FIFO_MAX_QUEUES for v in vcpus}  # Linux's copy
        self.upcall_pending = {v: 0 for v in vcpus}
        self.notify: dict[int, int] = {}
        self.priority: dict[int, int] = {}

    # -- binding ------------------------------------------------------------------------

    def bind(self, port: int, vcpu: int = 0, priority: int = f.EVTCHN_FIFO_PRIORITY_DEFAULT
             ) -> None:
        self.notify[port] = vcpu
        self.priority[port] = priority

    # -- Xen's side (event_fifo.c) ------------------------------------------------------

    def _set_link(self, tail: int, port: int) -> bool:
        """``evtchn_fifo_set_link``: LINK the tail word to ``port`` iff it is still LINKED."""
        w = self.words[tail]
        if not w & _L:
            return False
        self.words[tail] = (w & ~(_B | _LINK)) | port
        return True

    def evtchn_fifo_set_pending(self, port: int) -> None:
        v = self.notify.get(port, 0)
        q = self.priority.get(port, f.EVTCHN_FIFO_PRIORITY_DEFAULT)
        w = self.words[port]
        self.words[port] = w | _P
        if w & _M or w & _L:
            return
        self.words[port] |= _L
        tails = self.tail[v]
        if tails[q] == port:
            tails[q] = 0
        linked = bool(tails[q]) and self._set_link(tails[q], port)
        if not linked:
            self.head[v][q] = port
        tails[q] = port
        if not linked and not self.ready[v] >> q & 1:
            self.ready[v] |= 1 << q
            self.vcpu_mark_events_pending(v)

    def evtchn_fifo_unmask(self, port: int) -> None:
        """EVTCHNOP_unmask: clear MASKED, relink if PENDING."""
        self.words[port] &= ~_M
        if self.words[port] & _P:
            self.evtchn_fifo_set_pending(port)

    def vcpu_mark_events_pending(self, v: int) -> None:
        self.upcall_pending[v] = 1

    # -- the guest's side (Linux events_fifo.c) -----------------------------------------

    def guest_mask(self, port: int) -> None:
        self.words[port] |= _M

    def guest_unmask(self, port: int) -> None:
        """``evtchn_fifo_unmask``: clear MASKED in place unless PENDING, else hypercall."""
        if self.words[port] & _P:
            self.evtchn_fifo_unmask(port)
        else:
            self.words[port] &= ~(_M | _B)

    def guest_unmask_unsafe(self, port: int) -> None:
        """The bug: MASKED cleared although PENDING, without EVTCHNOP_unmask."""
        self.words[port] &= ~_M

    def guest_clear_pending(self, port: int) -> None:
        self.words[port] &= ~_P

    def guest_clear_linked(self, port: int) -> int:
        """``clear_linked``: drop LINKED and LINK, return the LINK (next port)."""
        w = self.words[port]
        self.words[port] = w & ~(_L | _LINK)
        return w & _LINK

    def upcall(self, v: int = 0) -> None:
        """``xen_evtchn_do_upcall``: clear evtchn_upcall_pending before looking."""
        self.upcall_pending[v] = 0

    def handle_events(self, v: int = 0, *, ack: bool = True, drop_link: int | None = None
                      ) -> list[int]:
        """``__evtchn_fifo_handle_events``: take ``ready``, consume every ready queue.

        Returns the ports handled.  ``ack=False`` leaves PENDING set (no EOI yet);
        ``drop_link`` is a planted bug: that port's LINKED is cleared without following its
        LINK, so the rest of its queue is lost.
        """
        handled: list[int] = []
        ready, self.ready[v] = self.ready[v], 0
        while ready:
            q = (ready & -ready).bit_length() - 1
            head = self.guest_head[v][q] or self.head[v][q]
            port = head
            nxt = self.guest_clear_linked(port)
            if port == drop_link:
                nxt = 0
            if nxt == 0:
                ready &= ~(1 << q)
            w = self.words[port]
            if w & _P and not w & _M:
                handled.append(port)
                if ack:
                    self.guest_clear_pending(port)
            self.guest_head[v][q] = nxt
            ready |= self.ready[v]
            self.ready[v] = 0
        return handled

    # -- serialisation ------------------------------------------------------------------

    def page(self, index: int) -> bytes:
        start = index * f.EVENT_WORDS_PER_PAGE
        return b"".join(w.to_bytes(4, "little")
                        for w in self.words[start: start + f.EVENT_WORDS_PER_PAGE])

    def control_block(self, v: int) -> bytes:
        return f.ControlBlock(self.ready[v], tuple(self.head[v])).build()

    @property
    def pages(self) -> int:
        return len(self.words) // f.EVENT_WORDS_PER_PAGE
