"""What a recording says about itself: arch, target, probes, regions, labels.

Stored as JSON inside the checksummed file header, so it can grow without a format
bump; :func:`RecordingHeader.from_json` validates every field it relies on, because
recordings travel between people.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from xreplay import __version__
from xreplay.abi import canonical_arch, layout, nr_ports
from xreplay.abi.fifo import (
    CONTROL_BLOCK_SIZE,
    EVTCHN_FIFO_NR_CHANNELS,
    MAX_EVENT_ARRAY_PAGES,
    PAGE_SIZE,
)
from xreplay.errors import RecordingFormatError, UsageError, XReplayError
from xreplay.xrr import format as fmt

PROBE_ROLES = ("upcall", "bottom-half", "block", "other")
# fifo_* (FIFO ABI guests, format 1.0 and 2.0 alike: a region kind is header JSON only):
# one fifo_control_block per vCPU (``vcpu`` set) and one fifo_event_page per event-array
# page in use (``page`` set), and optionally one fifo_page_count: the guest's own count of
# the pages it has given Xen (Linux's ``event_array_pages``, a u32) read at every hit, so
# pages added during the run are read from the hit where they appear and pages declared
# but not in use yet are not taken for unreadable ones.  Readers that predate them refuse
# the file by kind.
REGION_KINDS = ("shared_info", "vcpu_info", "watch", "fifo_control_block", "fifo_event_page",
                "fifo_page_count")
FIFO_KINDS = ("fifo_control_block", "fifo_event_page")
PAGE_COUNT_KIND = "fifo_page_count"
PAGE_COUNT_REGION = "event_array_pages"
PAGE_COUNT_SIZE = 4  # unsigned int, as Linux's event_array_pages


@dataclass(frozen=True)
class ProbeSpec:
    """A breakpoint location and the part it plays in event delivery."""

    name: str
    location: str
    role: str = "other"


@dataclass(frozen=True)
class RegionSpec:
    """A guest memory region stored with every snapshot."""

    name: str
    kind: str  # one of REGION_KINDS
    size: int
    expr: str = ""  # where the recorder read it from (address or gdb expression)
    vcpu: int | None = None  # for vcpu_info and fifo_control_block regions
    page: int | None = None  # for fifo_event_page regions: the event-array page index


def fifo_regions(vcpus: list[int], pages: int, exprs: dict[str, str],
                 page_count: str | None = None) -> list[RegionSpec]:
    """A FIFO guest's regions: each vCPU's control block, the page count if the guest
    keeps one (``page_count``: where it is read), then the event-array pages (``exprs``
    maps region names to where the recorder reads them). With a page count, ``pages`` is
    how many pages the header declares (the most the run can follow), not those in use."""
    out = [RegionSpec(f"control_block.{v}", "fifo_control_block", CONTROL_BLOCK_SIZE,
                      exprs.get(f"control_block.{v}", ""), v) for v in sorted(vcpus)]
    if page_count is not None:
        out.append(RegionSpec(PAGE_COUNT_REGION, PAGE_COUNT_KIND, PAGE_COUNT_SIZE, page_count))
    out += [RegionSpec(f"event_array.{i}", "fifo_event_page", PAGE_SIZE,
                       exprs.get(f"event_array.{i}", ""), None, i) for i in range(pages)]
    return out


@dataclass
class RecordingHeader:
    arch: str
    probes: list[ProbeSpec]
    regions: list[RegionSpec]
    vcpus: list[int] = field(default_factory=lambda: [0])
    target: dict[str, Any] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    notify: dict[int, int] = field(default_factory=dict)  # port -> notify vCPU
    delivery: dict[str, Any] = field(default_factory=dict)  # upcall mechanism, vector
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    tool: str = f"xreplay {__version__}"
    keyframe_interval: int = 256
    extra: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, Any] = field(default_factory=dict)
    """Set when the snapshots were taken on a deterministic replay (``record --from-rr``):
    ``kind`` ("qemu-rr"), ``run`` (the run directory), ``log_sha256``, ``end_icount``,
    ``icount_shift``. Empty for a live recording (and then not written)."""

    def __post_init__(self) -> None:
        self.arch = canonical_arch(self.arch)

    @classmethod
    def for_arch(cls, arch: str, probes: list[ProbeSpec], *, vcpus: list[int] | None = None,
                 watch: list[RegionSpec] | None = None,
                 vcpu_info_exprs: dict[int, str] | None = None, **kw: Any) -> RecordingHeader:
        """A header with the standard regions: shared_info, any registered vcpu_infos, watches."""
        structs = layout(arch)
        regions = [RegionSpec("shared_info", "shared_info", structs.shared_info.sizeof(),
                              kw.pop("shared_info_expr", ""))]
        for vcpu, expr in sorted((vcpu_info_exprs or {}).items()):
            regions.append(RegionSpec(f"vcpu_info.{vcpu}", "vcpu_info",
                                      structs.vcpu_info.sizeof(), expr, vcpu))
        fifo_pages = kw.pop("fifo_pages", 0)
        if fifo_pages:
            regions.extend(fifo_regions(vcpus or [0], fifo_pages,
                                        kw.pop("fifo_exprs", None) or {},
                                        kw.pop("fifo_page_count", None)))
        kw.pop("fifo_exprs", None)
        kw.pop("fifo_page_count", None)
        regions.extend(watch or [])
        return cls(arch=arch, probes=probes, regions=regions, vcpus=vcpus or [0], **kw)

    @property
    def abi(self) -> str:
        """``"fifo"`` when the recording holds FIFO control blocks, else ``"2l"``."""
        return "fifo" if any(r.kind in FIFO_KINDS for r in self.regions) else "2l"

    def probe_index(self, name: str) -> int:
        for i, p in enumerate(self.probes):
            if p.name == name:
                return i
        raise UsageError(f"no probe named {name!r} in the recording header")

    def region_index(self, name: str) -> int:
        for i, r in enumerate(self.regions):
            if r.name == name:
                return i
        raise UsageError(f"no region named {name!r} in the recording header")

    def to_json(self) -> dict[str, Any]:
        """The header's JSON (free-form objects shared, not deep-copied: they may be big)."""
        return {
            "arch": self.arch, "probes": [asdict(p) for p in self.probes],
            # ``page`` only where set: 2-level headers stay byte-identical
            "regions": [{k: v for k, v in asdict(r).items() if k != "page" or v is not None}
                        for r in self.regions], "vcpus": list(self.vcpus),
            "target": dict(self.target), "labels": {str(k): v for k, v in self.labels.items()},
            "notify": {str(k): v for k, v in self.notify.items()},
            "delivery": dict(self.delivery), "created": self.created, "tool": self.tool,
            "keyframe_interval": self.keyframe_interval, "extra": dict(self.extra),
            **({"replay": dict(self.replay)} if self.replay else {}),
        }

    def validate(self, source: str = "recording header", *, writing: bool = False
                 ) -> RecordingHeader:
        """The header as a reader will see it: raises what :meth:`from_json` would
        (with ``writing``, a :class:`UsageError` that says the recording cannot start)."""
        return _HeaderParser(source, writing).parse(self.to_json())

    @classmethod
    def from_json(cls, d: Any, source: str = "recording") -> RecordingHeader:
        """Validate a header's JSON against the format's bounds and the arch's ABI.

        Every list is bounded by what the ABI allows (vCPU ids, ports, region ids), every
        region's size is checked against the arch's struct, so that nothing downstream
        costs more than the file's snapshots, or decodes garbage silently.
        """
        return _HeaderParser(source).parse(d)


