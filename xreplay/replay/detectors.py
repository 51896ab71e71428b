"""The rules: what loses an event on the 2-level ABI, one detector per kind of loss.

:class:`~xreplay.replay.replayer.Replayer` feeds each probe hit to the detectors as a
:class:`~xreplay.replay.walk.Step` (the model's state there and at the hit before); they
ask the model (:class:`~xreplay.replay.model.Evtchn2L`) the 2-level questions
(``deliverable``, ``stranded``, ``selector_bit``) and keep O(ports) state, whatever the
length of the recording.  Each reports :class:`~xreplay.replay.walk.Finding`\\ s under
stable kind names:

``missed-clear`` (error)
    A vCPU blocked for good with ``evtchn_upcall_pending=1`` and ports ``[1/0/1]``: an
    upcall was taken (the top half EOI'd it) but no bottom half ran before it blocked, so
    Xen, which notifies only on the 0->1 edge, never interrupts it again.
``stranded-port`` (error)
    Pending and unmasked, but no selector bit and no upcall pending on its vCPU, seen when
    the vCPU blocks: nothing will ever deliver it (typically an unmask without re-raise).
``lost-pending`` (error)
    The guest cleared a pending bit without dispatching the port (its shadow of pending
    ports was not marked), or, with no shadow recorded, cleared and masked it and never
    unmasked it again.
``upcall-masked-at-block`` (error)
    ``evtchn_upcall_mask`` still set when the vCPU entered its block function.
``abi-violation`` (warning)
    While every vCPU sat in its block function (only Xen could write), a bit changed in a
    way Xen's ``event_2l.c`` never does (a selector bit for a masked port, an upcall with
    nothing pending, a selector bit without the upcall).
``blocked-at-end``, ``masked-pending``, ``spurious-upcall`` (info)
    The recording ends with a vCPU in the missed-clear state but no proof it stayed
    blocked; ports left pending but masked; upcalls that found nothing pending.
"""

from __future__ import annotations

from dataclasses import dataclass

from xreplay.abi import iter_bits
from xreplay.errors import XReplayError
from xreplay.replay.model import Evtchn2L, explain, may_break_abi_quietly
from xreplay.replay.walk import (
    HANG,
    ORDINARY_ENDS,
    SHADOW_NAMES,
    Detector,
    End,
    Finding,
    Step,
    Walk,
)

# --------------------------------------------------------------------------- missed clear


