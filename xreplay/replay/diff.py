"""Compare two recordings by their event-handling pattern, or two snapshots of one.

Two runs of a guest never hit their probes at the same instants, so a snapshot-by-snapshot
alignment says little.  What should match is the *pattern*, summarised per recording while
streaming it once (bounded memory: a few counters per pair of probe roles):

* every upcall is followed, on its vCPU, by a bottom half (or by a block, a hang, the end:
  its *follow-up*);
* the *steps*: which probe role follows which on the same vCPU (``block -> upcall``,
  ``upcall -> bottom-half`` ...; a hang snapshot follows every vCPU's last hit);
* *episodes*: the roles from one bottom half to the next, for the summary.

B *diverges* from A where B has a follow-up or a step that A never has; the first such
(by snapshot number) is the divergence.  The port states are then compared at aligned
points: the step where both recordings were in the same place (A's first occurrence of the
same role), the step where B went elsewhere, and the two ends.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from xreplay import debugkeys
from xreplay.abi import fifo as fifo_abi
from xreplay.abi import iter_bits
from xreplay.debugkeys import DomainEvtchnDump
from xreplay.errors import UsageError, XReplayError
from xreplay.replay.replayer import Replayer
from xreplay.replay.walk import HANG, ReplayOptions
from xreplay.snapshot import PortState, Snapshot
from xreplay.transitions import bit_changes, watch_changes
from xreplay.xrr import XrrReader

MAX_EPISODE = 12  # roles kept per episode; longer ones end in "..."
MAX_SHAPES = 512  # distinct episode shapes kept per recording
MAX_REST_HITS = 1 << 20  # FIFO rest hits remembered by ordinal (for the aligned point)
CONTEXT = 5  # roles of history kept with the first occurrence of each step
START = "start"  # first role of a prologue episode (before the vCPU's first bottom half)
END = "end"
FOLLOW_ROLES = ("bottom-half", "block", HANG, END)

Context = tuple[tuple[str, int], ...]  # (role, snapshot) leading up to a step


# --------------------------------------------------------------------------- pattern


@dataclass(slots=True)
class _Shape:
    count: int
    first: tuple[int | None, ...]  # snapshot of each role of the first such episode
    vcpu: int


@dataclass(frozen=True, slots=True)
class StepSeen:
    """The first time a recording did ``before -> after`` on one vCPU."""

    before: str
    after: str
    at: tuple[int, int]  # (snapshot of before, snapshot of after)
    vcpu: int
    context: Context

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "snapshots": list(self.at),
                "vcpu": self.vcpu, "context": [{"role": r, "snapshot": i}
                                               for r, i in self.context]}


class PatternSummary:
    """Streaming summary of one recording's steps, upcall follow-ups and episodes."""

    def __init__(self) -> None:
        self.steps: Counter[tuple[str, str]] = Counter()
        self.first_step: dict[tuple[str, str], StepSeen] = {}
        self.followups: Counter[str] = Counter()
        self.first_followup: dict[str, StepSeen] = {}
        self.shapes: dict[tuple[str, ...], _Shape] = {}
        self.dropped_shapes = 0
        self.upcalls = 0
        self._recent: dict[int, deque[tuple[str, int]]] = {}
        # vcpu -> (first upcall, upcalls, role before the first upcall)
        self._awaiting: dict[int, tuple[int, int, str]] = {}
        self.first_followup_after: dict[tuple[str, str], StepSeen] = {}
        self._open: dict[int, tuple[list[str], list[int | None]]] = {}

    def feed(self, index: int, v: int, role: str) -> None:
        """Snapshot ``index``, a hit of vCPU ``v`` in ``role``."""
        if role == HANG:
            for u in list(self._recent):
                self._step(u, role, index)
            for u in list(self._awaiting):
                self._follow(u, role, index)
            for u in list(self._open):
                self._close(u, role, index)
            return
        self._step(v, role, index)
        if role == "upcall":
            self.upcalls += 1
            recent = self._recent[v]
            before = recent[-2][0] if len(recent) > 1 else START
            first, n, before = self._awaiting.get(v, (index, 0, before))
            self._awaiting[v] = (first, n + 1, before)
        elif role in FOLLOW_ROLES:
            self._follow(v, role, index)
        self._episode(v, role, index)

    def finish(self, last: int | None) -> None:
        for v in list(self._awaiting):
            self._follow(v, END, None)
        for v in list(self._open):
            self._close(v, END, None)

    def _context(self, v: int) -> Context:
        return tuple(self._recent.get(v, ()))

    def _step(self, v: int, role: str, index: int) -> None:
        recent = self._recent.setdefault(v, deque(maxlen=CONTEXT))
        if recent:
            before, at = recent[-1]
            key = (before, role)
            self.steps[key] += 1
            if key not in self.first_step:
                self.first_step[key] = StepSeen(before, role, (at, index), v,
                                                (*recent, (role, index)))
        recent.append((role, index))

    def _follow(self, v: int, role: str, index: int | None) -> None:
        got = self._awaiting.pop(v, None)
        if got is None:
            return
        first, n, before = got
        self.followups[role] += n
        if (before, role) not in self.first_followup_after:
            # the history ends with the follow-up itself
            seen = StepSeen("upcall", role, (first, index or first), v, self._context(v))
            self.first_followup_after[(before, role)] = seen
            self.first_followup.setdefault(role, seen)

    def _episode(self, v: int, role: str, index: int) -> None:
        if role == "bottom-half":
            if v in self._open:
                self._close(v, role, index)
            self._open[v] = ([role], [index])
            return
        roles, idx = self._open.setdefault(v, ([START], [None]))
        if len(roles) < MAX_EPISODE:
            roles.append(role)
            idx.append(index)
        elif roles[-1] != "...":
            roles.append("...")
            idx.append(None)

    def _close(self, v: int, role: str, index: int | None) -> None:
        roles, idx = self._open.pop(v)
        shape = (*roles, role)
        st = self.shapes.get(shape)
        if st is not None:
            st.count += 1
        elif len(self.shapes) < MAX_SHAPES:
            self.shapes[shape] = _Shape(1, (*idx, index), v)
        else:
            self.dropped_shapes += 1

    def next_roles(self, before: str) -> Counter[str]:
        return Counter({after: n for (b, after), n in self.steps.items() if b == before})

    def top(self, n: int = 10) -> list[dict[str, Any]]:
        rows = sorted(self.shapes.items(), key=lambda kv: (-kv[1].count, kv[1].first[0] or 0))
        return [{"shape": [r for r in k if r != START], "count": s.count,
                 "first": next((i for i in s.first if i is not None), None), "vcpu": s.vcpu}
                for k, s in rows[:n]]

    def to_json(self) -> dict[str, Any]:
        return {"upcalls": self.upcalls, "followups": dict(self.followups),
                "steps": [{"before": b, "after": a, "count": n,
                           "first": list(self.first_step[(b, a)].at)}
                          for (b, a), n in self.steps.most_common()],
                "episodes": self.top(), "distinct_episodes": len(self.shapes),
                "dropped_episodes": self.dropped_shapes}


