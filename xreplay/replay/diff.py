"""Compare two recordings by their event-handling pattern, or two snapshots of one.

Two runs of a guest never hit their probes at the same instants, so a snapshot-by-snapshot
alignment says little.  What should match is the *pattern*: per vCPU, an *episode* is the
sequence of probe roles from one bottom-half hit up to and including the next one (or
``hang`` / ``end``), e.g. ``bottom-half block upcall bottom-half``; and every upcall is
followed, on its vCPU, by a bottom half (or a block, a hang, the end).  Both are
summarised while streaming each file once (bounded: distinct episode shapes are capped),
the first episode or upcall follow-up of one recording that never occurs in the other is
the divergence, and the port states are compared at aligned points: the last common step of
the divergent episode and its best match, the first differing step, and the two ends.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from xreplay import debugkeys
from xreplay.abi import iter_bits
from xreplay.debugkeys import DomainEvtchnDump
from xreplay.errors import XReplayError
from xreplay.replay.detectors import HANG, Replayer, ReplayOptions
from xreplay.snapshot import Snapshot
from xreplay.transitions import bit_changes, watch_changes
from xreplay.xrr import XrrReader

MAX_EPISODE = 12  # roles kept per episode; longer ones end in "..."
MAX_SHAPES = 512  # distinct episode shapes kept per recording
START = "start"  # first role of a prologue episode (before the vCPU's first bottom half)
END = "end"
FOLLOW_ROLES = ("bottom-half", "block", HANG, END)


# --------------------------------------------------------------------------- pattern


@dataclass(slots=True)
class _Shape:
    count: int
    first: tuple[int | None, ...]  # snapshot of each role of the first such episode
    vcpu: int


class PatternSummary:
    """Streaming summary of one recording's episodes and upcall follow-ups."""

    def __init__(self) -> None:
        self.shapes: dict[tuple[str, ...], _Shape] = {}
        self.dropped_shapes = 0
        self.open: dict[int, tuple[list[str], list[int | None]]] = {}
        self.followups: Counter[str] = Counter()
        self.first_followup: dict[str, tuple[int, int | None, int]] = {}
        self.awaiting: dict[int, tuple[int, int]] = {}  # vcpu -> (first upcall, count)
        self.upcalls = 0

    def feed(self, snap: Snapshot, role: str) -> None:
        if role == HANG:
            for v in list(self.open):
                self._close(v, HANG, snap.index)
            for v in list(self.awaiting):
                self._follow(v, HANG, snap.index)
            return
        v = snap.vcpu
        if role == "upcall":
            self.upcalls += 1
            first, n = self.awaiting.get(v, (snap.index, 0))
            self.awaiting[v] = (first, n + 1)
        elif role in FOLLOW_ROLES:
            self._follow(v, role, snap.index)
        if role == "bottom-half":
            if v in self.open:
                self._close(v, role, snap.index)
            self.open[v] = ([role], [snap.index])
            return
        roles, idx = self.open.setdefault(v, ([START], [None]))
        if len(roles) < MAX_EPISODE:
            roles.append(role)
            idx.append(snap.index)
        elif roles[-1] != "...":
            roles.append("...")
            idx.append(None)

    def finish(self, last: Snapshot | None) -> None:
        at = None if last is None else last.index
        for v in list(self.open):
            self._close(v, END, None)
        for v in list(self.awaiting):
            self._follow(v, END, at)

    def _follow(self, v: int, role: str, index: int | None) -> None:
        got = self.awaiting.pop(v, None)
        if got is None:
            return
        first, n = got
        self.followups[role] += n
        self.first_followup.setdefault(role, (first, index, v))

    def _close(self, v: int, role: str, index: int | None) -> None:
        roles, idx = self.open.pop(v)
        shape = (*roles, role)
        st = self.shapes.get(shape)
        if st is not None:
            st.count += 1
        elif len(self.shapes) < MAX_SHAPES:
            self.shapes[shape] = _Shape(1, (*idx, index), v)
        else:
            self.dropped_shapes += 1

    def top(self, n: int = 10) -> list[dict[str, Any]]:
        rows = sorted(self.shapes.items(), key=lambda kv: (-kv[1].count, kv[1].first[0] or 0))
        return [{"shape": list(k), "count": s.count, "first": _first_index(s.first),
                 "vcpu": s.vcpu} for k, s in rows[:n]]

    def to_json(self) -> dict[str, Any]:
        return {"upcalls": self.upcalls, "followups": dict(self.followups),
                "episodes": self.top(), "distinct_episodes": len(self.shapes),
                "dropped_episodes": self.dropped_shapes}


