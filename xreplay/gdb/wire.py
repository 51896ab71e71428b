"""The agent <-> recorder wire format, declared once for both sides.

Standard library only: gdb loads this file into its own (system) Python next to
:mod:`xreplay.gdb.agent`, and the recorder imports it as ``xreplay.gdb.wire``.

One message per frame, little-endian: ``u32 length`` (of the type byte and the body),
``u8 type``, body.

* ``S`` (snapshot): ``<IHHQQQB`` = hit number, probe index, vCPU, pc, sp, flags register,
  :data:`HAVE_SP` / :data:`HAVE_FLAGS` / :data:`HANG` bits; then ``u8`` region count and,
  per region, ``u32`` size (:data:`UNREADABLE` = the read failed) and the bytes.
* ``J``: a UTF-8 JSON object (hello, region moves, counters, errors).
* ``T`` (guest time, only on a QEMU replay): ``<IQ`` = hit number, icount; sent right after
  the hit's ``S``.
"""

import struct

FRAME = struct.Struct("<IB")
SNAPSHOT = struct.Struct("<IHHQQQB")
REGION = struct.Struct("<I")
SNAPSHOT_KIND = ord("S")
JSON_KIND = ord("J")
TIME_KIND = ord("T")
TIME = struct.Struct("<IQ")
UNREADABLE = 0xFFFFFFFF
# Bits of the snapshot's own flags byte (the wire's, not the .xrr file's).
HANG = 1
HAVE_SP = 2
HAVE_FLAGS = 4


def frame(kind, body):
    """One framed message."""
    return FRAME.pack(len(body) + 1, kind) + body


def pack_snapshot(hit, probe, vcpu, pc, sp, regflags, hang, regions):
    """The body of an ``S`` message; ``sp``/``regflags`` None when not read."""
    bits = (HANG if hang else 0) | (HAVE_SP if sp is not None else 0) | (
        HAVE_FLAGS if regflags is not None else 0)
    parts = [SNAPSHOT.pack(hit, probe, vcpu, pc, sp or 0, regflags or 0, bits),
             bytes([len(regions)])]
    for data in regions:
        if data is None:
            parts.append(REGION.pack(UNREADABLE))
        else:
            parts.append(REGION.pack(len(data)))
            parts.append(data)
    return b"".join(parts)


def unpack_snapshot(body):
    """``(hit, probe, vcpu, pc, sp, regflags, hang, regions)`` from an ``S`` body.

    Raises ValueError on a body that does not hold what it declares.
    """
    try:
        hit, probe, vcpu, pc, sp, regflags, bits = SNAPSHOT.unpack_from(body)
        at = SNAPSHOT.size
        n = body[at]
        at += 1
        regions = []
        for _ in range(n):
            (size,) = REGION.unpack_from(body, at)
            at += REGION.size
            if size == UNREADABLE:
                regions.append(None)
                continue
            if at + size > len(body):
                raise ValueError("region runs past the message")
            regions.append(body[at:at + size])
            at += size
    except (struct.error, IndexError) as e:
        raise ValueError(f"truncated snapshot message: {e}") from None
    return (hit, probe, vcpu, pc, sp if bits & HAVE_SP else None,
            regflags if bits & HAVE_FLAGS else None, bool(bits & HANG), regions)