# --------------------------------------------------------------------------- FIFO at rest

RestFact = tuple[Any, ...]  # ("port", p, state) | ("queue", v, q, state) | ("vcpu", v, state)


def rest_facts(snap: Snapshot) -> set[RestFact]:
    """What a FIFO guest holds at a block or hang hit, where it consumes nothing: each
    PENDING port's place (masked, on a ready queue, queued behind a clear ready bit, LINKED
    on no queue, not LINKED), each queue whose ``ready`` and ``head`` disagree, and a vCPU
    blocking with its upcall pending and queues ready."""
    fs = snap.fifo
    if fs is None:
        return set()
    ready = fs.queues(ready_only=True)
    every = fs.queues()
    out: set[RestFact] = set()
    for p in iter_bits(snap.evtchn_pending):
        if p == 0 or p >= fs.nr_ports:
            continue
        w = fifo_abi.EventWord(fs.words[p])
        state = ("PENDING and MASKED" if w.masked else
                 "PENDING on a ready queue" if p in ready else
                 "PENDING, queued behind a clear ready bit" if p in every else
                 "PENDING and LINKED on no queue a head leads to" if w.linked else
                 "PENDING, unmasked and not LINKED")
        out.add(("port", p, state))
    for v, cb in fs.control_blocks.items():
        for q, head in enumerate(cb.head):
            linked = 0 < head < fs.nr_ports and bool(
                fs.words[head] >> fifo_abi.EVTCHN_FIFO_LINKED & 1)
            if cb.is_ready(q) and not linked:
                out.add(("queue", v, q, "ready, head not LINKED"))
            elif linked and not cb.is_ready(q):
                out.add(("queue", v, q, "head LINKED, ready clear"))
        vi = snap.vcpus.get(v)
        if vi is not None and vi.evtchn_upcall_pending and cb.ready:
            out.add(("vcpu", v, "evtchn_upcall_pending=1 with ready queues"))
    return out


