"""The ``.xrr`` recording format, declared once with construct (spec: ``formats/xrr.md``).

A file is a checksummed header followed by checksummed frames.  Frames are
self-delimiting so that a file cut off mid-write reads back every complete frame; every
length and every number read from a file is bounded here, before it is trusted, because
recordings travel between people.  The writer builds with these declarations and the reader
parses with them; the bounds below are the only copy of each limit.
"""

from __future__ import annotations

import enum
import struct
import zlib

from construct import (
    Adapter,
    Bytes,
    Const,
    Construct,
    Enum,
    FlagsEnum,
    FormatField,
    GreedyBytes,
    GreedyRange,
    Int8ul,
    Int16ul,
    Int32ul,
    IntegerError,
    Prefixed,
    PrefixedArray,
    Renamed,
    StreamError,
    Struct,
    Subconstruct,
    this,
)
from construct.core import stream_write

from xreplay.abi.ports import MAX_VIRT_CPUS

MAGIC = b"XRREC\x00\r\n"  # \r\n catches text-mode mangling, as PNG's signature does
VERSION_MAJOR = 1
VERSION_MINOR = 1  # 1.1 added FrameKind.GUEST_TIME and the header's "replay" key

# -- bounds ---------------------------------------------------------------------------

MAX_META = 1 << 20  # header JSON
MAX_FRAME = 64 << 20  # one frame's payload
MAX_NOTE = 256 << 10  # one note's JSON (a 4096-port 'e' dump as text fits)
MAX_REGION = 16 << 20  # one recorded memory region
MAX_REGIONS = 255  # a region id is a u8
MAX_PROBES = 256
MAX_VCPUS = MAX_VIRT_CPUS  # vCPU ids are 0 .. MAX_VCPUS-1
MAX_KEYFRAME_INTERVAL = 1 << 20
MAX_NAME = 256  # characters of a probe or region name
MAX_VARINT_BYTES = 10  # a VarInt holds at most 64 bits
MAX_JSON_DEPTH = 32  # nesting of header and note JSON
MAX_NOTES = 10_000  # notes a reader keeps (a file may hold more; the rest are counted)

FRAME_MARK = 0xA5


class FrameKind(enum.IntEnum):
    """What a frame holds.  Readers skip kinds they do not know (a newer minor may add some)."""

    SNAPSHOT = 1
    NOTE = 2  # JSON: something that happened between snapshots (detach, foreign hits …)
    END = 3  # JSON trailer written by a clean close
    GUEST_TIME = 4  # 1.1: the guest position (QEMU icount) of a snapshot taken on a replay


class SnapshotFlags(enum.IntFlag):
    KEYFRAME = 1 << 0  # every region is stored whole: decoding may start here
    HANG = 1 << 1  # taken after the target stopped making progress (interrupted)
    HAVE_FLAGS = 1 << 2  # the `regflags` field holds the arch's flags register
    HAVE_SP = 1 << 3


SNAPSHOT_FLAGS_KNOWN = int(SnapshotFlags.KEYFRAME | SnapshotFlags.HANG
                           | SnapshotFlags.HAVE_FLAGS | SnapshotFlags.HAVE_SP)


class RegionEncoding(enum.IntEnum):
    FULL = 0  # data = the region's bytes
    DELTA = 1  # data = runs patched onto the region's previous contents (shorter than it)
    SAME = 2  # unchanged since the previous snapshot
    ABSENT = 3  # could not be read at this hit (kept as the previous contents)


# Short aliases, as the rest of the code has always spelt them.
KIND_SNAPSHOT, KIND_NOTE, KIND_END = FrameKind.SNAPSHOT, FrameKind.NOTE, FrameKind.END
KIND_GUEST_TIME = FrameKind.GUEST_TIME
FLAG_KEYFRAME, FLAG_HANG = SnapshotFlags.KEYFRAME, SnapshotFlags.HANG
FLAG_HAVE_FLAGS, FLAG_HAVE_SP = SnapshotFlags.HAVE_FLAGS, SnapshotFlags.HAVE_SP
ENC_FULL, ENC_DELTA, ENC_SAME, ENC_ABSENT = (RegionEncoding.FULL, RegionEncoding.DELTA,
                                             RegionEncoding.SAME, RegionEncoding.ABSENT)


class VarUInt64(Construct):
    """LEB128 unsigned integer (construct's ``VarInt`` on the wire) of at most 64 bits.

    construct's own ``VarInt`` reads without limit (a hostile run of 0x80 bytes costs
    quadratic time); this one stops after :data:`MAX_VARINT_BYTES`.
    """

    def _parse(self, stream, context, path):  # noqa: ANN001, ANN202 - construct's API
        read = stream.read
        num = shift = 0
        for _ in range(MAX_VARINT_BYTES):
            b = read(1)
            if not b:
                raise StreamError("stream ended inside a VarInt", path=path)
            byte = b[0]
            num |= (byte & 0x7F) << shift
            if byte < 0x80:
                if num >> 64:
                    break
                return num
            shift += 7
        raise IntegerError("VarInt longer than 64 bits", path=path)

    def _build(self, obj, stream, context, path):  # noqa: ANN001, ANN202
        if not isinstance(obj, int) or not 0 <= obj < 1 << 64:
            raise IntegerError(f"VarInt value {obj!r} is not a 64-bit unsigned int", path=path)
        out = bytearray()
        x = obj
        while x > 0x7F:
            out.append(0x80 | (x & 0x7F))
            x >>= 7
        out.append(x)
        stream_write(stream, bytes(out), len(out), path)
        return obj