class MissedClear(Detector):
    """The thread's bug: upcall EOI'd, bottom half never ran, the vCPU blocked for good.

    A vCPU is *blocked* from a block-probe hit until its next bottom-half hit (an upcall
    hit in between is the interrupt arriving inside the block function).  The *hang
    signature* of vCPU v in a snapshot is ``evtchn_upcall_pending=1`` with at least one
    port of v pending, unmasked and with its selector bit set.  A block hit in that state
    is not a bug by itself: mirage-xen's fix re-checks upcall_pending with interrupts off
    and returns, and the bottom half runs next.  It is a missed clear when the vCPU is
    still blocked, with the signature, at (a) a hang snapshot, (b) a snapshot of another
    vCPU ``stall_ns`` after its own last hit, or (c) the end of a recording that the
    recorder stopped because of a hang.  Any other end of the recording is only
    ``blocked-at-end`` (info): the recording stopped before we could see it re-check.
    """

    kinds = ("missed-clear", "blocked-at-end")

    def __init__(self) -> None:
        self.reported: set[int] = set()

    def _blocked(self, w: Walk, vcpu: int) -> bool:
        tr = w.tracks.get(vcpu)
        if "block" not in w.has_role:  # no block probe: a hang is the only evidence
            return tr is not None
        return tr is not None and tr.blocked

    @staticmethod
    def _signature(state: Evtchn2L, vcpu: int) -> int:
        """The ``[1/0/1]`` ports of a vCPU that has ``evtchn_upcall_pending`` set."""
        if not state.upcall_pending(vcpu):
            return 0
        return state.deliverable(vcpu)

    def step(self, w: Walk, s: Step) -> None:
        if s.role == "bottom-half" and self.reported:
            self.reported.discard(s.vcpu)
        if len(w.tracks) == 1 and s.role != HANG and s.vcpu in w.tracks:
            return  # one vCPU, and it is the one running: nothing can stall behind it
        cur = s.cur
        assert cur is not None
        if s.role == HANG:
            for v in w.tracks:
                if v not in self.reported and self._blocked(w, v):
                    ports = self._signature(cur, v)
                    if ports:
                        self._report(w, s.index, cur, v, ports, "the hang snapshot")
            for v in list(cur.vcpu_info):
                if v not in self.reported:
                    self._hang_alone(w, s, cur, v)
            return
        for v, tr in w.tracks.items():
            if (v == s.vcpu or v in self.reported or not tr.blocked or tr.last_hit is None
                    or s.t_ns - tr.last_hit_t < w.options.stall_ns):
                continue
            ports = self._signature(cur, v)
            if ports:
                secs = (s.t_ns - tr.last_hit_t) / 1e9
                self._report(w, s.index, cur, v, ports, f"#{s.index}, {secs:.3f} s after its "
                             f"last probe hit while vCPU {s.vcpu} kept running")

    def finish(self, w: Walk, end: End) -> None:
        last, state = end.last, end.state
        if last is None or end.hang:
            return
        for v in w.tracks:
            if v in self.reported or not self._blocked(w, v) or w.tracks[v].last_hit is None:
                continue
            ports = self._signature(state, v)
            if not ports:
                continue
            tr = w.tracks[v]
            if end.reason == "hang":
                self._report(w, last, state, v, ports, "the end of the recording (stopped by "
                             "the recorder's hang detection)")
            elif tr.last_hit != last or end.reason not in ORDINARY_ENDS:
                # A vCPU whose own hit ends a recording stopped by --count/--duration/exit is
                # just on its usual wake-up path; anything else is worth a note.
                why = end.reason or ("no reason recorded" if end.trailer is not None
                                     else "not closed cleanly")
                w.add(Finding(
                    "blocked-at-end", last, tr.first_upcall_since_bh, tr.last_block, v,
                    list(iter_bits(ports)), ["evtchn_upcall_pending", "evtchn_pending_sel"],
                    f"the recording ends (#{last}, {why}) "
                    f"with vCPU {v} in its block function, evtchn_upcall_pending=1 and ports "
                    f"{w.ports_text(iter_bits(ports), state)}: a missed clear if it stayed "
                    "there, but the recording stopped before showing whether it re-checked "
                    "upcall_pending; re-record with --hang-after to take a hang snapshot",
                    "info"))

    def _hang_alone(self, w: Walk, s: Step, cur: Evtchn2L, vcpu: int) -> None:
        """The hang snapshot judged on its own (attached after the guest hung, or no probe
        saw the vCPU block): the signature there means Xen already raised the upcall and
        will not raise it again, whatever came before."""
        ports = self._signature(cur, vcpu)
        state = cur.vcpu_info[vcpu]
        if not ports or state.evtchn_upcall_mask:
            return
        if vcpu == s.vcpu and s.interrupts_enabled is False:
            return  # interrupts off: the upcall may still be waiting in the LAPIC
        self.reported.add(vcpu)
        tr = w.tracks.get(vcpu)
        seen = ("it never hit a probe in this recording" if tr is None or tr.last_hit is None
                else f"its last probe hit was #{tr.last_hit}")
        text = (f"At the hang snapshot (#{s.index}, taken when no probe had been hit for "
                f"a while) vCPU {vcpu} has evtchn_upcall_pending=1, evtchn_upcall_mask=0, "
                f"evtchn_pending_sel={state.evtchn_pending_sel:#x} and port(s) "
                f"{w.ports_text(iter_bits(ports), cur)} pending and unmasked with their "
                f"selector bit set ({seen}). Xen notifies only on the 0->1 edge of "
                "evtchn_upcall_pending, so this upcall was raised already and no other will "
                f"come until the guest clears it: vCPU {vcpu} waits for ever. The missed "
                "clear is the bottom half that never ran after the last upcall; record "
                "from earlier (or with --upcall/--bottom-half/--block probes) to see which.")
        w.add(Finding("missed-clear", s.index, None, None, vcpu, list(iter_bits(ports)),
                      ["evtchn_upcall_pending", "evtchn_pending_sel"], text, "error"))

    def _report(self, w: Walk, index: int, state: Evtchn2L, vcpu: int, ports: int,
                proof: str) -> None:
        self.reported.add(vcpu)
        tr = w.tracks[vcpu]
        up, blk, bh = tr.first_upcall_since_bh, tr.last_block, tr.last_bottom_half
        sel = state.vcpu_info[vcpu].evtchn_pending_sel
        if_text = "" if tr.block_if is None else f" (IF={int(tr.block_if)})"
        more = f" (and {tr.upcalls_since_bh - 1} more)" if tr.upcalls_since_bh > 1 else ""
        if up is not None and blk is not None and blk < up:
            story = (f"vCPU {vcpu} entered its block function at #{blk}{if_text} and took an "
                     f"upcall at #{up}{more} before halting: the top half acknowledged (EOI'd) "
                     "it and the vCPU halted anyway.")
        elif up is not None and blk is not None:
            story = (f"vCPU {vcpu} took an upcall at #{up}{more}, then entered its block "
                     f"function at #{blk}{if_text} with evtchn_upcall_pending=1 and halted "
                     "without re-checking it.")
        elif up is not None:
            story = f"vCPU {vcpu} took an upcall at #{up}{more} and stopped making progress."
        elif "upcall" in w.has_role:
            story = (f"vCPU {vcpu} hit no upcall probe since its last bottom half (the upcall "
                     "was taken somewhere the recording does not probe, or never)"
                     + (f" and entered its block function at #{blk}{if_text}." if blk is not None
                        else "."))
        else:
            story = f"vCPU {vcpu} has evtchn_upcall_pending=1 (the recording has no upcall probe)."
        story += (f" No bottom half ran after #{bh}." if bh is not None else
                  " No bottom half ever ran.")
        text = (f"{story} At {proof} (#{index}) evtchn_upcall_pending=1 and "
                f"evtchn_pending_sel={sel:#x} are still set and port(s) "
                f"{w.ports_text(iter_bits(ports), state)} wait: Xen notifies only on the 0->1 "
                f"edge of evtchn_upcall_pending, so it will never interrupt vCPU {vcpu} again. "
                "Demux in the upcall handler, or re-check evtchn_upcall_pending with "
                "interrupts disabled before 'sti; hlt'.")
        w.add(Finding("missed-clear", index, up, blk, vcpu, list(iter_bits(ports)),
                      ["evtchn_upcall_pending", "evtchn_pending_sel"], text, "error"))