class _HeaderParser:
    """One header's validation; each check names the field it rejects."""

    def __init__(self, source: str, writing: bool = False) -> None:
        self.source = source
        self.writing = writing

    def bad(self, what: str) -> XReplayError:
        if self.writing:
            return UsageError(f"cannot write a recording: its header {what}")
        return RecordingFormatError(f"{self.source}: header {what}: the file is corrupt or "
                                    "not written by xreplay", file=self.source)

    def get(self, d: dict, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = d.get(key, default)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            name = kind.__name__ if isinstance(kind, type) else kind[0].__name__
            raise self.bad(f"field {key!r} is not {_A.get(name, name)}")
        return value

    def integer(self, value: Any, what: str, lo: int, hi: int) -> int:
        """A JSON integer in [lo, hi) (not a bool, not a float such as 1e400)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(f"{what} is not an integer ({_short(value)})")
        if not lo <= value < hi:
            raise self.bad(f"{what} {value} is outside {lo}..{hi - 1}")
        return value

    def text(self, value: Any, what: str, limit: int | None = fmt.MAX_NAME) -> str:
        if not isinstance(value, str):
            raise self.bad(f"{what} is not a string ({_short(value)})")
        if limit is not None and len(value) > limit:
            raise self.bad(f"{what} is longer than {limit} characters")
        return value

    def port_key(self, key: str, what: str, nports: int) -> int:
        if not _PORT_KEY.fullmatch(key):
            raise self.bad(f"{what} key {_short(key)} is not a port number")
        return self.integer(int(key), f"{what} port", 0, nports)

    def parse(self, d: Any) -> RecordingHeader:
        if not isinstance(d, dict):
            raise self.bad("is not a JSON object")
        if json_depth(d) > fmt.MAX_JSON_DEPTH:
            raise self.bad(f"nests deeper than {fmt.MAX_JSON_DEPTH} levels")
        if "arch" not in d:
            raise self.bad("has no arch")
        try:
            arch = canonical_arch(self.text(d["arch"], "arch"))
        except XReplayError as e:
            raise self.bad(str(e)) from None
        structs = layout(arch)
        nports = nr_ports(structs.bits_per_word)

        probes_j = self.get(d, "probes", list, [])
        if len(probes_j) > fmt.MAX_PROBES:
            raise self.bad(f"declares {len(probes_j)} probes, more than {fmt.MAX_PROBES}")
        probes = []
        for i, p in enumerate(probes_j):
            if not isinstance(p, dict) or "name" not in p or "location" not in p:
                raise self.bad(f"probe {i} is not an object with a name and a location")
            role = self.text(p.get("role", "other"), f"probe {i} role")
            if role not in PROBE_ROLES:
                raise self.bad(f"probe {i} has role {role!r}, not one of "
                               f"{', '.join(PROBE_ROLES)}")
            probes.append(ProbeSpec(self.text(p["name"], f"probe {i} name"),
                                    self.text(p["location"], f"probe {i} location", None),
                                    role))

        regions = self.regions(self.get(d, "regions", list, []), structs)
        if any(r.kind in FIFO_KINDS for r in regions):
            nports = EVTCHN_FIFO_NR_CHANNELS  # FIFO ports go up to 2^17 - 1

        vcpus_j = self.get(d, "vcpus", list, [0])
        if len(vcpus_j) > fmt.MAX_VCPUS:
            raise self.bad(f"lists {len(vcpus_j)} vCPUs, more than {fmt.MAX_VCPUS}")
        vcpus = list(dict.fromkeys(self.integer(v, "vCPU id", 0, fmt.MAX_VCPUS)
                                   for v in vcpus_j))

        labels = {self.port_key(k, "labels", nports): self.text(v, f"label of port {k}")
                  for k, v in self.get(d, "labels", dict, {}).items()}
        notify = {self.port_key(k, "notify", nports):
                  self.integer(v, f"notify vCPU of port {k}", 0, fmt.MAX_VCPUS)
                  for k, v in self.get(d, "notify", dict, {}).items()}
        kfi = self.integer(d.get("keyframe_interval", 256), "keyframe_interval", 1,
                           fmt.MAX_KEYFRAME_INTERVAL + 1)
        return RecordingHeader(
            arch=arch, probes=probes, regions=regions, vcpus=vcpus,
            target=self.get(d, "target", dict, {}), labels=labels, notify=notify,
            delivery=self.get(d, "delivery", dict, {}),
            created=self.text(self.get(d, "created", str, ""), "created"),
            tool=self.text(self.get(d, "tool", str, ""), "tool"), keyframe_interval=kfi,
            extra=self.get(d, "extra", dict, {}),
            replay=self.get(d, "replay", dict, {}))

    def regions(self, regions_j: list, structs: Any) -> list[RegionSpec]:
        if len(regions_j) > fmt.MAX_REGIONS:
            raise self.bad(f"declares {len(regions_j)} regions, more than {fmt.MAX_REGIONS}")
        want = {"shared_info": structs.shared_info.sizeof(),
                "vcpu_info": structs.vcpu_info.sizeof()}
        regions: list[RegionSpec] = []
        names: set[str] = set()
        registered: set[int] = set()
        for i, r in enumerate(regions_j):
            if not isinstance(r, dict) or not {"name", "kind", "size"} <= r.keys():
                raise self.bad(f"region {i} is not an object with a name, kind and size")
            name = self.text(r["name"], f"region {i} name")
            kind = self.text(r["kind"], f"region {name!r} kind")
            if kind not in REGION_KINDS:
                raise self.bad(f"region {name!r} has kind {kind!r}, not one of "
                               f"{', '.join(REGION_KINDS)}")
            if name in names:
                raise self.bad(f"declares region {name!r} twice")
            names.add(name)
            size = self.integer(r["size"], f"region {name!r} size", 1, fmt.MAX_REGION + 1)
            if kind in want and size != want[kind]:
                raise self.bad(f"region {name!r} is {size} bytes, but a {structs.arch} "
                               f"{kind} is {want[kind]}: wrong arch, or a damaged file")
            vcpu = r.get("vcpu")
            if kind == "vcpu_info":
                vcpu = self.integer(vcpu, f"region {name!r} vcpu", 0, fmt.MAX_VCPUS)
                if vcpu in registered:
                    raise self.bad(f"declares two vcpu_info regions for vCPU {vcpu}")
                registered.add(vcpu)
            elif vcpu is not None or kind == "fifo_control_block":
                vcpu = self.integer(vcpu, f"region {name!r} vcpu", 0, fmt.MAX_VCPUS)
            page = r.get("page")
            if kind == "fifo_event_page" or page is not None:
                page = self.integer(page, f"FIFO region {name!r} page", 0,
                                    MAX_EVENT_ARRAY_PAGES)
            if kind == "fifo_event_page" and size != PAGE_SIZE:
                raise self.bad(f"FIFO region {name!r} is {size} bytes, not a {PAGE_SIZE}-byte "
                               "event-array page")
            if kind == PAGE_COUNT_KIND and size != PAGE_COUNT_SIZE:
                raise self.bad(f"FIFO region {name!r} is {size} bytes, not a "
                               f"{PAGE_COUNT_SIZE}-byte page count")
            if kind == "fifo_control_block" and size < CONTROL_BLOCK_SIZE:
                raise self.bad(f"FIFO region {name!r} is {size} bytes, smaller than struct "
                               f"evtchn_fifo_control_block ({CONTROL_BLOCK_SIZE})")
            expr = self.text(r.get("expr", ""), f"region {name!r} expr", None)
            regions.append(RegionSpec(name, kind, size, expr, vcpu, page))
        if sum(r.kind == "shared_info" for r in regions) != 1:
            raise self.bad("must declare exactly one shared_info region")
        if sum(r.kind == PAGE_COUNT_KIND for r in regions) > 1:
            raise self.bad(f"declares more than one {PAGE_COUNT_KIND} region")
        if any(r.kind == PAGE_COUNT_KIND for r in regions) and not any(
                r.kind == "fifo_event_page" for r in regions):
            raise self.bad(f"declares a {PAGE_COUNT_KIND} region but no fifo_event_page")
        return regions


_PORT_KEY = re.compile(r"[0-9]{1,6}")
_A = {"list": "a list", "dict": "an object", "str": "a string", "int": "an integer"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_CONTAINERS = (dict, list)


def json_depth(obj: Any) -> int:
    """Nesting depth of decoded JSON, level by level without recursion (a hostile file
    nests 100,000 deep); stops counting past :data:`~fmt.MAX_JSON_DEPTH`."""
    depth = 0
    level = [obj] if type(obj) in _CONTAINERS else []
    while level:
        depth += 1
        if depth > fmt.MAX_JSON_DEPTH:
            break
        nxt: list[Any] = []
        for o in level:
            nxt += [x for x in (o.values() if type(o) is dict else o)
                    if type(x) in _CONTAINERS]
        level = nxt
    return depth


def parse_json_object(data: bytes, what: str, source: str, offset: int | None
                      ) -> dict[str, Any]:
    """``data`` as a JSON object no deeper than :data:`~fmt.MAX_JSON_DEPTH`, or one error."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than C's stack
        doc = None
    at = "" if offset is None else f" at byte {offset}"
    if not isinstance(doc, dict):
        raise RecordingFormatError(f"{source}: {what}{at} is not a JSON object: the file is "
                                   "corrupt", file=source, offset=offset)
    if json_depth(doc) > fmt.MAX_JSON_DEPTH:
        raise RecordingFormatError(f"{source}: {what}{at} nests deeper than "
                                   f"{fmt.MAX_JSON_DEPTH} levels", file=source, offset=offset)
    return doc