def fact_text(fact: RestFact, labels: dict[int, str]) -> str:
    if fact[0] == "port":
        label = labels.get(fact[1])
        return f"port {fact[1]}" + (f" ({label})" if label else "") + f" {fact[2]}"
    if fact[0] == "queue":
        return f"vCPU {fact[1]} queue {fact[2]}: {fact[3]}"
    return f"vCPU {fact[1]}: {fact[2]}"


class RestSummary:
    """Streaming: the first block/hang hit (and its ordinal among them) at which each
    :func:`rest_facts` fact is seen."""

    def __init__(self) -> None:
        self.first: dict[RestFact, tuple[int, int]] = {}
        self.hits: list[int] = []  # rest hits by ordinal, capped
        self.count = 0

    def feed(self, snap: Snapshot, role: str) -> None:
        if role not in ("block", HANG):
            return
        if len(self.hits) < MAX_REST_HITS:
            self.hits.append(snap.index)
        for fact in rest_facts(snap):
            self.first.setdefault(fact, (snap.index, self.count))
        self.count += 1


@dataclass
class RestDivergence:
    """FIFO: the first block or hang hit of ``side`` holding what the other recording never
    holds at one (``facts``), and the other's rest hit of the same ordinal."""

    side: str
    snapshot: int
    message: str
    facts: list[str]
    other_snapshot: int | None

    def to_json(self) -> dict[str, Any]:
        return {"side": self.side, "snapshot": self.snapshot, "message": self.message,
                "facts": self.facts, "other_snapshot": self.other_snapshot}


def rest_divergence(side: str, mine: RestSummary, other: RestSummary,
                    labels: dict[int, str]) -> RestDivergence | None:
    new = {f: at for f, at in mine.first.items() if f not in other.first}
    if not new or not other.count:
        return None
    index, ordinal = min(new.values())
    facts = sorted(fact_text(f, labels) for f, at in new.items() if at[0] == index)
    me, them = _names(side)
    theirs = other.hits[min(ordinal, len(other.hits) - 1)] if other.hits else None
    msg = (f"in {me}, at rest (block or hang) #{index}: " + "; ".join(facts)
           + f", which {them} never holds at any of its {other.count} block or hang hits")
    return RestDivergence(side, index, msg, facts, theirs)


# --------------------------------------------------------------------------- results


@dataclass
class Divergence:
    """Where recording ``side`` does something the other one never does.

    ``seen`` is that step (with the roles leading up to it); ``match`` the other
    recording's first step from the same role, the closest thing it did instead.
    """

    side: str  # "a" or "b"
    snapshot: int
    message: str
    seen: StepSeen
    match: StepSeen | None = None

    def to_json(self) -> dict[str, Any]:
        return {"side": self.side, "snapshot": self.snapshot, "message": self.message,
                "seen": self.seen.to_json(),
                "match": None if self.match is None else self.match.to_json()}


@dataclass
class StateDiff:
    """Port and vCPU differences between two snapshots (``a`` and ``b``)."""

    label: str
    a_snapshot: int | None
    b_snapshot: int | None
    a_probe: str | None = None
    b_probe: str | None = None
    ports: list[dict[str, Any]] = field(default_factory=list)
    vcpus: list[dict[str, Any]] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.ports and not self.vcpus

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "a_snapshot": self.a_snapshot,
                "b_snapshot": self.b_snapshot, "a_probe": self.a_probe,
                "b_probe": self.b_probe, "ports": self.ports, "vcpus": self.vcpus}


