"""Snapshot frames decoded straight into one buffer per region, reporting what changed.

The replay reads a recording as a stream of byte-run deltas: most snapshots rewrite a few
bytes of a page.  The decoders apply a frame's region encodings to the live buffers (one
``bytearray`` per region) and say which regions they rewrote, so that a consumer re-reads
only the fields of those regions (see :mod:`xreplay.replay.observe`).  Hand-written rather
than construct-parsed: this is the replay's inner loop; ``xreplay/xrr/format.py`` stays the
declaration it must agree with (the spec tests check both on the same bytes).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable

from xreplay.xrr import format as fmt

# Plain ints: IntEnum/IntFlag arithmetic runs in Python, per snapshot.
_FULL, _DELTA = int(fmt.ENC_FULL), int(fmt.ENC_DELTA)
_SAME, _ABSENT = int(fmt.ENC_SAME), int(fmt.ENC_ABSENT)
_HAVE_FLAGS, _HAVE_SP = int(fmt.FLAG_HAVE_FLAGS), int(fmt.FLAG_HAVE_SP)
_KEYFRAME, _HANG = int(fmt.FLAG_KEYFRAME), int(fmt.FLAG_HANG)
_KNOWN_FLAGS = fmt.SNAPSHOT_FLAGS_KNOWN
_MAX_VCPUS = fmt.MAX_VCPUS
_VARINT_SHIFT = 7 * (fmt.MAX_VARINT_BYTES - 1)


class Undecodable(Exception):  # noqa: N818 - internal; the reader turns it into XReplayError
    """A frame whose checksum is right but whose payload does not parse (says why)."""


class FlagsView:
    """``keyframe`` and ``hang`` of anything with a snapshot's ``flags`` (a :class:`Hit`,
    the reader's ``Record``)."""

    __slots__ = ()
    flags: int

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & _KEYFRAME)

    @property
    def hang(self) -> bool:
        return bool(self.flags & _HANG)


class Hit(FlagsView):
    """One snapshot frame: where and when, and the regions it rewrote.

    ``touched`` has bit *i* set when region *i* was rewritten (a full or delta encoding);
    ``unread`` bit *i* when region *i* could not be read at this hit (stored absent: its
    buffer holds older bytes) and ``missing`` (set by the reader) adds the regions never
    read so far; ``reset`` says the buffers were rebuilt from an earlier keyframe, so a
    consumer must decode everything (the first hit after a seek).
    """

    __slots__ = ("seq", "t_ns", "probe", "vcpu", "flags", "pc", "sp", "regflags", "offset",
                 "touched", "unread", "missing", "reset")

    def __init__(self, seq: int, t_ns: int, probe: int, vcpu: int, flags: int, pc: int,
                 sp: int | None, regflags: int | None, touched: int, unread: int = 0
                 ) -> None:
        self.seq = seq
        self.t_ns = t_ns
        self.probe = probe
        self.vcpu = vcpu
        self.flags = flags
        self.pc = pc
        self.sp = sp
        self.regflags = regflags
        self.touched = touched
        self.unread = unread
        self.missing = unread
        self.offset = 0
        self.reset = False


HitFields = tuple[int, int, int, int, int, int, "int | None", "int | None", int, int]
"""A decoded snapshot as the decoders return it: :class:`Hit`'s arguments in order (seq,
t_ns, probe, vcpu, flags, pc, sp, regflags, touched, unread).  A plain tuple, because
building an object per snapshot costs more than the decode of a typical few-byte delta; the
replay's inner loop unpacks it (:meth:`XrrReader.raw_deltas`), ``deltas()`` makes a Hit."""


def varint(b: bytes, i: int) -> tuple[int, int]:
    """LEB128 (``format.VarInt``, at most 64 bits) at ``b[i]``: (value, index after it)."""
    x = b[i]
    if x < 0x80:
        return x, i + 1
    value, shift = x & 0x7F, 7
    while True:
        i += 1
        x = b[i]
        value |= (x & 0x7F) << shift
        if x < 0x80:
            if value >> 64:
                raise Undecodable("undecodable snapshot: VarInt longer than 64 bits")
            return value, i + 1
        shift += 7
        if shift > _VARINT_SHIFT:
            raise Undecodable("undecodable snapshot: VarInt longer than 64 bits")


