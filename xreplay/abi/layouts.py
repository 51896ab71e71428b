"""construct layouts of Xen's public shared_info / vcpu_info, one factory per guest ABI.

Written in the shape of pyelftools' ``ELFStructs``: :class:`XenStructs` builds every
struct once for an arch through aliases (``xen_ulong``, ``unsigned_long``), so each struct
reads like the header it mirrors.  Sources (identical from Xen 4.11 to 4.21):

* ``xen/include/public/xen.h``: ``vcpu_time_info``, ``vcpu_info``, ``shared_info``
* ``xen/include/public/arch-x86/xen.h``: ``arch_shared_info``, ``XEN_LEGACY_MAX_VCPUS`` 32
* ``xen/include/public/arch-x86/xen-x86_{64,32}.h``: ``arch_vcpu_info``
* ``xen/include/public/arch-arm.h``: empty arch structs, one legacy vCPU, 64-bit
  ``xen_ulong_t`` on arm32 too (``__align8__``), no ``evtchn_upcall_mask`` (``pad0``).

The generated ``xen/foreign/{x86_32,x86_64,arm32,arm64}.h`` headers are the oracle the
test-suite compiles against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from construct import (
    Array,
    Construct,
    Int8sl,
    Int8ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

from xreplay.abi.ports import nr_ports
from xreplay.errors import UsageError, XReplayError


class UnknownStructError(UsageError, KeyError):
    """A struct name the layouts do not have (an XReplayError, and a KeyError)."""


@dataclass(frozen=True)
class ArchSpec:
    """What differs between guest ABIs: word sizes, alignment and vCPU count."""

    name: str
    xen_ulong_size: int  # sizeof(xen_ulong_t)
    long_size: int  # sizeof(unsigned long), for x86 arch_shared_info
    u64_align: int  # alignment of uint64_t inside structs
    legacy_max_vcpus: int  # XEN_LEGACY_MAX_VCPUS
    has_upcall_mask: bool  # XEN_HAVE_PV_UPCALL_MASK
    family: str  # "x86" or "arm"


ARCHES: dict[str, ArchSpec] = {
    "x86_64": ArchSpec("x86_64", 8, 8, 8, 32, True, "x86"),
    # i386 aligns uint64_t to 4 inside structs (foreign/x86_32.h uses #pragma pack(4)).
    "x86_32": ArchSpec("x86_32", 4, 4, 4, 32, True, "x86"),
    "arm64": ArchSpec("arm64", 8, 8, 8, 1, False, "arm"),
    # arm32 uses __align8__ uint64_t for xen_ulong_t, so it shares arm64's layout.
    "arm32": ArchSpec("arm32", 8, 4, 8, 1, False, "arm"),
}

ARCH_ALIASES = {"amd64": "x86_64", "i386": "x86_32", "x86": "x86_32", "aarch64": "arm64",
                "arm": "arm32"}


def canonical_arch(name: str) -> str:
    """Map user spellings (amd64, i386, aarch64 …) to one of :data:`ARCHES`."""
    arch = ARCH_ALIASES.get(name, name)
    if arch not in ARCHES:
        raise XReplayError(
            f"unknown guest arch {name!r}: use one of {', '.join(ARCHES)}"
        )
    return arch


class _Layout:
    """Accumulates (name, construct) members and inserts C alignment padding."""

    def __init__(self) -> None:
        self.members: list = []
        self.offset = 0
        self.align = 1

    def add(self, name: str, con: Construct, align: int) -> None:
        gap = -self.offset % align
        if gap:
            self.members.append(Padding(gap))
            self.offset += gap
        self.members.append(name / con)
        self.offset += con.sizeof()
        self.align = max(self.align, align)

    def pad(self, size: int) -> None:
        self.members.append(Padding(size))
        self.offset += size

    def build(self) -> Struct:
        tail = -self.offset % self.align
        if tail:
            self.pad(tail)
        return Struct(*self.members)


class XenStructs:
    """Every shared-memory struct of the 2-level event-channel ABI for one guest arch.

    Attributes follow Xen's names: ``vcpu_time_info``, ``arch_vcpu_info``, ``vcpu_info``,
    ``arch_shared_info``, ``shared_info``.  Compiled twins (``*_compiled``) are used on hot
    paths; the plain ones carry the field structure for :meth:`fields`.
    """

    def __init__(self, arch: str) -> None:
        self.arch = canonical_arch(arch)
        self.spec = ARCHES[self.arch]
        s = self.spec
        self.xen_ulong = Int64ul if s.xen_ulong_size == 8 else Int32ul
        self.unsigned_long = Int64ul if s.long_size == 8 else Int32ul
        self.bits_per_word = 8 * s.xen_ulong_size
        self.nr_ports = nr_ports(self.bits_per_word)
        self.legacy_max_vcpus = s.legacy_max_vcpus
        self.aligns: dict[str, int] = {}
        self._create_vcpu_time_info()
        self._create_arch_vcpu_info()
        self._create_vcpu_info()
        self._create_arch_shared_info()
        self._create_shared_info()

    # -- struct builders, in the order of xen.h ---------------------------------------

    def _create_vcpu_time_info(self) -> None:
        # xen.h struct vcpu_time_info; `flags` needs __XEN_INTERFACE_VERSION__ > 0x040600
        # (older headers name the same byte pad1[0]).
        a = self.spec.u64_align
        lay = _Layout()
        lay.add("version", Int32ul, 4)
        lay.add("pad0", Int32ul, 4)
        lay.add("tsc_timestamp", Int64ul, a)
        lay.add("system_time", Int64ul, a)
        lay.add("tsc_to_system_mul", Int32ul, 4)
        lay.add("tsc_shift", Int8sl, 1)
        lay.add("flags", Int8ul, 1)
        lay.add("pad1", Array(2, Int8ul), 1)
        self.vcpu_time_info = lay.build()
        self.aligns["vcpu_time_info"] = lay.align

    def _create_arch_vcpu_info(self) -> None:
        lay = _Layout()
        if self.arch == "x86_64":  # arch-x86/xen-x86_64.h
            lay.add("cr2", Int64ul, 8)
            lay.add("pad", Int64ul, 8)
        elif self.arch == "x86_32":  # arch-x86/xen-x86_32.h
            lay.add("cr2", Int32ul, 4)
            lay.add("pad", Array(5, Int32ul), 4)
        # arch-arm.h: empty struct (size 0 in C)
        self.arch_vcpu_info = lay.build()
        self.aligns["arch_vcpu_info"] = lay.align

    def _create_vcpu_info(self) -> None:
        lay = _Layout()
        lay.add("evtchn_upcall_pending", Int8ul, 1)
        lay.add("evtchn_upcall_mask" if self.spec.has_upcall_mask else "pad0", Int8ul, 1)
        lay.add("evtchn_pending_sel", self.xen_ulong, self._xen_ulong_align)
        lay.add("arch", self.arch_vcpu_info, self.aligns["arch_vcpu_info"])
        lay.add("time", self.vcpu_time_info, self.aligns["vcpu_time_info"])
        self.vcpu_info = lay.build()
        self.aligns["vcpu_info"] = lay.align

    def _create_arch_shared_info(self) -> None:
        lay = _Layout()
        if self.spec.family == "x86":  # arch-x86/xen.h
            for name in ("max_pfn", "pfn_to_mfn_frame_list_list", "nmi_reason", "p2m_cr3",
                         "p2m_vaddr", "p2m_generation"):
                lay.add(name, self.unsigned_long, self.spec.long_size)
            if self.arch == "x86_32":  # wc_sec_hi lives here on i386 only
                lay.add("wc_sec_hi", Int32ul, 4)
        self.arch_shared_info = lay.build()
        self.aligns["arch_shared_info"] = lay.align

    def _create_shared_info(self) -> None:
        words = self.bits_per_word  # sizeof(xen_ulong_t) * 8 words per bitmap
        lay = _Layout()
        lay.add("vcpu_info", Array(self.legacy_max_vcpus, self.vcpu_info),
                self.aligns["vcpu_info"])
        lay.add("evtchn_pending", Array(words, self.xen_ulong), self._xen_ulong_align)
        lay.add("evtchn_mask", Array(words, self.xen_ulong), self._xen_ulong_align)
        lay.add("wc_version", Int32ul, 4)
        lay.add("wc_sec", Int32ul, 4)
        lay.add("wc_nsec", Int32ul, 4)
        if self.arch != "x86_32":
            lay.add("wc_sec_hi", Int32ul, 4)
        lay.add("arch", self.arch_shared_info, self.aligns["arch_shared_info"])
        self.shared_info = lay.build()
        self.aligns["shared_info"] = lay.align

    @property
    def _xen_ulong_align(self) -> int:
        return self.spec.xen_ulong_size if self.spec.xen_ulong_size == 4 else self.spec.u64_align

    # -- introspection ------------------------------------------------------------------

    STRUCT_NAMES = ("shared_info", "vcpu_info", "vcpu_time_info", "arch_vcpu_info",
                    "arch_shared_info")

    def struct(self, name: str) -> Struct:
        if name not in self.STRUCT_NAMES:
            raise UnknownStructError(f"no struct {name!r} in the {self.arch} layouts: use one "
                                     f"of {', '.join(self.STRUCT_NAMES)}")
        return getattr(self, name)

    def fields(self, name: str) -> dict[str, tuple[int, int]]:
        """Top-level fields of struct ``name`` as ``{field: (offset, size)}``."""
        out: dict[str, tuple[int, int]] = {}
        offset = 0
        for sub in self.struct(name).subcons:
            size = sub.sizeof()
            if sub.name is not None:
                out[sub.name] = (offset, size)
            offset += size
        return out

    def describe(self) -> dict:
        """The layout as plain data (the shape of ``xreplay layout --json``)."""
        return {
            "arch": self.arch,
            "bits_per_word": self.bits_per_word,
            "nr_ports": self.nr_ports,
            "legacy_max_vcpus": self.legacy_max_vcpus,
            "structs": {
                name: {
                    "size": self.struct(name).sizeof(),
                    "fields": {f: {"offset": o, "size": s} for f, (o, s) in
                               self.fields(name).items()},
                }
                for name in self.STRUCT_NAMES
            },
        }


@cache
def layout(arch: str) -> XenStructs:
    """The (cached) :class:`XenStructs` for ``arch``."""
    return XenStructs(canonical_arch(arch))