@dataclass
class DiffResult:
    a: str
    b: str
    divergences: list[Divergence]
    patterns: dict[str, PatternSummary]
    aligned: list[StateDiff]
    findings: dict[str, list[dict[str, Any]]]
    stats: dict[str, dict[str, Any]]
    rest: list[RestDivergence] = field(default_factory=list)  # FIFO: states at rest

    @property
    def divergence(self) -> Divergence | None:
        """B's first departure from A's pattern, else A's from B's."""
        return self.divergences[0] if self.divergences else None

    @property
    def incomplete(self) -> str | None:
        """Why "no divergence" would be no verdict (a side stops short, or could not be
        judged whole), as one line naming the side; None when both were judged whole."""
        why = [f"{k.upper()} ({self.stats[k]['file']}): {self.stats[k]['incomplete']}"
               for k in ("a", "b") if self.stats[k].get("incomplete")]
        return "; ".join(why) or None

    @property
    def diverged(self) -> bool:
        """The two recordings differ in pattern, or (FIFO) in what they hold at rest."""
        return bool(self.divergences or self.rest)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b,
                "divergence": None if self.divergence is None else self.divergence.to_json(),
                "divergences": [d.to_json() for d in self.divergences],
                "patterns": {k: p.to_json() for k, p in self.patterns.items()},
                "aligned": [s.to_json() for s in self.aligned],
                "findings": self.findings, "stats": self.stats,
                "rest": [r.to_json() for r in self.rest]}


@dataclass
class SnapshotDiff:
    """Two snapshots of one recording: the net bit changes and the state differences."""

    file: str
    state: StateDiff
    changes: list[dict[str, Any]]
    text: list[str]
    watch: dict[str, int]

    @property
    def identical(self) -> bool:
        return not self.changes and self.state.identical and not self.watch

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, **self.state.to_json(), "changes": self.changes,
                "text": self.text, "watch": self.watch}


# --------------------------------------------------------------------------- comparing


def compare_states(a: Snapshot, b: Snapshot, label: str,
                   labels: dict[int, str] | None = None) -> StateDiff:
    """Ports whose ``[p/m/s]`` differ, and vCPU fields that differ, from ``a`` to ``b``."""
    labels = labels if labels is not None else {**a.labels, **b.labels}
    ports = set(a.interesting_ports()) | set(b.interesting_ports())
    ports |= set(iter_bits(a.evtchn_pending)) | set(iter_bits(b.evtchn_pending))
    out = StateDiff(label, a.index, b.index, a.probe, b.probe)
    fa, fb = getattr(a, "fifo", None), getattr(b, "fifo", None)
    fifo = fa is not None and fb is not None
    table_a = {st.port: st for st in a.port_table(sorted(ports))} if fifo else {}
    table_b = {st.port: st for st in b.port_table(sorted(ports))} if fifo else {}
    for p in sorted(ports):
        if p >= min(a.nr_ports, b.nr_ports):
            continue
        pa, pb = (table_a[p], table_b[p]) if fifo else (a.port_state(p), b.port_state(p))
        fields = _fifo_fields(pa, pb) if fifo else []
        if pa.pms != pb.pms or fields:
            row: dict[str, Any] = {"port": p, "label": labels.get(p), "a": pa.pms, "b": pb.pms}
            if fifo:
                row.update(fields=fields, a_queue=pa.priority, b_queue=pb.priority)
            out.ports.append(row)
    names = ("evtchn_upcall_pending", "evtchn_upcall_mask") + (
        () if fifo else ("evtchn_pending_sel",))  # FIFO guests do not use the selector
    if fa is not None and fb is not None:
        for v in sorted(set(fa.control_blocks) | set(fb.control_blocks)):
            ca, cb = fa.control_blocks.get(v), fb.control_blocks.get(v)
            for q in range(16):
                x = None if ca is None else ca.head[q]
                y = None if cb is None else cb.head[q]
                if x != y:
                    out.vcpus.append({"vcpu": v, "field": f"control_block.head[{q}]",
                                      "a": x, "b": y})
            x, y = (None if ca is None else ca.ready), (None if cb is None else cb.ready)
            if x != y:
                out.vcpus.append({"vcpu": v, "field": "control_block.ready", "a": x, "b": y})
    for v in sorted(set(a.vcpus) | set(b.vcpus)):
        va, vb = a.vcpus.get(v), b.vcpus.get(v)
        for name in names:
            x = None if va is None else getattr(va, name)
            y = None if vb is None else getattr(vb, name)
            if x != y:
                out.vcpus.append({"vcpu": v, "field": name, "a": x, "b": y})
    return out


