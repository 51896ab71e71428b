"""What a recording says about itself: arch, target, probes, regions, labels.

Stored as JSON inside the checksummed file header, so it can grow without a format
bump; :func:`RecordingHeader.from_json` validates every field it relies on, because
recordings travel between people.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any

from xreplay import __version__
from xreplay.abi import canonical_arch, layout
from xreplay.abi.fifo import CONTROL_BLOCK_SIZE, MAX_EVENT_ARRAY_PAGES, PAGE_SIZE
from xreplay.errors import XReplayError

PROBE_ROLES = ("upcall", "bottom-half", "block", "other")
# fifo_* (FIFO ABI guests, format 1.0 and 2.0 alike: a region kind is header JSON only):
# one fifo_control_block per vCPU (``vcpu`` set) and one fifo_event_page per event-array
# page in use (``page`` set).  Readers that predate them refuse the file by kind.
REGION_KINDS = ("shared_info", "vcpu_info", "watch", "fifo_control_block", "fifo_event_page")
FIFO_KINDS = ("fifo_control_block", "fifo_event_page")


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


def fifo_regions(vcpus: list[int], pages: int, exprs: dict[str, str]) -> list[RegionSpec]:
    """A FIFO guest's regions: each vCPU's control block, then the event-array pages in
    use (``exprs`` maps region names to where the recorder reads them)."""
    out = [RegionSpec(f"control_block.{v}", "fifo_control_block", CONTROL_BLOCK_SIZE,
                      exprs.get(f"control_block.{v}", ""), v) for v in sorted(vcpus)]
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
                                        kw.pop("fifo_exprs", None) or {}))
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
        raise KeyError(name)

    def region_index(self, name: str) -> int:
        for i, r in enumerate(self.regions):
            if r.name == name:
                return i
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        d["notify"] = {str(k): v for k, v in self.notify.items()}
        for r in d["regions"]:
            if r.get("page") is None:
                r.pop("page", None)  # 2-level headers stay byte-identical
        return d

    @classmethod
    def from_json(cls, d: Any, source: str = "recording") -> RecordingHeader:
        def bad(what: str) -> XReplayError:
            return XReplayError(f"{source}: header {what}")

        if not isinstance(d, dict):
            raise bad("is not a JSON object")
        try:
            arch = canonical_arch(str(d["arch"]))
        except KeyError:
            raise bad("has no arch") from None
        except XReplayError as e:
            raise XReplayError(f"{source}: {e}") from None
        try:
            probes = [ProbeSpec(str(p["name"]), str(p["location"]), str(p.get("role", "other")))
                      for p in d.get("probes", [])]
            regions = [RegionSpec(str(r["name"]), str(r["kind"]), int(r["size"]),
                                  str(r.get("expr", "")),
                                  None if r.get("vcpu") is None else int(r["vcpu"]),
                                  None if r.get("page") is None else int(r["page"]))
                       for r in d.get("regions", [])]
            labels = {int(k): str(v) for k, v in dict(d.get("labels", {})).items()}
            notify = {int(k): int(v) for k, v in dict(d.get("notify", {})).items()}
            vcpus = [int(v) for v in d.get("vcpus", [0])]
            kfi = int(d.get("keyframe_interval", 256))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"is malformed ({e.__class__.__name__}: {e})") from None
        if len(probes) > 256 or len(regions) > 255:
            raise bad("declares too many probes or regions")
        for r in regions:
            if r.kind not in REGION_KINDS or not 0 < r.size <= (16 << 20):
                raise bad(f"region {r.name!r} has a bad kind or size")
            bad_block = r.kind == "fifo_control_block" and (
                r.vcpu is None or r.size < CONTROL_BLOCK_SIZE)
            bad_page = r.kind == "fifo_event_page" and (
                r.page is None or not 0 <= r.page < MAX_EVENT_ARRAY_PAGES or r.size != PAGE_SIZE)
            if bad_block or bad_page:
                raise bad(f"FIFO region {r.name!r} lacks its vcpu/page or has a bad size")
        if not any(r.kind == "shared_info" for r in regions):
            raise bad("declares no shared_info region")
        return cls(arch=arch, probes=probes, regions=regions, vcpus=vcpus,
                   target=dict(d.get("target", {})), labels=labels, notify=notify,
                   delivery=dict(d.get("delivery", {})), created=str(d.get("created", "")),
                   tool=str(d.get("tool", "")), keyframe_interval=kfi,
                   extra=dict(d.get("extra", {})))