def _first_index(idx: tuple[int | None, ...]) -> int | None:
    return next((i for i in idx if i is not None), None)


# --------------------------------------------------------------------------- results


@dataclass
class Divergence:
    """Where recording ``side`` does something the other one never does."""

    side: str  # "a" or "b"
    snapshot: int | None
    message: str
    episode: list[dict[str, Any]] | None = None  # [{"role", "snapshot"}]
    match: list[dict[str, Any]] | None = None  # the other side's closest episode
    common: int = 0  # roles the two share from the start

    def to_json(self) -> dict[str, Any]:
        return {"side": self.side, "snapshot": self.snapshot, "message": self.message,
                "episode": self.episode, "match": self.match, "common": self.common}


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

    @property
    def divergence(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None

    @property
    def diverged(self) -> bool:
        return bool(self.divergences)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b,
                "divergence": None if self.divergence is None else self.divergence.to_json(),
                "divergences": [d.to_json() for d in self.divergences],
                "patterns": {k: p.to_json() for k, p in self.patterns.items()},
                "aligned": [s.to_json() for s in self.aligned],
                "findings": self.findings, "stats": self.stats}


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
    for p in sorted(ports):
        if p >= min(a.nr_ports, b.nr_ports):
            continue
        pa, pb = a.port_state(p), b.port_state(p)
        if pa.pms != pb.pms:
            out.ports.append({"port": p, "label": labels.get(p), "a": pa.pms, "b": pb.pms})
    for v in sorted(set(a.vcpus) | set(b.vcpus)):
        va, vb = a.vcpus.get(v), b.vcpus.get(v)
        for name in ("evtchn_upcall_pending", "evtchn_upcall_mask", "evtchn_pending_sel"):
            x = None if va is None else getattr(va, name)
            y = None if vb is None else getattr(vb, name)
            if x != y:
                out.vcpus.append({"vcpu": v, "field": name, "a": x, "b": y})
    return out


def _episode(shape: tuple[str, ...], idx: tuple[int | None, ...]) -> list[dict[str, Any]]:
    return [{"role": r, "snapshot": i} for r, i in zip(shape, idx, strict=False)
            if r != START]


def _describe(ep: list[dict[str, Any]]) -> str:
    return " -> ".join(r["role"] + (f" #{r['snapshot']}" if r["snapshot"] is not None else "")
                       for r in ep)


def _shape_text(shape: Iterable[str]) -> str:
    return " -> ".join(r for r in shape if r != START)


def _lcp(x: tuple[str, ...], y: tuple[str, ...]) -> int:
    n = 0
    for p, q in zip(x, y, strict=False):
        if p != q:
            break
        n += 1
    return n


def _covered(shape: tuple[str, ...], other: dict[tuple[str, ...], _Shape]) -> bool:
    """Does ``other`` have this episode?  A prologue never diverges, and an episode cut by
    the end of the recording only needs to be the beginning of one of ``other``'s."""
    if shape[0] == START:
        return True
    if shape in other:
        return True
    if shape[-1] == END:
        head = shape[:-1]
        return any(s[:len(head)] == head for s in other)
    return False


def _followup_divergence(side: str, mine: PatternSummary,
                         other: PatternSummary, names: dict[str, str]) -> Divergence | None:
    new = [(mine.first_followup[r], r) for r in mine.followups
           if r != END and other.followups.get(r, 0) == 0]
    if not new:
        return None
    (up, at, v), role = min(new, key=lambda x: x[0][0])
    o = "b" if side == "a" else "a"
    theirs = ", ".join(f"{n} by a {r}" for r, n in other.followups.most_common()) or "none"
    where = f" #{at}" if at is not None else ""
    if other.followups and set(other.followups) <= {"bottom-half", END}:
        them = (f"in {names[o]} every upcall ({other.upcalls}) is followed by a bottom-half")
    else:
        them = f"in {names[o]} upcalls are followed {theirs}"
    msg = (f"in {names[side]}, the upcall at #{up} (vCPU {v}) is followed by {role}{where} "
           f"with no bottom-half; {them}")
    return Divergence(side, up, msg)