def _fifo_fields(a: PortState, b: PortState) -> list[str]:
    """The event-word fields (and the queue the event is reached from) that differ."""
    pairs = (("PENDING", a.pending, b.pending), ("MASKED", a.masked, b.masked),
             ("LINKED", a.linked, b.linked), ("BUSY", a.busy, b.busy),
             ("queue", a.priority, b.priority))
    out = [name for name, x, y in pairs if x != y]
    if a.linked and b.linked and a.link != b.link:  # LINK means something only when LINKED
        out.insert(4, "LINK")
    return out


def _names(side: str) -> tuple[str, str]:
    return (side.upper(), "A" if side == "b" else "B")


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{r} ({n}x)" for r, n in c.most_common()) or "nothing"


def _followup_divergence(side: str, mine: PatternSummary,
                         other: PatternSummary) -> Divergence | None:
    new = [mine.first_followup[r] for r in mine.followups
           if r != END and other.followups.get(r, 0) == 0]
    if not new:
        return None
    seen = min(new, key=lambda x: x.at[0])
    before = next((b for (b, r), st in mine.first_followup_after.items() if st is seen), START)
    me, them = _names(side)
    if other.followups and set(other.followups) <= {"bottom-half", END}:
        usual = f"in {them} every upcall ({other.upcalls}) is followed by a bottom-half"
    elif other.followups:
        usual = f"in {them} upcalls are followed by {_counts(other.followups)}"
    else:
        usual = f"{them} takes no upcall"
    match = None
    if other.followups:  # the other's usual follow-up, after the same role if it can
        usual_role = other.followups.most_common(1)[0][0]
        match = (other.first_followup_after.get((before, usual_role))
                 or other.first_followup.get(usual_role))
    msg = (f"in {me}, the upcall at #{seen.at[0]} (vCPU {seen.vcpu}) is followed by "
           f"{seen.after} #{seen.at[1]} with no bottom-half; {usual}")
    return Divergence(side, seen.at[0], msg, seen, match)


def _step_divergence(side: str, mine: PatternSummary,
                     other: PatternSummary) -> Divergence | None:
    new = [st for key, st in mine.first_step.items() if key not in other.steps]
    if not new:
        return None
    seen = min(new, key=lambda x: x.at[1])
    me, them = _names(side)
    nxt = other.next_roles(seen.before)
    match = None
    if nxt:
        match = other.first_step[(seen.before, nxt.most_common(1)[0][0])]
        usual = f"after a {seen.before} {them} goes on with {_counts(nxt)}"
    else:
        usual = f"{them} never goes on from a {seen.before}"
    msg = (f"in {me}, {seen.before} #{seen.at[0]} is followed on vCPU {seen.vcpu} by "
           f"{seen.after} #{seen.at[1]}, which never happens in {them} ({usual})")
    return Divergence(side, seen.at[1], msg, seen, match)


def divergence(side: str, mine: PatternSummary, other: PatternSummary) -> Divergence | None:
    """The first thing ``mine`` does that ``other`` never does (an upcall follow-up wins a
    tie: it says more)."""
    found = [d for d in (_followup_divergence(side, mine, other),
                         _step_divergence(side, mine, other)) if d is not None]
    return min(found, key=lambda d: d.snapshot) if found else None


def context_text(st: StepSeen) -> str:
    return " -> ".join(f"{r} #{i}" for r, i in st.context)


# --------------------------------------------------------------------------- public API


def _open(source: XrrReader | str | os.PathLike[str], stack: ExitStack) -> XrrReader:
    if isinstance(source, XrrReader):
        return source
    return stack.enter_context(XrrReader(source))