# --------------------------------------------------------------------------- stranded port


@dataclass(slots=True)
class _Strand:
    since: int
    cause: str
    field: str | None
    finding: Finding | None = None


class StrandedPort(Detector):
    """Pending, unmasked, no selector bit, no upcall pending on its vCPU.

    The state is tracked from the snapshot where a port enters it (with the transition
    that put it there) and reported when it is seen at a block hit of the port's vCPU or
    at a hang snapshot: a bottom half in the middle of its loop can show it for an
    instant, a vCPU going to sleep cannot.  The finding's message says whether a later
    raise of another port of the same selector word rescued it, or it stayed stranded.
    """

    kinds = ("stranded-port",)
    unchanged_roles = ("block", HANG)  # unchanged elsewhere: the same ports, nothing to do

    def __init__(self) -> None:
        self.current = 0
        self.runs: dict[int, _Strand] = {}

    def step(self, w: Walk, s: Step) -> None:
        cur = s.cur
        assert cur is not None
        old = self.current
        new = cur.stranded() if s.changed else old
        if new == old and s.role not in ("block", HANG):
            return
        for p in iter_bits(old & ~new):
            run = self.runs.pop(p)
            if run.finding is not None:
                run.finding.message += f" It left that state at #{s.index}: {_fate(cur, p)}."
        for p in iter_bits(new & ~old):
            cause, fld = self._cause(w, s.prev, cur, p)
            self.runs[p] = _Strand(s.index, cause, fld)
        self.current = new
        if s.role == HANG:
            scope = new
        elif s.role == "block":
            scope = new & w.routing.ports_of(s.vcpu)
        else:
            return
        for p in iter_bits(scope):
            run = self.runs[p]
            if run.finding is None:
                run.finding = self._report(w, s.index, cur, p, run, s.role)

    def finish(self, w: Walk, end: End) -> None:
        for run in self.runs.values():
            if run.finding is not None and end.last is not None:
                run.finding.message += f" Still stranded at the end (#{end.last})."

    @staticmethod
    def _cause(w: Walk, prev: Evtchn2L | None, cur: Evtchn2L, p: int
               ) -> tuple[str, str | None]:
        if prev is None:
            return "already so in the first snapshot", None
        g, v = w.geometry, w.routing.vcpu_of(p)
        word = g.word(p)
        if prev.is_masked(p):
            return (f"evtchn_mask port {p} 1->0 by the guest while pending, no selector bit / "
                    f"upcall raised (EVTCHNOP_unmask would have re-raised it)", "evtchn_mask")
        psel, csel = prev.selector_bit(p, v), cur.selector_bit(p, v)
        if psel and not csel and prev.is_pending(p):
            # Between two probe hits both stories leave the same bits: mask and pending
            # went 0->1->0 and 1->0->1 unseen in the first.
            return (f"evtchn_pending_sel word {word} of vCPU {v} 1->0 (the bottom half took "
                    f"the word), yet port {p} is still pending and unmasked: either the "
                    "bottom half took it (mask, clear), Xen raised it again while masked and "
                    "the guest then cleared the mask bit without re-raising it "
                    "(EVTCHNOP_unmask would have set the selector bit and the upcall), or the "
                    "bottom half skipped the port", "evtchn_pending_sel")
        if not prev.is_pending(p):
            return (f"evtchn_pending port {p} 0->1 without selector word {word} of vCPU {v} "
                    "(evtchn_2l_set_pending sets it for an unmasked port)", "evtchn_pending")
        if prev.upcall_pending(v) and not cur.upcall_pending(v):
            return (f"evtchn_upcall_pending 1->0 on vCPU {v} while port {p} was pending, "
                    "unmasked and without a selector bit", "evtchn_upcall_pending")
        return "its bits did not change between the two probe hits", None

    @staticmethod
    def _report(w: Walk, index: int, cur: Evtchn2L, p: int, run: _Strand, role: str
                ) -> Finding | None:
        v = w.routing.vcpu_of(p)
        where = ("at the hang snapshot" if role == HANG else
                 f"when vCPU {v} entered its block function")
        text = (f"port {w.port_name(p)} became stranded at #{run.since}: {run.cause}. It is "
                f"pending and unmasked, but selector word {w.geometry.word(p)} of vCPU {v} is "
                "clear and no upcall is pending, so no bottom half will look at it and Xen "
                f"will not raise it again (already pending); still {cur.pms(p)} "
                f"{where} (#{index}).")
        fields = {"evtchn_pending_sel": ["evtchn_pending_sel", "evtchn_mask"]}.get(
            run.field or "", [run.field] if run.field else None)
        return w.add(Finding("stranded-port", run.since, None, index, v, [p], fields,
                             text, "error"))


