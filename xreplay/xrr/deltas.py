"""Snapshot frames decoded straight into one buffer per region, reporting what changed.

The replay reads a recording as a stream of byte-run deltas: most snapshots rewrite a few
bytes of a page.  :func:`decode_snapshot_v1` applies a frame's region encodings to the
live buffers (one ``bytearray`` per region) and returns a :class:`Hit` whose ``dirty``
lists the rewritten spans, so that a consumer decodes only the fields those spans touch
(see :mod:`xreplay.replay.observe`).  Hand-written rather than construct-parsed: this is
the replay's inner loop; ``xreplay/xrr/format.py`` stays the declaration it must agree
with (the spec tests check both on the same bytes).
"""

from __future__ import annotations

from xreplay.xrr import format as fmt


class Undecodable(Exception):  # noqa: N818 - internal; the reader turns it into XReplayError
    """A frame whose checksum is right but whose payload does not parse (says why)."""


class Hit:
    """One snapshot frame: where and when, and the region spans it rewrote.

    ``dirty`` holds ``(region, start, end)`` per rewritten span (a full encoding is the
    whole region); ``reset`` says the buffers were rebuilt from an earlier keyframe, so a
    consumer must decode everything (the first hit after a seek).
    """

    __slots__ = ("seq", "t_ns", "probe", "vcpu", "flags", "pc", "sp", "regflags", "offset",
                 "dirty", "reset")

    def __init__(self, seq: int, t_ns: int, probe: int, vcpu: int, flags: int, pc: int,
                 sp: int | None, regflags: int | None, dirty: list[tuple[int, int, int]]
                 ) -> None:
        self.seq = seq
        self.t_ns = t_ns
        self.probe = probe
        self.vcpu = vcpu
        self.flags = flags
        self.pc = pc
        self.sp = sp
        self.regflags = regflags
        self.dirty = dirty
        self.offset = 0
        self.reset = False

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & fmt.FLAG_KEYFRAME)

    @property
    def hang(self) -> bool:
        return bool(self.flags & fmt.FLAG_HANG)


def varint(b: bytes, i: int) -> tuple[int, int]:
    """LEB128 (construct's ``VarInt``) at ``b[i]``: (value, index after it)."""
    x = b[i]
    if x < 0x80:
        return x, i + 1
    value, shift = x & 0x7F, 7
    while True:
        i += 1
        x = b[i]
        value |= (x & 0x7F) << shift
        if x < 0x80:
            return value, i + 1
        shift += 7


def apply_runs(buf: bytearray, region: int, b: bytes, i: int, end: int,
               dirty: list[tuple[int, int, int]]) -> None:
    """Patch ``buf`` with the delta runs in ``b[i:end]`` (skip, length, bytes …)."""
    at = 0
    size = len(buf)
    while i < end:
        skip = b[i]  # one-byte varints inline: nearly every skip and length is one
        if skip < 0x80:
            i += 1
        else:
            skip, i = varint(b, i)
        n = b[i]
        if n < 0x80:
            i += 1
        else:
            n, i = varint(b, i)
        if i + n > end:
            raise Undecodable("undecodable delta")
        at += skip
        stop = at + n
        if stop > size:
            raise Undecodable("delta runs past the end of its region")
        buf[at:stop] = b[i:i + n]
        dirty.append((region, at, stop))
        at = stop
        i += n
    if i != end:
        raise Undecodable("undecodable delta")


def apply_region(bufs: list[bytearray | None], sizes: list[int], region: int, enc: int,
                 b: bytes, i: int, n: int, dirty: list[tuple[int, int, int]]) -> None:
    """One region's encoding (``n`` data bytes at ``b[i]``) onto its live buffer."""
    if region >= len(bufs):
        raise Undecodable(f"region {region} not declared in the header")
    if enc == fmt.ENC_DELTA:
        buf = bufs[region]
        if buf is None:
            raise Undecodable(f"delta for region {region} before any keyframe")
        apply_runs(buf, region, b, i, i + n, dirty)
    elif enc == fmt.ENC_FULL:
        if n != sizes[region]:
            raise Undecodable(f"region {region} has {n} bytes, not {sizes[region]}")
        bufs[region] = bytearray(b[i:i + n])
        dirty.append((region, 0, n))
    elif enc not in (fmt.ENC_SAME, fmt.ENC_ABSENT):
        raise Undecodable(f"unknown region encoding {enc}")


def decode_snapshot_v1(b: bytes, i: int, end: int, bufs: list[bytearray | None],
                       sizes: list[int]) -> Hit:
    """A version 1.0 snapshot payload ``b[i:end]`` (``format.SnapshotPayload``)."""
    try:
        seq, i = varint(b, i)
        t_ns, i = varint(b, i)
        probe = b[i]  # one-byte varints inline
        if probe < 0x80:
            i += 1
        else:
            probe, i = varint(b, i)
        vcpu = b[i]
        if vcpu < 0x80:
            i += 1
        else:
            vcpu, i = varint(b, i)
        flags = b[i]
        pc, i = varint(b, i + 1)
        sp = b[i]
        if sp < 0x80:
            i += 1
        else:
            sp, i = varint(b, i)
        regflags, i = varint(b, i)
        nregions = b[i]
        i += 1
        dirty: list[tuple[int, int, int]] = []
        for _ in range(nregions):
            region, enc, n = b[i], b[i + 1], b[i + 2]
            if n < 0x80:
                i += 3
            else:
                n, i = varint(b, i + 2)
            if enc == fmt.ENC_SAME and not n and region < len(bufs):
                continue
            if i + n > end:
                raise Undecodable("undecodable snapshot: region data past the frame's end")
            apply_region(bufs, sizes, region, enc, b, i, n, dirty)
            i += n
    except IndexError:
        raise Undecodable("undecodable snapshot: the payload ends early") from None
    if i > end:
        raise Undecodable("undecodable snapshot: the payload ends early")
    return Hit(seq, t_ns, probe, vcpu, flags, pc,
               sp if flags & fmt.FLAG_HAVE_SP else None,
               regflags if flags & fmt.FLAG_HAVE_FLAGS else None, dirty)