def _same_abi(ra: XrrReader, rb: XrrReader) -> None:
    """Refuse two recordings on different event-channel ABIs: a FIFO event word and a
    2-level pending/mask bit pair are not the same field, so a port-by-port comparison
    of them would be a confident answer about nothing."""
    if ra.header.abi != rb.header.abi:
        raise UsageError(
            f"{ra.name} is on the {ra.header.abi} event-channel ABI and {rb.name} on "
            f"{rb.header.abi}: diff compares runs of one guest on one ABI (record both the "
            "same way, e.g. both with or both without xen.fifo_events=0)")


def _pass(reader: XrrReader, options: ReplayOptions | None
          ) -> tuple[PatternSummary, Any, Any, RestSummary | None]:
    """One walk of a recording on the delta path: its pattern, its replay, its last hit
    (a FIFO recording walks its snapshots, judged on the FIFO rules, and summarises what
    it holds at rest)."""
    if reader.header.abi == "fifo":
        from xreplay.replay.fifo_detectors import FifoReplayer
        frep = FifoReplayer(reader.header, options)
        fpat = PatternSummary()
        rest = RestSummary()
        flast: int | None = None
        for snap in reader.snapshots():
            frep.feed(snap)
            role = frep.role_of(snap)
            fpat.feed(snap.index, snap.vcpu, role)
            if not snap.missing:  # a region not read says nothing about what is held
                rest.feed(snap, role)
            flast = snap.index
        fpat.finish(flast)
        return fpat, frep.finish(reader.trailer, reader.problems, reader.torn_at), flast, rest
    rep = Replayer(reader.header, options)
    pat = PatternSummary()
    rep.run(reader.raw_deltas(), reader, judge_unread=True, each=pat.feed)
    pat.finish(rep.last)
    return pat, rep.finish(reader.trailer, reader.problems, reader.torn_at), rep.last, None


def fetch(reader: XrrReader, wanted: Iterable[int]) -> dict[int, Snapshot]:
    """The snapshots numbered ``wanted``, in one pass from the nearest keyframe."""
    want = {i for i in wanted if i is not None and i >= 0}
    if not want:
        return {}
    out: dict[int, Snapshot] = {}
    top = max(want)
    for snap in reader.snapshots(min(want)):
        if snap.index in want:
            out[snap.index] = snap
        if snap.index >= top:
            break
    return out


def diff_recordings(a: XrrReader | str | os.PathLike[str], b: XrrReader | str | os.PathLike[str],
                    options: ReplayOptions | None = None) -> DiffResult:
    """Stream both recordings once (plus one short pass each to fetch aligned snapshots)."""
    with ExitStack() as stack:
        ra, rb = _open(a, stack), _open(b, stack)
        _same_abi(ra, rb)
        pa, fa, la, rest_a = _pass(ra, options)
        pb, fb, lb, rest_b = _pass(rb, options)
        pats = {"a": pa, "b": pb}
        divs = [d for d in (divergence("b", pb, pa), divergence("a", pa, pb)) if d is not None]
        labels = {**ra.header.labels, **rb.header.labels}
        rest: list[RestDivergence] = []
        if rest_a is not None and rest_b is not None:
            rest = [r for r in (rest_divergence("b", rest_b, rest_a, labels),
                                rest_divergence("a", rest_a, rest_b, labels)) if r is not None]
        # Aligned points: where both were at the same role, where B (or A) went elsewhere,
        # and the two ends.
        pairs: list[tuple[str, int, int]] = []
        d = divs[0] if divs else None
        if d is not None and d.match is not None:
            mine, theirs = d.seen.at, d.match.at
            for label, k in (("same step", 0), ("different step", 1)):
                x, y = (theirs[k], mine[k]) if d.side == "b" else (mine[k], theirs[k])
                pairs.append((f"{label} ({d.seen.before if k == 0 else 'next'})", x, y))
        for r in rest[:1]:  # where one first holds at rest what the other never does
            if r.other_snapshot is not None:
                x, y = ((r.other_snapshot, r.snapshot) if r.side == "b"
                        else (r.snapshot, r.other_snapshot))
                pairs.append(("at rest (the same block/hang ordinal)", x, y))
        if la is not None and lb is not None:
            pairs.append(("end", la, lb))
        snaps_a = fetch(ra, [p[1] for p in pairs])
        snaps_b = fetch(rb, [p[2] for p in pairs])
        aligned = []
        seen = set()
        for label, i, j in pairs:
            if (i, j) in seen or i not in snaps_a or j not in snaps_b:
                continue
            seen.add((i, j))
            aligned.append(compare_states(snaps_a[i], snaps_b[j], label, labels))
        findings = {k: [{"kind": f.kind, "snapshot": f.snapshot, "severity": f.severity,
                         "vcpu": f.vcpu, "ports": f.ports} for f in r.findings[:50]]
                    for k, r in (("a", fa), ("b", fb))}
        stats = {k: {"file": r.name, "arch": r.header.arch, "snapshots": res.stats["snapshots"],
                     "findings": res.stats["findings"], "incomplete": res.incomplete()}
                 for k, r, res in (("a", ra, fa), ("b", rb, fb))}
        return DiffResult(ra.name, rb.name, divs, pats, aligned, findings, stats, rest)