def _fate(cur: Evtchn2L, p: int) -> str:
    if not cur.is_pending(p):
        return "its pending bit was cleared"
    if cur.is_masked(p):
        return "it was masked"
    if cur.selector_bit(p):
        return ("its selector word was set again (another port of the same word was raised, "
                "which rescued it by luck)")
    return "an upcall became pending"


# --------------------------------------------------------------------------- lost pending


@dataclass(slots=True)
class _Taken:
    snapshot: int
    prev: int
    block: int | None = None


class LostPending(Detector):
    """A pending bit cleared without the port being dispatched.

    With a shadow region (the guest's own "marked pending" bytes, e.g. mirage-xen's
    ``evtchn_callback_ml``): a port whose pending bit went 1->0 and which is masked
    afterwards, with its shadow byte still 0, was taken by the bottom half (masked,
    cleared) but never marked, so no handler will see it or unmask it.  Without a shadow:
    a port whose pending bit was cleared and mask set in the same interval (the
    take-and-mask bottom half) that is still masked at the end of the recording although
    its vCPU blocked at least once since (so its handlers had their chance).
    """

    kinds = ("lost-pending",)
    unchanged_roles = ("block", HANG)  # unchanged elsewhere: nothing cleared or unmasked

    def __init__(self, w: Walk) -> None:
        self.shadow = _find_shadow(w) if w.options.use_shadow else None
        self.taken: dict[int, _Taken] = {}
        self.taken_bits = 0

    def step(self, w: Walk, s: Step) -> None:
        prev, cur = s.prev, s.cur
        assert cur is not None
        if prev is not None and s.changed and prev.evtchn_pending != cur.evtchn_pending:
            cleared = prev.evtchn_pending & ~cur.evtchn_pending & w.geometry.all_ports
            if cleared:
                if self.shadow is not None:
                    self._check_shadow(w, s, prev, cur, cleared)
                else:
                    for p in iter_bits(cleared & cur.evtchn_mask & ~prev.evtchn_mask):
                        self.taken[p] = _Taken(s.index, s.prev_index)
                        self.taken_bits |= 1 << p
        if self.taken_bits:
            for p in iter_bits(self.taken_bits & cur.unmasked()):
                del self.taken[p]
                self.taken_bits &= ~(1 << p)
            if s.role in ("block", HANG):
                scope = w.geometry.all_ports if s.role == HANG else w.routing.ports_of(s.vcpu)
                for p in iter_bits(self.taken_bits & scope):
                    t = self.taken[p]
                    if t.block is None:
                        t.block = s.index

    def _check_shadow(self, w: Walk, s: Step, prev: Evtchn2L, cur: Evtchn2L,
                      cleared: int) -> None:
        assert self.shadow is not None
        new, old = s.shadow, s.prev_shadow
        if new is None:
            return
        for p in iter_bits(cleared & cur.evtchn_mask):
            if p >= len(new) or new[p]:
                continue
            hint = ""
            marked = [q for q in _newly_marked(old, new) if not prev.is_pending(q)]
            if p + 1 in marked:
                hint = (f" {self.shadow}[{p + 1}] was marked instead although port {p + 1} "
                        "was not pending: an off-by-one port number (a 1-based ffs() used as "
                        "a bit index?).")
            elif marked:
                hint = (f" Marked instead although not pending: "
                        f"{w.ports_text(marked, limit=8)}.")
            text = (f"port {w.port_name(p)}: evtchn_pending 1->0 and masked between "
                    f"#{s.prev_index} ({s.prev_probe}) and #{s.index} ({s.probe}), but "
                    f"{self.shadow}[{p}] is 0: the bottom half took the event without marking "
                    "it, so no handler runs for it and nothing unmasks the port; the event is "
                    f"lost.{hint}")
            w.add(Finding("lost-pending", s.index, None, None, w.routing.vcpu_of(p), [p],
                          ["evtchn_pending", "evtchn_mask", self.shadow], text, "error"))

    def finish(self, w: Walk, end: End) -> None:
        if end.last is None:
            return
        for p, t in sorted(self.taken.items(), key=lambda kv: kv[1].snapshot):
            if t.block is None:
                continue
            text = (f"port {w.port_name(p)}: the guest cleared its pending bit and masked it "
                    f"between #{t.prev} and #{t.snapshot}, as a bottom half does when it takes "
                    f"an event, but nothing unmasked it again: still masked when vCPU "
                    f"{w.routing.vcpu_of(p)} blocked at #{t.block} and at the end "
                    f"(#{end.last}). The event was never handled (a bottom half that "
                    "marks the wrong port, e.g. a 1-based ffs() used as a bit index, does "
                    "this); record the guest's shadow of pending ports as a watch region "
                    "named evtchn_callback_ml to confirm.")
            w.add(Finding("lost-pending", t.snapshot, None, t.block, w.routing.vcpu_of(p), [p],
                          ["evtchn_pending", "evtchn_mask"], text, "error"))


