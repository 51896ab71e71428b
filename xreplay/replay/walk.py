"""What a replay is made of: its findings, options, per-hit steps, shared walk state.

The vocabulary the detectors (:mod:`xreplay.replay.detectors`, the rules) and the engine
that feeds them (:mod:`xreplay.replay.replayer`) share: a :class:`Finding` under a stable
kind name, the :class:`Step` each probe hit becomes, the :class:`Walk` (geometry, routing,
probe roles, per-vCPU tracks), the :class:`Detector` interface and the
:class:`ReplayResult`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from xreplay.abi import Geometry
from xreplay.replay.model import Evtchn2L, Routing
from xreplay.snapshot import Snapshot
from xreplay.xrr import RecordingHeader

KINDS = ("missed-clear", "stranded-port", "lost-pending", "upcall-masked-at-block",
         "abi-violation", "blocked-at-end", "masked-pending", "spurious-upcall")
SEVERITIES = ("error", "warning", "info")
SHADOW_NAMES = ("evtchn_callback_ml", "shadow")
HANG = "hang"  # the role we give a snapshot taken at a hang (flag bit 1)
ORDINARY_ENDS = ("count", "duration", "target-exited")  # recorder end reasons


@dataclass(slots=True)
class Finding:
    """One thing that loses (or may lose) an event, located in the recording.

    ``snapshot`` is the key snapshot (where it happened or was proven);
    ``upcall_snapshot``/``block_snapshot`` the upcall and block hits involved; ``fields``
    the shared_info/vcpu_info fields at fault.  Fields that do not apply are None.
    """

    kind: str
    snapshot: int
    upcall_snapshot: int | None = None
    block_snapshot: int | None = None
    vcpu: int | None = None
    ports: list[int] | None = None
    fields: list[str] | None = None
    message: str = ""
    severity: str = "error"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass
class ReplayOptions:
    """``shadow`` names the watch region holding the guest's shadow of pending ports (one
    byte per port, nonzero = marked); None looks for one named like ``evtchn_callback_ml``
    or ``shadow``; ``use_shadow=False`` ignores it.  A blocked vCPU whose state has not
    changed for ``stall_ns`` while other vCPUs kept hitting probes counts as hung."""

    shadow: str | None = None
    use_shadow: bool = True
    stall_ns: int = 1_000_000_000
    max_findings: int = 1000  # per kind; the rest are counted in stats["dropped"]
    info: bool = True


@dataclass(slots=True)
class VcpuTrack:
    """What one vCPU's probe hits say about where it is in the event-handling loop."""

    vcpu: int
    last_hit: int | None = None
    last_hit_t: int = 0
    last_role: str | None = None
    last_bottom_half: int | None = None
    last_block: int | None = None
    block_if: bool | None = None
    first_upcall_since_bh: int | None = None
    upcalls_since_bh: int = 0
    blocked: bool = False  # entered the block function, no bottom half since
    quiet: bool = False  # its last hit was a block entry: only Xen writes until its next hit
    counted: bool = False  # one of the recording's vCPUs (Walk.quiet asks about those)


@dataclass(slots=True)
class Step:
    """One probe hit: where and when, the model's state there (``cur``) and at the hit
    before (``prev``, None at the first); ``quiet``: every vCPU was blocked at ``prev``;
    ``changed``: some event-channel field differs from ``prev``; ``shadow``/
    ``prev_shadow``: the guest's shadow of pending ports (a watch region), if recorded."""

    index: int = 0
    t_ns: int = 0
    probe: str = ""
    vcpu: int = 0
    role: str = ""
    hang: bool = False
    interrupts_enabled: bool | None = None
    quiet: bool = False
    changed: bool = True
    cur: Evtchn2L | None = None
    prev: Evtchn2L | None = None
    prev_index: int = 0
    prev_probe: str = ""
    shadow: bytes | None = None
    prev_shadow: bytes | None = None


@dataclass(slots=True)
class End:
    """The last hit's number (None: no snapshot) and state, and the recorder's trailer."""

    last: int | None
    hang: bool
    state: Evtchn2L
    trailer: dict[str, Any] | None

    @property
    def reason(self) -> str | None:
        return None if self.trailer is None else self.trailer.get("reason")