def diff_snapshots(source: XrrReader | str | os.PathLike[str], n: int, m: int,
                   other: XrrReader | str | os.PathLike[str] | None = None) -> SnapshotDiff:
    """Snapshot ``n`` against snapshot ``m`` of the same recording (or of ``other``)."""
    with ExitStack() as stack:
        ra = _open(source, stack)
        rb = ra if other is None else _open(other, stack)
        _same_abi(ra, rb)
        if rb is ra:
            got = fetch(ra, [n, m])
            a, b = got.get(n), got.get(m)
        else:
            a, b = fetch(ra, [n]).get(n), fetch(rb, [m]).get(m)
        for snap, i, r in ((a, n, ra), (b, m, rb)):
            if snap is None:
                raise XReplayError(f"{r.name}: no snapshot #{i} (the recording has fewer)")
        assert a is not None and b is not None
        labels = {**ra.header.labels, **rb.header.labels}
        ch = bit_changes(a, b)
        name = ra.name if rb is ra else f"{ra.name} vs {rb.name}"
        return SnapshotDiff(name, compare_states(a, b, f"#{n} vs #{m}", labels),
                            [c.to_json() for c in ch], [c.describe(labels) for c in ch],
                            watch_changes(a, b))


# --------------------------------------------------------------------------- 'e' key check


@dataclass
class DebugkeysCheck:
    """The guest's view (a snapshot) against Xen's ('e' key) for one domain, per port."""

    domain: int
    snapshot: int
    ports: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        return all(p["agree"] for p in self.ports)

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "snapshot": self.snapshot, "agree": self.agree,
                "ports": self.ports, "warnings": self.warnings}


def pick_domain(dumps: list[DomainEvtchnDump], domain: int | None,
                source: str = "the dump") -> DomainEvtchnDump:
    """The last section for ``domain``; without one, the only domain, or the only domU."""
    by_dom = debugkeys.latest(dumps)
    if domain is not None:
        if domain not in by_dom:
            raise XReplayError(f"{source} has no 'e' key section for domain {domain} "
                               f"(domains: {', '.join(map(str, by_dom))})")
        return by_dom[domain]
    if len(by_dom) == 1:
        return next(iter(by_dom.values()))
    guests = [d for d in by_dom if d != 0]
    if len(guests) == 1:
        return by_dom[guests[0]]
    raise XReplayError(f"{source} has 'e' key sections for domains "
                       f"{', '.join(map(str, by_dom))}: pick one with --domain")


def check_debugkeys(snap: Snapshot, dump: DomainEvtchnDump) -> DebugkeysCheck:
    """Compare every port Xen lists, and every port the guest sees pending."""
    ports = sorted({p.port for p in dump.ports} | set(iter_bits(snap.evtchn_pending)))
    ports = [p for p in ports if p < snap.nr_ports]
    ours = snap.port_table(ports)
    diffs = {d.port: d for d in debugkeys.compare(dump, ours)}
    rows = []
    for st in ours:
        x = dump.port(st.port)
        d = diffs.get(st.port)
        rows.append({"port": st.port, "label": st.label, "guest": st.pms,
                     "xen": None if x is None else x.pms, "agree": d is None,
                     "fields": [] if d is None else list(d.fields),
                     "only_in": None if d is None else d.only_in})
    return DebugkeysCheck(dump.domid, snap.index, rows, list(dump.warnings))