def _find_shadow(w: Walk) -> str | None:
    watches = [r for r in w.header.regions if r.kind == "watch"]
    want = w.options.shadow
    if want is not None:
        if not any(r.name == want for r in watches):
            names = ", ".join(r.name for r in watches) or "none"
            raise XReplayError(f"no watch region named {want!r} in the recording "
                               f"(watch regions: {names})")
        return want
    for key in SHADOW_NAMES:
        for r in watches:
            if key in r.name.lower():
                return r.name
    return None


def _newly_marked(old: bytes | None, new: bytes) -> list[int]:
    if old is None or old == new:
        return []
    return [i for i, (a, b) in enumerate(zip(old, new, strict=False)) if b and not a]


# --------------------------------------------------------------------------- upcall mask


class UpcallMaskedAtBlock(Detector):
    """``evtchn_upcall_mask`` set at a block-probe hit; one finding per run of such hits."""

    kinds = ("upcall-masked-at-block",)
    roles = ("block",)

    def __init__(self) -> None:
        self.open: dict[int, tuple[Finding, int]] = {}

    def step(self, w: Walk, s: Step) -> None:
        if s.role != "block":
            return
        if w.header.delivery.get("block") == "schedop_block":
            # PV Linux enters xen_safe_halt masked on purpose: SCHEDOP_block clears
            # evtchn_upcall_mask as it blocks (Xen's do_block, local_event_delivery_enable).
            return
        cur, v = s.cur, s.vcpu
        assert cur is not None
        st = cur.vcpu_info.get(v)
        if st is None or st.evtchn_upcall_mask is None:
            return
        if not st.evtchn_upcall_mask:
            self._close(v)
            return
        if v in self.open:
            f, n = self.open[v]
            self.open[v] = (f, n + 1)
            return
        ports = (cur.evtchn_pending & cur.unmasked() & w.routing.ports_of(v)
                 & w.geometry.all_ports)
        waiting = (f"; pending for it: {w.ports_text(iter_bits(ports), cur)}" if ports
                   else "")
        text = (f"vCPU {v} entered its block function at #{s.index} with "
                f"evtchn_upcall_mask={st.evtchn_upcall_mask}: while the mask is set Xen does "
                "not deliver the upcall to a PV vCPU, and a guest that blocks with it set "
                "sleeps through its events (an HVM/PVH vector ignores the byte, but guest code "
                f"that tests it does not){waiting}.")
        f = w.add(Finding("upcall-masked-at-block", s.index, None, s.index, v,
                          list(iter_bits(ports)) or None, ["evtchn_upcall_mask"], text,
                          "error"))
        if f is not None:
            self.open[v] = (f, 0)

    def _close(self, v: int) -> None:
        f, n = self.open.pop(v, (None, 0))
        if f is not None and n:
            f.message += f" The next {n} block entries had it set too."

    def finish(self, w: Walk, end: End) -> None:
        for v in list(self.open):
            self._close(v)


