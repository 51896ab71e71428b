"""The ``.xrr`` recording format, declared with construct (spec: ``formats/xrr.md``).

A file is a checksummed header followed by checksummed frames.  Frames are
self-delimiting so that a file cut off mid-write reads back every complete frame; every
length read from a file is bounded before it is trusted.
"""

from __future__ import annotations

import zlib

from construct import (
    Bytes,
    Const,
    GreedyBytes,
    GreedyRange,
    Int8ul,
    Int16ul,
    Int32ul,
    Prefixed,
    PrefixedArray,
    Struct,
    VarInt,
    this,
)

MAGIC = b"XRREC\x00\r\n"  # \r\n catches text-mode mangling, as PNG's signature does
VERSION_MAJOR = 1
VERSION_MINOR = 1  # 1.1 added KIND_GUEST_TIME and the header's "replay" key

MAX_META = 1 << 20  # header JSON
MAX_FRAME = 64 << 20  # one frame's payload
MAX_REGION = 16 << 20  # one recorded memory region

FRAME_MARK = 0xA5

# Frame kinds.
KIND_SNAPSHOT = 1
KIND_NOTE = 2  # JSON: something that happened between snapshots (detach, foreign hits …)
KIND_END = 3  # JSON trailer written by a clean close
KIND_GUEST_TIME = 4  # the guest position (QEMU icount) of the snapshot just before it

# Snapshot flags.
FLAG_KEYFRAME = 1 << 0  # every region is stored whole: decoding may start here
FLAG_HANG = 1 << 1  # taken after the target stopped making progress (interrupted)
FLAG_HAVE_FLAGS = 1 << 2  # the `regflags` field holds the arch's flags register
FLAG_HAVE_SP = 1 << 3

# Region encodings.
ENC_FULL = 0  # data = the region's bytes
ENC_DELTA = 1  # data = runs patched onto the region's previous contents
ENC_SAME = 2  # unchanged since the previous snapshot
ENC_ABSENT = 3  # could not be read at this hit (kept as the previous contents)

FileHeaderPrefix = Struct(
    "magic" / Const(MAGIC),
    "major" / Int16ul,
    "minor" / Int16ul,
    "meta_len" / Int32ul,
)
HEADER_PREFIX_SIZE = FileHeaderPrefix.sizeof()

FrameHead = Struct(
    "mark" / Const(FRAME_MARK, Int8ul),
    "kind" / Int8ul,
    "length" / Int32ul,
)
FRAME_HEAD_SIZE = FrameHead.sizeof()
FRAME_CRC_SIZE = 4

Region = Struct(
    "region" / Int8ul,  # index into the header's "regions" list
    "encoding" / Int8ul,
    "data" / Prefixed(VarInt, GreedyBytes),
)

SnapshotPayload = Struct(
    "seq" / VarInt,
    "t_ns" / VarInt,  # host monotonic ns since the recording started
    "probe" / VarInt,  # index into the header's "probes" list
    "vcpu" / VarInt,
    "flags" / Int8ul,
    "pc" / VarInt,
    "sp" / VarInt,
    "regflags" / VarInt,  # rflags/eflags on x86, cpsr/pstate on arm
    "regions" / PrefixedArray(Int8ul, Region),
)

GuestTimePayload = Struct(
    "seq" / VarInt,  # the snapshot it belongs to
    "icount" / VarInt,  # instructions the guest had executed at that hit (QEMU replay)
)

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

snapshot_payload = SnapshotPayload.compile()
guest_time_payload = GuestTimePayload.compile()
delta_run = DeltaRun.compile()
delta_runs = DeltaRuns.compile()
frame_head = FrameHead.compile()


def frame_crc(kind: int, payload: bytes) -> int:
    """CRC32 over the kind, the little-endian length and the payload."""
    return zlib.crc32(payload, zlib.crc32(bytes([kind]) + len(payload).to_bytes(4, "little")))


def header_crc(prefix: bytes, meta: bytes) -> int:
    return zlib.crc32(meta, zlib.crc32(prefix))