class Walk:
    """Shared state of one replay: geometry, routing, probe roles, per-vCPU tracks."""

    def __init__(self, header: RecordingHeader, options: ReplayOptions) -> None:
        self.header = header
        self.options = options
        self.geometry = Geometry.for_arch(header.arch)
        self.routing = Routing(self.geometry, header.vcpus, header.notify)
        self.roles = {p.name: p.role for p in header.probes}
        self.has_role = set(self.roles.values())
        self.labels = header.labels
        self.tracks = {v: VcpuTrack(v) for v in self.routing.vcpus}
        for v in header.vcpus:
            self.tracks[v].counted = True
        self.loud = len(set(header.vcpus))  # counted tracks not quiet
        self.findings: list[Finding] = []
        self.per_kind: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.t0: int | None = None
        self.count = 0

    # -- reporting helpers ---------------------------------------------------------------

    def add(self, f: Finding) -> Finding | None:
        if f.severity == "info" and not self.options.info:
            return None
        self.per_kind[f.kind] += 1
        if self.per_kind[f.kind] > self.options.max_findings:
            self.dropped[f.kind] += 1
            return None
        self.findings.append(f)
        return f

    def port_name(self, port: int) -> str:
        label = self.labels.get(port)
        return f"{port} ({label})" if label else str(port)

    def ports_text(self, ports: Iterable[int], state: Evtchn2L | None = None,
                   limit: int = 16) -> str:
        ports = list(ports)
        parts = [self.port_name(p) + (f" {state.pms(p)}" if state is not None else "")
                 for p in ports[:limit]]
        if len(ports) > limit:
            parts.append(f"and {len(ports) - limit} more")
        return ", ".join(parts)

    def when(self, index: int, t_ns: int) -> str:
        return f"#{index} (t={(t_ns - (self.t0 or 0)) / 1e9:.6f} s)"

    # -- state queries -------------------------------------------------------------------

    def role_of(self, snap: Snapshot) -> str:
        return HANG if snap.hang else self.roles.get(snap.probe, "other")

    def model(self) -> Evtchn2L:
        """An empty model of this recording's ABI and routing (no vcpu_info read yet)."""
        return Evtchn2L(self.geometry, self.routing, vcpu_info={})

    def quiet(self) -> bool:
        """Every vCPU of the recording sits in its block function: only Xen writes."""
        return not self.loud

    def update_track(self, vcpu: int, index: int, t_ns: int, role: str,
                     interrupts_enabled: bool | None) -> None:
        if role == HANG:
            return
        tr = self.tracks.get(vcpu)
        if tr is None:
            tr = self.tracks[vcpu] = VcpuTrack(vcpu)
        tr.last_hit, tr.last_hit_t, tr.last_role = index, t_ns, role
        if role == "block":
            tr.last_block, tr.block_if = index, interrupts_enabled
            tr.blocked = True
            if not tr.quiet:
                tr.quiet = True
                if tr.counted:
                    self.loud -= 1
            return
        if tr.quiet:
            tr.quiet = False
            if tr.counted:
                self.loud += 1
        if role == "upcall":
            if tr.first_upcall_since_bh is None:
                tr.first_upcall_since_bh = index
            tr.upcalls_since_bh += 1
        elif role == "bottom-half":
            tr.last_bottom_half = index
            tr.first_upcall_since_bh = None
            tr.upcalls_since_bh = 0
            tr.blocked = False


class Detector:
    """A rule over the stream of steps; reports through :meth:`Walk.add`."""

    kinds: tuple[str, ...] = ()
    roles: tuple[str, ...] | None = None  # the roles of the hits it looks at (None: all)
    # of those, the roles it must see even when no event-channel field changed since the
    # hit before (None: all); the replay skips the rest, so ``step`` must be a no-op there
    unchanged_roles: tuple[str, ...] | None = None

    def step(self, w: Walk, s: Step) -> None:
        pass

    def finish(self, w: Walk, end: End) -> None:
        pass


@dataclass
class ReplayResult:
    """The findings in snapshot order, and statistics about the walk."""

    findings: list[Finding]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """True when a finding is not informational (the CLI's exit status 1)."""
        return any(f.severity != "info" for f in self.findings)

    @property
    def judged(self) -> int:
        """Snapshots the detectors saw: those whose shared_info (and the probed vCPU's
        vcpu_info) was read."""
        return int(self.stats.get("snapshots", 0))

    def incomplete(self) -> str | None:
        """Why no clean verdict can be given (regions the judgement needs were not read),
        as one line; None when every snapshot was judged."""
        recorded = int(self.stats.get("recorded", self.judged))
        unread = self.stats.get("unreadable") or {}
        if recorded == 0:
            return "the recording holds no snapshot: nothing to judge"
        if self.judged == recorded:
            return self._stops_short()
        name, n = max(unread.items(), key=lambda kv: kv[1]) if unread else ("a region", 0)
        what = ("re-record with --shared-info pointing at the shared page (a pointer "
                "variable, the page itself, or its run-time address)" if name == "shared_info"
                else f"re-record with a readable --vcpu-info for {name.split('.')[-1]}"
                if name.startswith("vcpu_info") else "re-record")
        return (f"{name} could not be read in {n} of {recorded} snapshots, so only "
                f"{self.judged} could be judged: {what}")

    def _stops_short(self) -> str | None:
        """Why the recording's end is not the run's end, or None: without the end frame a
        clean close writes, what happened after the last intact snapshot (often the hang
        itself) was never read, and "nothing found" would be said of a run not seen."""
        if self.stats.get("closed_cleanly", True):
            return None
        torn = self.stats.get("torn_at")
        why = "no end frame" if torn is None else f"torn tail at byte {torn}, no end frame"
        return (f"the recording stops short ({why}): the recorder did not finish, and what "
                f"came after #{self.stats.get('last_snapshot')} was never recorded (the "
                f"{self.judged} snapshots before it were judged). Re-record and let the "
                "recorder finish (--count, --duration, --hang-after or Ctrl-C end it cleanly)")

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {"findings": [f.to_json() for f in self.findings], "stats": self.stats}