# --------------------------------------------------------------------------- ABI checks


class AbiViolation(Detector):
    """Changes in a quiet interval that Xen's ``event_2l.c`` cannot make (see
    :func:`xreplay.replay.model.explain`)."""

    kinds = ("abi-violation",)
    unchanged_roles = ()  # judges changes only
    FIELDS = ("evtchn_pending", "evtchn_pending_sel", "evtchn_upcall_pending")

    def step(self, w: Walk, s: Step) -> None:
        if not s.quiet or s.prev is None or not s.changed:
            return
        prev, cur = s.prev, s.cur
        assert cur is not None
        if not may_break_abi_quietly(prev, cur):
            return
        bad = [e for e in explain(prev, cur, w.geometry, w.routing, quiet=True)
               if not e.legal and e.change.field in self.FIELDS]
        if not bad:
            return
        ports = sorted({e.change.index for e in bad if e.change.field == "evtchn_pending"})
        vcpus = sorted({e.change.vcpu for e in bad if e.change.vcpu is not None})
        text = (f"between #{s.prev_index} and #{s.index} ({s.probe}), while every vCPU sat in "
                "its block function so that only Xen could write: "
                + "; ".join(e.describe(w.labels) for e in bad))
        w.add(Finding("abi-violation", s.index, None, s.prev_index,
                      vcpus[0] if len(vcpus) == 1 else None, ports or None,
                      sorted({e.change.field for e in bad}), text, "warning"))