def apply_runs(buf: bytearray, b: bytes, i: int, end: int) -> tuple[int, int]:
    """Patch ``buf`` with the delta runs in ``b[i:end]`` (skip, length, bytes …); returns
    the span from the first byte rewritten to the end of the last (the hull)."""
    at = 0
    first = -1
    size = len(buf)
    while i < end:
        skip = b[i]  # short varints inline: nearly every skip is one or two bytes
        if skip < 0x80:
            i += 1
        elif b[i + 1] < 0x80:
            skip = (skip & 0x7F) | b[i + 1] << 7
            i += 2
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
        if first < 0:
            first = at
        if n == 1 and at < size:  # most runs are one byte (a bit, a flag): no slices
            buf[at] = b[i]
            at += 1
            i += 1
            continue
        stop = at + n
        if stop > size:
            raise Undecodable("delta runs past the end of its region")
        buf[at:stop] = b[i:i + n]
        at = stop
        i += n
    if i != end:
        raise Undecodable("undecodable delta")
    return (first, at) if first >= 0 else (0, 0)


def apply_region(bufs: list[bytearray | None], sizes: list[int], region: int, enc: int,
                 b: bytes, i: int, n: int, hulls: list[tuple[int, int]]) -> bool:
    """One region's encoding (``n`` data bytes at ``b[i]``) onto its live buffer; True if
    it rewrote the region (full or delta), its hull then in ``hulls[region]``."""
    if region >= len(bufs):
        raise Undecodable(f"region {region} not declared in the header")
    if enc == _DELTA:
        buf = bufs[region]
        if buf is None:
            raise Undecodable(f"delta for region {region} before any keyframe")
        if n >= sizes[region]:
            raise Undecodable(f"delta for region {region} is not shorter than it")
        hulls[region] = apply_runs(buf, b, i, i + n)
        return True
    if enc == _FULL:
        if n != sizes[region]:
            raise Undecodable(f"region {region} has {n} bytes, not {sizes[region]}")
        bufs[region] = bytearray(b[i:i + n])
        hulls[region] = (0, n)
        return True
    if enc in (_SAME, _ABSENT):
        if n:
            name = "same" if enc == _SAME else "absent"
            raise Undecodable(f"region {region} is {name} but carries data")
        return False
    raise Undecodable(f"unknown region encoding {enc}")


def snapshot_prefix_v1(b: bytes, i: int, end: int) -> tuple[int, int]:
    """(seq, flags) of a version 1.0 snapshot payload ``b[i:end]`` (a keyframe search)."""
    try:
        seq, i = varint(b, i)
        for _ in range(3):  # t_ns, probe, vcpu
            _, i = varint(b, i)
        flags = b[i]
    except IndexError:
        raise Undecodable("undecodable snapshot: the payload ends early") from None
    if i >= end:
        raise Undecodable("undecodable snapshot: the payload ends early")
    return seq, flags & _KNOWN_FLAGS


def probe_vcpu(b: bytes, i: int, nprobes: int) -> tuple[int, int, int]:
    """A snapshot's probe and vCPU VarInts at ``b[i]`` (both layouts), checked against the
    header and the ABI: (probe, vcpu, index after them)."""
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
    if probe >= nprobes:
        raise Undecodable(f"probe {probe} not declared in the header")
    if vcpu >= _MAX_VCPUS:
        raise Undecodable(f"vCPU {vcpu} beyond the ABI's {_MAX_VCPUS}")
    return probe, vcpu, i


