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
from xreplay.errors import RecordingFormatError, UsageError, XReplayError
from xreplay.xrr import format as fmt

PROBE_ROLES = ("upcall", "bottom-half", "block", "other")
REGION_KINDS = ("shared_info", "vcpu_info", "watch")


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
    kind: str  # shared_info | vcpu_info | watch
    size: int
    expr: str = ""  # where the recorder read it from (address or gdb expression)
    vcpu: int | None = None  # for vcpu_info regions


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
        regions.extend(watch or [])
        return cls(arch=arch, probes=probes, regions=regions, vcpus=vcpus or [0], **kw)

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
            "regions": [asdict(r) for r in self.regions], "vcpus": list(self.vcpus),
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
            elif vcpu is not None:
                vcpu = self.integer(vcpu, f"region {name!r} vcpu", 0, fmt.MAX_VCPUS)
            expr = self.text(r.get("expr", ""), f"region {name!r} expr", None)
            regions.append(RegionSpec(name, kind, size, expr, vcpu))
        if sum(r.kind == "shared_info" for r in regions) != 1:
            raise self.bad("must declare exactly one shared_info region")
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