# --------------------------------------------------------------------------- informational


class SpuriousUpcall(Detector):
    """Upcalls that found nothing pending and unmasked for their vCPU (counted)."""

    kinds = ("spurious-upcall",)
    roles = ("upcall",)

    def __init__(self) -> None:
        self.count = 0
        self.first: tuple[int, int, int] | None = None  # index, t_ns, vCPU

    def step(self, w: Walk, s: Step) -> None:
        if s.role != "upcall":
            return
        cur = s.cur
        assert cur is not None
        if cur.evtchn_pending & cur.unmasked() & w.routing.ports_of(s.vcpu):
            return
        self.count += 1
        if self.first is None:
            self.first = (s.index, s.t_ns, s.vcpu)

    def finish(self, w: Walk, end: End) -> None:
        if self.first is None:
            return
        index, t_ns, vcpu = self.first
        w.add(Finding("spurious-upcall", index, index, None, vcpu, None,
                      ["evtchn_upcall_pending"],
                      f"{self.count} upcall(s) found nothing pending and unmasked (first at "
                      f"{w.when(index, t_ns)} on vCPU {vcpu}): harmless, usually Xen's set_pending "
                      "racing with a bottom half that already took the event", "info"))


class MaskedPending(Detector):
    """Ports pending but masked in the last snapshot (the 'e' key's ``[1/1/x]``)."""

    kinds = ("masked-pending",)
    roles = ()

    def finish(self, w: Walk, end: End) -> None:
        last, state = end.last, end.state
        if last is None:
            return
        ports = list(iter_bits(state.evtchn_pending & state.evtchn_mask & w.geometry.all_ports))
        if not ports:
            return
        w.add(Finding("masked-pending", last, None, None, None, ports, ["evtchn_mask"],
                      f"at the end (#{last}) port(s) {w.ports_text(ports, state)} are "
                      "pending but masked: Xen delivers them only when the guest unmasks them "
                      "with EVTCHNOP_unmask (fine for a port the guest ignores on purpose, a "
                      "hang if it waits for it)", "info"))


# --------------------------------------------------------------------------- the replay


def default_detectors(w: Walk) -> list[Detector]:
    return [MissedClear(), StrandedPort(), LostPending(w), UpcallMaskedAtBlock(),
            AbiViolation(), SpuriousUpcall(), MaskedPending()]