def decode_snapshot_v1(b: bytes, i: int, end: int, bufs: list[bytearray | None],
                       sizes: list[int], nprobes: int, hulls: list[tuple[int, int]]
                       ) -> HitFields:
    """A version 1.0 snapshot payload ``b[i:end]`` (``format.SnapshotPayload``), checked
    against the format's bounds as the construct declaration is."""
    try:
        seq, i = varint(b, i)
        t_ns, i = varint(b, i)
        probe, vcpu, i = probe_vcpu(b, i, nprobes)
        flags = b[i] & _KNOWN_FLAGS  # unknown bits (a newer minor) dropped
        pc, i = varint(b, i + 1)
        sp = b[i]
        if sp < 0x80:
            i += 1
        else:
            sp, i = varint(b, i)
        regflags, i = varint(b, i)
        nregions = b[i]
        i += 1
        touched = seen = unread = 0
        nbufs = len(bufs)
        for _ in range(nregions):
            region, enc, n = b[i], b[i + 1], b[i + 2]
            if n < 0x80:
                i += 3
            else:
                n, i = varint(b, i + 2)
            if seen >> region & 1:
                raise Undecodable(f"region {region} stored twice")
            seen |= 1 << region
            if enc == _SAME and not n and region < nbufs:
                continue
            if i + n > end:
                raise Undecodable("undecodable snapshot: region data past the frame's end")
            if apply_region(bufs, sizes, region, enc, b, i, n, hulls):
                touched |= 1 << region
            elif enc == _ABSENT:
                unread |= 1 << region
            i += n
    except IndexError:
        raise Undecodable("undecodable snapshot: the payload ends early") from None
    if i > end:
        raise Undecodable("undecodable snapshot: the payload ends early")
    return (seq, t_ns, probe, vcpu, flags, pc, sp if flags & _HAVE_SP else None,
            regflags if flags & _HAVE_FLAGS else None, touched, unread)


# --------------------------------------------------------------------------- version 2.0


def uvarint(x: int) -> bytes:
    """``format.VarInt`` bytes of ``x`` (0 <= x < 2**64)."""
    if 0 <= x < 0x80:
        return _ONE_BYTE[x]
    if not 0 <= x < 1 << 64:
        raise ValueError(f"{x!r} is not a 64-bit unsigned int")
    out = bytearray()
    while x > 0x7F:
        out.append(0x80 | (x & 0x7F))
        x >>= 7
    out.append(x)
    return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def zigzag(x: int) -> int:
    return x << 1 if x >= 0 else (-x << 1) - 1


def unzigzag(x: int) -> int:
    return x >> 1 if not x & 1 else -((x + 1) >> 1)