def _episode_divergence(side: str, mine: PatternSummary, other: PatternSummary,
                        names: dict[str, str]) -> Divergence | None:
    best: tuple[int, tuple[str, ...], _Shape] | None = None
    for shape, st in mine.shapes.items():
        if _covered(shape, other.shapes):
            continue
        start = _first_index(st.first) or 0
        if best is None or start < best[0]:
            best = (start, shape, st)
    if best is None:
        return None
    _, shape, st = best
    o = "b" if side == "a" else "a"
    match = None
    common = 0
    if other.shapes:
        mshape, mst = max(other.shapes.items(),
                          key=lambda kv: (_lcp(shape, kv[0]), kv[1].count))
        common = _lcp(shape, mshape)
        match = _episode(mshape, mst.first)
    episode = _episode(shape, st.first)
    usual = "; ".join(f"{_shape_text(s['shape'])} ({s['count']}x)" for s in other.top(3))
    msg = (f"in {names[side]}, episode {_describe(episode)} (vCPU {st.vcpu}) never occurs in "
           f"{names[o]}" + (f" (its episodes: {usual})" if usual else ""))
    if match is not None and 0 < common < len(shape):
        msg += (f"; after {_shape_text(shape[:common])} {names[side]} goes on with "
                f"{shape[common]} where {names[o]} goes on with "
                f"{mshape[common] if common < len(mshape) else 'nothing'}")
    return Divergence(side, _first_index(st.first), msg, episode, match, common)


# --------------------------------------------------------------------------- public API


def _open(source: XrrReader | str | os.PathLike[str], stack: ExitStack) -> XrrReader:
    if isinstance(source, XrrReader):
        return source
    return stack.enter_context(XrrReader(source))


def _pass(reader: XrrReader, options: ReplayOptions | None) -> tuple[PatternSummary, Any, Any]:
    rep = Replayer(reader.header, options)
    pat = PatternSummary()
    last = None
    for snap in reader.snapshots():
        rep.feed(snap)
        pat.feed(snap, rep.walk.role_of(snap))
        last = snap
    pat.finish(last)
    return pat, rep.finish(reader.trailer, reader.problems), last


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
        pa, fa, la = _pass(ra, options)
        pb, fb, lb = _pass(rb, options)
        names = {"a": "A", "b": "B"}
        pats = {"a": pa, "b": pb}
        divs: list[Divergence] = []
        for side, o in (("b", "a"), ("a", "b")):
            d = (_followup_divergence(side, pats[side], pats[o], names)
                 or _episode_divergence(side, pats[side], pats[o], names))
            if d is not None:
                divs.append(d)
        # Aligned points: around the first divergence, then the two ends.
        pairs: list[tuple[str, int | None, int | None]] = []
        d = divs[0] if divs else None
        if d is not None and d.episode is None:  # a follow-up divergence: find its episode
            ep = _episode_divergence(d.side, pats[d.side], pats["b" if d.side == "a" else "a"],
                                     names)
            if ep is not None:
                d.episode, d.match, d.common = ep.episode, ep.match, ep.common
        if d is not None and d.episode and d.match and d.common > 0:
            mine, theirs = d.episode, d.match
            k = min(d.common, len(mine), len(theirs))
            for label, i in (("last common step", k - 1), ("first different step", k)):
                if 0 <= i < len(mine) and i < len(theirs):
                    x, y = mine[i]["snapshot"], theirs[i]["snapshot"]
                    pa_, pb_ = (y, x) if d.side == "b" else (x, y)
                    if pa_ is not None and pb_ is not None:
                        pairs.append((label, pa_, pb_))
        if la is not None and lb is not None:
            pairs.append(("end", la.index, lb.index))
        snaps_a = fetch(ra, [p[1] for p in pairs])
        snaps_b = fetch(rb, [p[2] for p in pairs])
        aligned = []
        seen = set()
        for label, i, j in pairs:
            if (i, j) in seen or i not in snaps_a or j not in snaps_b:
                continue
            seen.add((i, j))
            aligned.append(compare_states(snaps_a[i], snaps_b[j], label,
                                          {**ra.header.labels, **rb.header.labels}))
        findings = {k: [{"kind": f.kind, "snapshot": f.snapshot, "severity": f.severity,
                         "vcpu": f.vcpu, "ports": f.ports} for f in r.findings[:50]]
                    for k, r in (("a", fa), ("b", fb))}
        stats = {k: {"file": r.name, "arch": r.header.arch, "snapshots": res.stats["snapshots"],
                     "findings": res.stats["findings"]}
                 for k, r, res in (("a", ra, fa), ("b", rb, fb))}
        return DiffResult(ra.name, rb.name, divs, pats, aligned, findings, stats)


def diff_snapshots(source: XrrReader | str | os.PathLike[str], n: int, m: int,
                   other: XrrReader | str | os.PathLike[str] | None = None) -> SnapshotDiff:
    """Snapshot ``n`` against snapshot ``m`` of the same recording (or of ``other``)."""
    with ExitStack() as stack:
        ra = _open(source, stack)
        rb = ra if other is None else _open(other, stack)
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