VarInt = VarUInt64()

FileHeaderPrefix = Struct(
    "magic" / Const(MAGIC),
    "major" / Int16ul,
    "minor" / Int16ul,
    "meta_len" / Int32ul,
)
HEADER_PREFIX_SIZE = FileHeaderPrefix.sizeof()
HEADER_CRC_SIZE = 4

FrameHead = Struct(
    "mark" / Const(FRAME_MARK, Int8ul),
    "kind" / Enum(Int8ul, FrameKind),
    "length" / Int32ul,
)
FRAME_HEAD_SIZE = FrameHead.sizeof()
FRAME_CRC_SIZE = 4

Region = Struct(
    "region" / Int8ul,  # index into the header's "regions" list
    "encoding" / Enum(Int8ul, RegionEncoding),
    "data" / Prefixed(VarInt, GreedyBytes),
)

SnapshotPayload = Struct(
    "seq" / VarInt,
    "t_ns" / VarInt,  # host monotonic ns since the recording started
    "probe" / VarInt,  # index into the header's "probes" list
    "vcpu" / VarInt,
    "flags" / FlagsEnum(Int8ul, SnapshotFlags),
    "pc" / VarInt,
    "sp" / VarInt,
    "regflags" / VarInt,  # rflags/eflags on x86, cpsr/pstate on arm
    "regions" / PrefixedArray(Int8ul, Region),
)

# The fields before the regions: what a keyframe search reads of every snapshot.
SnapshotPrefix = Struct(*SnapshotPayload.subcons[:5])

DeltaRun = Struct(
    "skip" / VarInt,  # bytes left unchanged since the end of the previous run
    "data" / Prefixed(VarInt, GreedyBytes),
)
DeltaRuns = GreedyRange(DeltaRun)

# A frame as one declarative whole, used by the spec tests; the reader parses the head and
# payload separately so that it can bound `length` before reading it.
Frame = Struct(
    "head" / FrameHead,
    "payload" / Bytes(this.head.length),
    "crc" / Int32ul,
)


def _raw(sub: Construct) -> Construct:
    """The fixed-size field under names, constants and enum adapters."""
    while isinstance(sub, Renamed | Adapter | Subconstruct) and not isinstance(sub, FormatField):
        sub = sub.subcon
    return sub


def fixed_struct(st: Struct) -> struct.Struct:
    """A :mod:`struct` twin of a construct ``Struct`` of fixed-size integer fields.

    The same declaration, parsed at C speed: the reader unpacks every frame head with it
    (construct's compiled parser costs microseconds per call, a whole budget per snapshot).
    Constants and enums are checked by the caller against the declaration's values.
    """
    codes = []
    for sub in st.subcons:
        raw = _raw(sub)
        if isinstance(raw, FormatField):
            codes.append(raw.fmtstr[1:])
        elif isinstance(raw, Bytes):
            codes.append(f"{raw.sizeof()}s")
        else:
            raise TypeError(f"{sub.name}: not a fixed-size field")
    return struct.Struct("<" + "".join(codes))


frame_head_struct = fixed_struct(FrameHead)  # (mark, kind, length)
header_prefix_struct = fixed_struct(FileHeaderPrefix)  # (magic, major, minor, meta_len)

GuestTimePayload = Struct(
    "seq" / VarInt,  # the snapshot it belongs to
    "icount" / VarInt,  # instructions the guest had executed at that hit (QEMU replay)
)

snapshot_payload = SnapshotPayload.compile()
guest_time_payload = GuestTimePayload.compile()
snapshot_prefix = SnapshotPrefix.compile()
delta_run = DeltaRun.compile()
delta_runs = DeltaRuns.compile()
frame_head = FrameHead.compile()

# What a parser of these declarations may raise on hostile bytes besides ConstructError: the
# compiled parsers call struct.unpack and slice directly.
PARSE_ERRORS = (StreamError, struct.error, IndexError, ValueError, OverflowError)


_FLAG_BITS = tuple((f.name, int(f)) for f in SnapshotFlags)


def flags_value(parsed: dict) -> int:
    """The integer of a parsed ``FlagsEnum`` (unknown bits, from a newer minor, dropped)."""
    value = 0
    for name, bit in _FLAG_BITS:
        if parsed[name]:
            value |= bit
    return value


def frame_crc(kind: int, payload: bytes) -> int:
    """CRC32 over the kind, the little-endian length and the payload."""
    return zlib.crc32(payload, zlib.crc32(bytes([kind]) + len(payload).to_bytes(4, "little")))


def header_crc(prefix: bytes, meta: bytes) -> int:
    return zlib.crc32(meta, zlib.crc32(prefix))