class SnapshotCodecV2:
    """What a 2.0 snapshot leaves implicit, kept on both sides of the file: the previous
    sequence number and time, and each probe's registers since the last keyframe."""

    __slots__ = ("seq", "t_ns", "regs", "ncodes")

    def __init__(self, nregions: int) -> None:
        self.seq = -1  # no keyframe seen yet
        self.t_ns = 0
        self.regs: dict[int, tuple[int, int | None, int | None]] = {}
        self.ncodes = (nregions + 3) // 4

    def encode(self, seq: int, t_ns: int, probe: int, vcpu: int, flags: int, pc: int,
               sp: int | None, regflags: int | None, codes: int,
               data: list[bytes]) -> bytes:
        """A snapshot payload; ``codes`` holds each region's encoding at bits 2i..2i+1."""
        keyframe = flags & _KEYFRAME
        regs = (pc, sp, regflags)
        if keyframe:
            head = uvarint(seq) + uvarint(zigzag(t_ns))
        else:
            head = uvarint(zigzag(t_ns - self.t_ns))
            if self.regs.get(probe) == regs:
                flags |= _REPEAT
        out = [_ONE_BYTE[flags], head, uvarint(probe), uvarint(vcpu)]
        if not flags & _REPEAT:
            out.append(uvarint(pc))
            if sp is not None:
                out.append(uvarint(sp))
            if regflags is not None:
                out.append(uvarint(regflags))
        out.append(codes.to_bytes(self.ncodes, "little"))
        for d in data:
            out.append(uvarint(len(d)))
            out.append(d)
        payload = b"".join(out)
        # the state moves only once the payload is built (a bad register raised above)
        if keyframe:
            self.regs.clear()
        self.regs[probe] = regs
        self.seq, self.t_ns = seq, t_ns
        return payload

    def decode(self, b: bytes, i: int, end: int, bufs: list[bytearray | None],
               sizes: list[int], nprobes: int, hulls: list[tuple[int, int]]) -> HitFields:
        """A 2.0 snapshot payload ``b[i:end]`` (``format.SnapshotPayloadV2``) applied to
        ``bufs``; ``hulls[r]``: the span it rewrote in each region it touched.  The replay's
        inner loop: one- and two-byte VarInts are read inline, the rest by :func:`varint`."""
        try:
            flags = b[i]
            if flags & ~_KNOWN_FLAGS_V2:
                raise Undecodable(f"undecodable snapshot: unknown flags {flags:#x}")
            if flags & _KEYFRAME:
                seq, i = varint(b, i + 1)
                t, i = varint(b, i)
                t_ns = unzigzag(t)
                self.regs.clear()
            else:
                seq = self.seq + 1
                if not seq:
                    raise Undecodable("a delta snapshot before any keyframe")
                t = b[i + 1]
                if t < 0x80:
                    i += 2
                elif b[i + 2] < 0x80:
                    t = (t & 0x7F) | b[i + 2] << 7
                    i += 3
                else:
                    t, i = varint(b, i + 1)
                t_ns = self.t_ns + (t >> 1 if not t & 1 else -((t + 1) >> 1))  # unzigzag
            if t_ns < 0:
                raise Undecodable("undecodable snapshot: time before the recording began")
            probe, vcpu = b[i], b[i + 1]
            if probe < 0x80 and vcpu < 0x80 and probe < nprobes:  # one byte each, in bounds
                i += 2
            else:
                probe, vcpu, i = probe_vcpu(b, i, nprobes)
            if flags & _REPEAT:
                regs = self.regs.get(probe)
                if regs is None:
                    raise Undecodable(f"registers repeated from no earlier hit of probe {probe}")
                pc, sp, regflags = regs
            else:
                pc, i = varint(b, i)
                sp = regflags = None
                if flags & _HAVE_SP:
                    sp, i = varint(b, i)
                if flags & _HAVE_FLAGS:
                    regflags, i = varint(b, i)
                self.regs[probe] = (pc, sp, regflags)
            ncodes = self.ncodes
            codes = b[i] if ncodes == 1 else int.from_bytes(b[i:i + ncodes], "little")
            i += ncodes
            touched = unread = 0
            region = 0
            nbufs = len(bufs)
            while codes:  # unused high codes are 0 (same)
                code = codes & 3
                if code == CODE_DELTA:
                    n = b[i]
                    if n < 0x80:
                        i += 1
                    else:
                        n, i = varint(b, i)
                    buf = bufs[region] if region < nbufs else None
                    if buf is None or n >= sizes[region] or i + n > end:
                        if i + n > end:
                            raise Undecodable("undecodable snapshot: region data past the "
                                              "frame's end")
                        apply_region(bufs, sizes, region, _DELTA, b, i, n, hulls)  # raises
                    hulls[region] = apply_runs(buf, b, i, i + n)
                    touched |= 1 << region
                    i += n
                elif code == CODE_FULL:
                    n, i = varint(b, i)
                    if i + n > end:
                        raise Undecodable("undecodable snapshot: region data past the frame's "
                                          "end")
                    if region >= nbufs:
                        raise Undecodable(f"region {region} not declared in the header")
                    bufs[region] = inflate(b[i:i + n], sizes[region], region)
                    hulls[region] = (0, sizes[region])
                    touched |= 1 << region
                    i += n
                elif region >= nbufs:
                    raise Undecodable(f"region {region} not declared in the header")
                elif code == CODE_ABSENT:
                    unread |= 1 << region
                codes >>= 2
                region += 1
        except IndexError:
            raise Undecodable("undecodable snapshot: the payload ends early") from None
        if i != end:
            raise Undecodable("undecodable snapshot: its length disagrees with its fields")
        self.seq, self.t_ns = seq, t_ns
        return (seq, t_ns, probe, vcpu, flags & _KNOWN_FLAGS, pc, sp, regflags, touched,
                unread)

    def prefix(self, b: bytes, i: int, end: int) -> tuple[int, int]:
        """(seq, flags) of a 2.0 snapshot for a keyframe search (no region decoded)."""
        try:
            flags = b[i]
            seq = varint(b, i + 1)[0] if flags & _KEYFRAME else self.seq + 1
        except IndexError:
            raise Undecodable("undecodable snapshot: the payload ends early") from None
        self.seq = seq
        return seq, flags


