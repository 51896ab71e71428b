"""A model of Xen's 2-level event-channel ABI, and who may make each transition.

Two halves, both on plain ints (port *p* is bit *p*, selector word *w* is bit *w*):

* :class:`Evtchn2L` mirrors ``xen/common/event_2l.c`` (``evtchn_2l_set_pending``,
  ``evtchn_2l_unmask``, ``evtchn_2l_clear_pending``, ``evtchn_2l_is_pending``,
  ``evtchn_2l_is_masked``, ``evtchn_2l_print_state``) and ``vcpu_mark_events_pending``
  (``xen/arch/x86/domain.c``), plus the guest's reference bottom half.  It is the
  executable statement of the rules the replay checks recordings against, and tests use it
  to generate legal sequences.
* :func:`explain` takes two consecutive snapshots and says, for every bit that changed,
  who may legally have changed it: Xen raises (pending 0->1, selector 0->1,
  ``evtchn_upcall_pending`` 0->1), the guest clears and (un)masks, and a PV guest may
  re-raise a pending unmasked port itself (Mini-OS ``unmask_evtchn``).  A recording only
  shows the state at probe hits, so a bit may have toggled in between unseen; a verdict of
  "illegal" is only given when the interval is *quiet* (every vCPU sat in its block function,
  so only Xen could write), where no interleaving of legal steps explains the change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from xreplay.abi import Geometry, iter_bits
from xreplay.snapshot import Snapshot
from xreplay.transitions import BitChange, ValueChange, bit_changes

XEN = "Xen"
GUEST = "guest"
EITHER = "Xen or guest"


class Routing:
    """Which vCPU Xen notifies for each port (the header's ``notify`` map, default 0)."""

    def __init__(self, geometry: Geometry, vcpus: Iterable[int],
                 notify: dict[int, int] | None = None) -> None:
        self.geometry = geometry
        self.notify = {p: v for p, v in (notify or {}).items() if 0 <= p < geometry.nr_ports}
        self.vcpus = sorted(set(vcpus) | set(self.notify.values()) | {0})
        self._ports_of = {v: 0 for v in self.vcpus}
        elsewhere = 0
        for port, v in self.notify.items():
            self._ports_of[v] |= 1 << port
            if v != 0:
                elsewhere |= 1 << port
        self._ports_of[0] |= geometry.all_ports & ~elsewhere

    def vcpu_of(self, port: int) -> int:
        return self.notify.get(port, 0)

    def ports_of(self, vcpu: int) -> int:
        return self._ports_of.get(vcpu, 0)


# --------------------------------------------------------------------------- the ABI model


@dataclass(slots=True)
class VcpuBits:
    """The three ``vcpu_info`` fields event delivery depends on (``evtchn_upcall_mask``
    is None on ARM, which has none)."""

    evtchn_upcall_pending: int = 0
    evtchn_upcall_mask: int | None = 0
    evtchn_pending_sel: int = 0


@dataclass
class Evtchn2L:
    """Xen's 2-level event channels and a reference guest, step by step.

    Xen's operations return whether the vCPU was notified (the 0->1 edge of
    ``evtchn_upcall_pending`` that injects the upcall); ``upcalls`` counts those edges.

    The replay keeps one as the state a recording shows at each probe hit
    (:mod:`xreplay.replay.observe` writes the recorded fields into it) and asks it the
    2-level questions: what a bottom half would deliver, what is stranded.  There
    ``vcpu_info`` holds only the vCPUs whose ``vcpu_info`` the recording has read.
    """

    geometry: Geometry
    routing: Routing
    evtchn_pending: int = 0
    evtchn_mask: int = 0
    vcpu_info: dict[int, VcpuBits] = field(default_factory=dict)
    upcalls: int = 0
    _unmasked_of: int = field(default=-1, repr=False, compare=False)
    _unmasked: int = field(default=0, repr=False, compare=False)

    def unmasked(self) -> int:
        """The unmasked ports (``~evtchn_mask`` within the 2-level range), cached per mask:
        a guest masks nearly every port, so ``~`` of its mask is a 4096-bit operation, and
        the mask rarely changes."""
        mask = self.evtchn_mask
        if mask is not self._unmasked_of:
            self._unmasked_of, self._unmasked = mask, ~mask & self.geometry.all_ports
        return self._unmasked

    @classmethod
    def new(cls, arch: str, vcpus: Iterable[int] = (0,),
            notify: dict[int, int] | None = None, *, all_masked: bool = False) -> Evtchn2L:
        g = Geometry.for_arch(arch)
        r = Routing(g, vcpus, notify)
        return cls(g, r, evtchn_mask=g.all_ports if all_masked else 0,
                   vcpu_info={v: VcpuBits() for v in r.vcpus})

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> Evtchn2L:
        g = Geometry(snap.bits_per_word)
        r = Routing(g, snap.vcpus, snap.notify)
        return cls(g, r, snap.evtchn_pending, snap.evtchn_mask,
                   {v: VcpuBits(s.evtchn_upcall_pending, s.evtchn_upcall_mask or 0,
                                s.evtchn_pending_sel) for v, s in snap.vcpus.items()})

    @property
    def vcpus(self) -> dict[int, VcpuBits]:
        """``vcpu_info`` under :class:`~xreplay.snapshot.Snapshot`'s name, so that
        :func:`explain` and :func:`~xreplay.transitions.bit_changes` read either."""
        return self.vcpu_info

    def assign(self, other: Evtchn2L) -> None:
        """Take ``other``'s bits (the replay's previous state becomes its current one).
        The replay never mutates a :class:`VcpuBits` it observed, so sharing them is safe."""
        self.evtchn_pending = other.evtchn_pending
        self.evtchn_mask = other.evtchn_mask
        self.vcpu_info = dict(other.vcpu_info)

    # -- Xen: xen/common/event_2l.c -----------------------------------------------------

    def is_pending(self, port: int) -> bool:
        return bool(self.evtchn_pending >> port & 1)

    def is_masked(self, port: int) -> bool:
        """Ports beyond the 2-level range count as masked, as in ``evtchn_2l_is_masked``."""
        return port >= self.geometry.nr_ports or bool(self.evtchn_mask >> port & 1)

    def print_state(self, port: int) -> bool:
        """The 's' of the 'e' key: the port's selector bit in its notify vCPU."""
        v = self.vcpu_info[self.routing.vcpu_of(port)]
        return bool(v.evtchn_pending_sel >> self.geometry.word(port) & 1)

    def selector_bit(self, port: int, vcpu: int | None = None) -> bool | None:
        """:meth:`print_state` for ``vcpu`` (default: the notify vCPU); None: not read."""
        v = self.vcpu_info.get(self.routing.vcpu_of(port) if vcpu is None else vcpu)
        if v is None:
            return None
        return bool(v.evtchn_pending_sel >> self.geometry.word(port) & 1)

    def pms(self, port: int) -> str:
        """The port's ``[p/m/s]`` cell as the 'e' key prints it (``?``: selector not read)."""
        s = self.selector_bit(port)
        return (f"[{int(self.is_pending(port))}/{int(self.is_masked(port))}/"
                f"{'?' if s is None else int(s)}]")

    def upcall_pending(self, vcpu: int) -> int:
        v = self.vcpu_info.get(vcpu)
        return 0 if v is None else v.evtchn_upcall_pending

    def vcpu_mark_events_pending(self, vcpu: int) -> bool:
        """Notify only on the 0->1 edge of ``evtchn_upcall_pending``."""
        v = self.vcpu_info[vcpu]
        if v.evtchn_upcall_pending:
            return False
        v.evtchn_upcall_pending = 1
        self.upcalls += 1
        return True

    def _raise_selector(self, port: int) -> bool:
        vcpu = self.routing.vcpu_of(port)
        v = self.vcpu_info[vcpu]
        bit = 1 << self.geometry.word(port)
        if v.evtchn_pending_sel & bit:  # test_and_set: already set, nothing more
            return False
        v.evtchn_pending_sel |= bit
        return self.vcpu_mark_events_pending(vcpu)

    def set_pending(self, port: int) -> bool:
        """``evtchn_2l_set_pending``: a masked or already pending port stops early."""
        if self.is_pending(port):
            return False
        self.evtchn_pending |= 1 << port
        if self.is_masked(port):
            return False
        return self._raise_selector(port)

    def unmask(self, port: int) -> bool:
        """``evtchn_2l_unmask`` (EVTCHNOP_unmask): re-raise a port that went pending."""
        was_masked = self.is_masked(port)
        self.evtchn_mask &= ~(1 << port)
        if was_masked and self.is_pending(port):
            return self._raise_selector(port)
        return False

    def clear_pending(self, port: int) -> None:
        self.evtchn_pending &= ~(1 << port)

    # -- guest ---------------------------------------------------------------------------

    def mask(self, port: int) -> None:
        self.evtchn_mask |= 1 << port

    def unmask_no_reraise(self, port: int) -> None:
        """The guest bug: clear the mask bit directly and never re-raise."""
        self.evtchn_mask &= ~(1 << port)

    def deliverable(self, vcpu: int) -> int:
        """Ports a bottom half on ``vcpu`` would find: pending, unmasked, selector bit set
        (the ``[1/0/1]`` ports; none when its ``vcpu_info`` was not read)."""
        v = self.vcpu_info.get(vcpu)
        if v is None:
            return 0
        return (self.evtchn_pending & self.unmasked() & self.routing.ports_of(vcpu)
                & self.geometry.expand_sel(v.evtchn_pending_sel))

    def stranded(self) -> int:
        """Pending, unmasked ports no one will deliver: no selector bit, no upcall pending."""
        live = self.evtchn_pending & self.unmasked()
        if not live:
            return 0
        out = 0
        for vcpu, v in self.vcpu_info.items():
            if v.evtchn_upcall_pending:
                continue
            out |= (live & self.routing.ports_of(vcpu)
                    & ~self.geometry.expand_sel(v.evtchn_pending_sel))
        return out

    def demux(self, vcpu: int, *, mask_taken: bool = False) -> list[int]:
        """The reference bottom half (Mini-OS ``do_hypervisor_callback``, the thread's
        ``evtchn_demux_pending``): clear ``evtchn_upcall_pending``, ``xchg`` the selector,
        take every pending unmasked port of those words.  Returns the ports taken."""
        v = self.vcpu_info[vcpu]
        v.evtchn_upcall_pending = 0
        sel, v.evtchn_pending_sel = v.evtchn_pending_sel, 0
        taken = list(iter_bits(self.evtchn_pending & ~self.evtchn_mask
                               & self.routing.ports_of(vcpu) & self.geometry.expand_sel(sel)))
        for port in taken:
            if mask_taken:
                self.mask(port)
            self.clear_pending(port)
        return taken


# --------------------------------------------------------------------------- explanations


@dataclass(frozen=True, slots=True)
class Explanation:
    """One changed bit, who may have changed it (``actor``), through what (``op``), and
    whether the 2-level rules allow it (``legal``); ``note`` says what follows from it."""

    change: BitChange | ValueChange
    actor: str
    op: str
    legal: bool = True
    note: str = ""
    abi: str = "2-level"  # whose rules ``legal`` is judged by (FIFO: fifo_explain.py)

    def describe(self, labels: dict[int, str] | None = None) -> str:
        text = f"{self.change.describe(labels)} by {self.actor} ({self.op})"
        if self.note:
            text += f": {self.note}"
        return text if self.legal else f"{text} [breaks the {self.abi} ABI]"

    def to_json(self) -> dict:
        return {**self.change.to_json(), "actor": self.actor, "op": self.op,
                "legal": self.legal, "note": self.note}


def _vcpu_int(snap: Snapshot, vcpu: int, name: str) -> int:
    v = snap.vcpus.get(vcpu)
    return 0 if v is None else int(getattr(v, name) or 0)


def explain(prev: Snapshot, cur: Snapshot, geometry: Geometry, routing: Routing, *,
            quiet: bool = False, changes: list[BitChange] | None = None) -> list[Explanation]:
    """Explain every bit that changed from ``prev`` to ``cur``.

    ``quiet`` says the guest could not have written in between (every vCPU was in its
    block function), so only Xen's own rules apply and unexplainable raises are illegal.
    """
    changes = bit_changes(prev, cur) if changes is None else changes
    pend_unmasked = cur.evtchn_pending & ~cur.evtchn_mask & geometry.all_ports
    raised = cur.evtchn_pending & ~prev.evtchn_pending
    unmasked_now = prev.evtchn_mask & ~cur.evtchn_mask
    sel_raised = {v: _vcpu_int(cur, v, "evtchn_pending_sel")
                  & ~_vcpu_int(prev, v, "evtchn_pending_sel") for v in cur.vcpus}
    out: list[Explanation] = []
    for c in changes:
        f = c.field
        if f == "evtchn_pending":
            out.append(_explain_pending(c, prev, cur, geometry, routing, quiet))
        elif f == "evtchn_mask":
            out.append(_explain_mask(c, cur, geometry, routing))
        elif f == "evtchn_pending_sel":
            if not c.set:
                out.append(Explanation(c, GUEST, "xchg(evtchn_pending_sel) in the bottom half"))
                continue
            assert c.vcpu is not None
            mine = routing.ports_of(c.vcpu) & geometry.word_ports(c.index)
            op = "evtchn_2l_set_pending/evtchn_2l_unmask, or a PV guest's re-raise"
            if mine & pend_unmasked or (not quiet and mine & (raised | unmasked_now)):
                if quiet and not _vcpu_int(cur, c.vcpu, "evtchn_upcall_pending"):
                    out.append(Explanation(c, XEN, op, False, "evtchn_upcall_pending was not "
                                           "raised with it (vcpu_mark_events_pending)"))
                else:
                    out.append(Explanation(c, EITHER, op))
            elif quiet:
                masked = mine & cur.evtchn_pending & cur.evtchn_mask
                why = (f"Xen set a selector bit for masked port(s) "
                       f"{', '.join(map(str, iter_bits(masked)))}" if masked else
                       "no port of that word is pending and unmasked")
                out.append(Explanation(c, XEN, op, False, why))
            else:
                out.append(Explanation(c, EITHER, op, True, "no pending unmasked port left in "
                                       "the word (a race with the bottom half: expect a "
                                       "spurious upcall)"))
        elif f == "evtchn_upcall_pending":
            assert c.vcpu is not None
            if not c.set:
                out.append(Explanation(c, GUEST, "the guest acknowledges the upcall"))
                continue
            sel = _vcpu_int(cur, c.vcpu, "evtchn_pending_sel")
            live = pend_unmasked & routing.ports_of(c.vcpu) & geometry.expand_sel(sel)
            op = "vcpu_mark_events_pending, or a PV guest's re-raise"
            if live or (sel and not quiet) or sel_raised.get(c.vcpu):
                out.append(Explanation(c, EITHER, op))
            elif quiet:
                out.append(Explanation(c, XEN, op, False, "nothing is pending for this vCPU "
                                       "(no selector bit with a pending unmasked port)"))
            else:
                out.append(Explanation(c, EITHER, op, True, "nothing pending: a spurious upcall "
                                       "(a race with the bottom half)"))
        else:  # evtchn_upcall_mask
            out.append(Explanation(c, GUEST, "the PV guest's local_irq_disable/enable"))
    return out


def may_break_abi_quietly(prev: Evtchn2L, cur: Evtchn2L) -> bool:
    """Whether :func:`explain` with ``quiet=True`` could call a change of
    ``evtchn_pending``, ``evtchn_pending_sel`` or ``evtchn_upcall_pending`` illegal: the
    same conditions on whole bitmaps, so that the replay runs the per-bit explanation only
    on the rare steps that need it.  Never False where such a change is illegal."""
    g, r = cur.geometry, cur.routing
    unmasked = cur.unmasked()
    pend_unmasked = cur.evtchn_pending & unmasked
    selected = 0  # ports whose notify vCPU has their selector word set
    for v, bits in cur.vcpu_info.items():
        selected |= r.ports_of(v) & g.expand_sel(bits.evtchn_pending_sel)
    if cur.evtchn_pending & ~prev.evtchn_pending & unmasked & ~selected:
        return True  # evtchn_2l_set_pending of an unmasked port sets its selector bit
    for v, bits in cur.vcpu_info.items():
        before = prev.vcpu_info.get(v)
        if before is None:
            continue
        sel_raised = bits.evtchn_pending_sel & ~before.evtchn_pending_sel
        mine = r.ports_of(v) & pend_unmasked
        if sel_raised:
            if not bits.evtchn_upcall_pending:
                return True
            for w in iter_bits(sel_raised):
                if not mine & g.word_ports(w):
                    return True
        if (bits.evtchn_upcall_pending and bits.evtchn_upcall_pending
                != before.evtchn_upcall_pending and not sel_raised
                and not mine & g.expand_sel(bits.evtchn_pending_sel)):
            return True
    return False


def _explain_pending(c: BitChange, prev: Snapshot, cur: Snapshot, g: Geometry, r: Routing,
                     quiet: bool) -> Explanation:
    if not c.set:
        return Explanation(c, GUEST, "the bottom half clears the event (clear_pending)")
    port = c.index
    if cur.is_masked(port):
        return Explanation(c, XEN, "evtchn_2l_set_pending", True,
                           "masked: no selector bit, no upcall until EVTCHNOP_unmask")
    v = r.vcpu_of(port)
    if cur.selector_bit(port, v):
        if prev.selector_bit(port, v) and _vcpu_int(prev, v, "evtchn_upcall_pending"):
            return Explanation(c, XEN, "evtchn_2l_set_pending", True,
                               f"selector word {g.word(port)} and evtchn_upcall_pending of "
                               f"vCPU {v} were already set: no new upcall")
        return Explanation(c, XEN, "evtchn_2l_set_pending")
    if quiet:
        return Explanation(c, XEN, "evtchn_2l_set_pending", False,
                           f"unmasked, yet selector word {g.word(port)} of vCPU {v} is clear")
    return Explanation(c, XEN, "evtchn_2l_set_pending", True,
                       f"selector word {g.word(port)} of vCPU {v} is clear now "
                       "(the bottom half took it)")


def _explain_mask(c: BitChange, cur: Snapshot, g: Geometry, r: Routing) -> Explanation:
    if c.set:
        return Explanation(c, GUEST, "mask_evtchn")
    port = c.index
    v = r.vcpu_of(port)
    if not cur.is_pending(port):
        return Explanation(c, GUEST, "unmask_evtchn / EVTCHNOP_unmask")
    if cur.selector_bit(port, v) or _vcpu_int(cur, v, "evtchn_upcall_pending"):
        return Explanation(c, GUEST, "unmask_evtchn / EVTCHNOP_unmask", True,
                           "pending: re-raised through the selector")
    return Explanation(c, GUEST, "a direct clear of the mask bit", False,
                       f"pending, yet no selector bit / upcall raised on vCPU {v} "
                       "(EVTCHNOP_unmask would have re-raised it): the port is stranded")