def inflate(data: bytes, size: int, region: int) -> bytearray:
    """A 2.0 full region: a zlib stream of exactly ``size`` bytes (never more decoded)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size + 1)
    except zlib.error:
        raise Undecodable(f"region {region}: undecodable zlib data") from None
    if len(out) != size or not d.eof or d.unused_data or d.unconsumed_tail:
        raise Undecodable(f"region {region}: its zlib data is not exactly {size} bytes")
    return bytearray(out)


def deflate(data: bytes) -> bytes:
    return zlib.compress(data, 6)


_REPEAT = int(fmt.FLAG_REPEAT_REGS)
CODE_SAME, CODE_DELTA, CODE_FULL, CODE_ABSENT = (int(fmt.V2_CODES[e]) for e in (
    fmt.ENC_SAME, fmt.ENC_DELTA, fmt.ENC_FULL, fmt.ENC_ABSENT))
_KNOWN_FLAGS_V2 = fmt.SNAPSHOT_FLAGS_KNOWN_V2
assert _MAX_VCPUS >= 0x80  # decode's one-byte fast path needs no bound check on the vCPU


def _compiled_codec() -> type | None:
    """The compiled twin of :meth:`SnapshotCodecV2.decode` (``_fastdelta.c``), or None where
    it was not built or ``XREPLAY_PURE_PYTHON=1`` asks for the reference alone."""
    if os.environ.get("XREPLAY_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from xreplay.xrr._fastdelta import DeltaCodecV2
    except ImportError:
        return None
    return DeltaCodecV2


_COMPILED = _compiled_codec()
#: which 2.0 snapshot decoder the replay runs: "compiled" or "python" (the reference)
decoder_kind = "compiled" if _COMPILED is not None else "python"


def decoder_v2(nregions: int) -> Callable[..., HitFields]:
    """A 2.0 snapshot decoder with :meth:`SnapshotCodecV2.decode`'s signature and results:
    the compiled one where it is built (it hands every frame it does not take, errors
    included, to a :class:`SnapshotCodecV2` it shares its state with), else that codec."""
    codec = SnapshotCodecV2(nregions)
    if _COMPILED is None:
        return codec.decode
    return _COMPILED(codec).decode


def encode_runs(prev: bytes, cur: bytes) -> bytes:
    """Delta runs (``format.DeltaRuns``) that turn ``prev`` into ``cur``, merging runs
    separated by up to :data:`RUN_GAP` - 1 unchanged bytes (a run costs two bytes of head).

    The recorder's hot path (one call per region per hit): blocks that compare equal are
    skipped at memcmp speed, and only a changed block's XOR is scanned, with ``bytes.find``
    rather than a regular expression (8 ns a byte).  :func:`encode_runs_reference` states
    the same runs as a regular expression over the whole XOR; the tests hold the two equal.
    """
    out = []
    end = 0  # where the previous run stopped (bytes after it are unchanged up to `start`)
    runs: list[list[int]] = []
    for a in range(0, len(cur), _BLOCK):
        b = a + _BLOCK
        c = cur[a:b]
        p = prev[a:b]
        if p == c:
            continue
        t = (int.from_bytes(p, "little") ^ int.from_bytes(c, "little")).to_bytes(
            len(c), "little").translate(_NONZERO)
        i = t.find(1)
        last = t.rfind(1) + 1
        while i >= 0:
            j = t.find(_GAP, i, last)
            if j < 0:
                j = last
            if runs and a + i - runs[-1][1] < RUN_GAP:
                runs[-1][1] = a + j  # across a block boundary: the same run
            else:
                runs.append([a + i, a + j])
            i = t.find(1, j)
    for start, stop in runs:
        out.append(uvarint(start - end))
        out.append(uvarint(stop - start))
        out.append(cur[start:stop])
        end = stop
    return b"".join(out)


def encode_runs_reference(prev: bytes, cur: bytes) -> bytes:
    """:func:`encode_runs` as one regular expression over the XOR (slow; for the tests)."""
    diff = (int.from_bytes(prev, "little") ^ int.from_bytes(cur, "little")).to_bytes(
        len(cur), "little")
    out = []
    end = 0
    for m in _RUN.finditer(diff):
        start, stop = m.span()
        out.append(uvarint(start - end))
        out.append(uvarint(stop - start))
        out.append(cur[start:stop])
        end = stop
    return b"".join(out)


#: unchanged bytes that end a run: fewer are stored inside the run (cheaper than a new head)
RUN_GAP = 5
_RUN = re.compile(rb"[^\x00]+(?:\x00{1,%d}[^\x00]+)*" % (RUN_GAP - 1))
_GAP = bytes(RUN_GAP)
_NONZERO = bytes((0,)) + bytes((1,)) * 255  # translate: each changed byte becomes 1
_BLOCK = 256  # bytes compared at a time; a changed block is scanned
