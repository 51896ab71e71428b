"""Streaming ``.xrr`` reader: constant memory, bounded lengths, a torn tail is a warning.

Follows the shape of pyelftools' readers: ``XrrReader(path)`` or ``XrrReader(stream)`` (as
``ELFFile(stream)``), the file stays open and records are decoded lazily, one frame at a
time.  A file cut off mid-frame (a killed recorder, a full disk) yields every complete
snapshot and then reports the torn tail in :attr:`problems`; damage before the last frame is
a :class:`~xreplay.errors.RecordingFormatError` that names the byte offset, raised after the
intact snapshots before it have been yielded.

Every recording is a stranger's file: the header is checked against the arch's ABI when it
is read (:meth:`RecordingHeader.from_json`), every frame against the format's bounds, and
anything the parsers raise on hostile bytes becomes one ``RecordingFormatError``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from construct import ConstructError

from xreplay.abi.fifo import MAX_EVENT_ARRAY_PAGES
from xreplay.errors import RecordingFormatError, UsageError, XReplayError
from xreplay.snapshot import FifoState, Snapshot, SnapshotDecoder, VcpuState
from xreplay.xrr import format as fmt
from xreplay.xrr.deltas import (
    FlagsView,
    Hit,
    HitFields,
    SnapshotCodecV2,
    Undecodable,
    decode_snapshot_v1,
    decoder_v2,
    snapshot_prefix_v1,
)
from xreplay.xrr.header import (
    PAGE_COUNT_KIND,
    PAGE_COUNT_SIZE,
    RecordingHeader,
    parse_json_object,
)

_CHUNK = 1 << 18  # bytes read at a time
_CRC32_RESIDUE = 0x2144DF1C  # zlib.crc32(data + zlib.crc32(data).to_bytes(4, "little"))
# Plain ints: IntFlag arithmetic runs in Python, per snapshot.
_KEYFRAME, _HANG = int(fmt.FLAG_KEYFRAME), int(fmt.FLAG_HANG)
_HAVE_FLAGS, _HAVE_SP = int(fmt.FLAG_HAVE_FLAGS), int(fmt.FLAG_HAVE_SP)
_KIND_SNAPSHOT, _KIND_NOTE, _KIND_END = (int(fmt.KIND_SNAPSHOT), int(fmt.KIND_NOTE),
                                         int(fmt.KIND_END))


@dataclass(slots=True)
class Record(FlagsView):
    """One stored snapshot with its memory regions rebuilt (header order; None = unread)."""

    seq: int
    t_ns: int
    probe: int
    vcpu: int
    flags: int
    pc: int
    sp: int | None
    regflags: int | None
    regions: list[bytes | None]
    offset: int  # byte offset of the frame in the file
    changed: list[bool]  # which regions differ from the previous record
    unread: int = 0  # bit i: region i could not be read at this hit (its bytes are older)


@dataclass(frozen=True, slots=True)
class Note:
    """A non-snapshot event stored between snapshots."""

    after: int  # number of snapshots before it
    data: dict[str, Any]


@dataclass
class _Index:
    """What one pass over every frame learns: computed once, shared by later passes."""

    notes: list[Note] = field(default_factory=list)
    trailer: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    damage: RecordingFormatError | None = None  # where reading had to stop
    dropped_notes: int = 0
    torn_at: int | None = None  # where a torn tail begins


class XrrReader:
    """Read a recording: ``XrrReader(path)`` or ``XrrReader(binary_stream, name=...)``.

    The header is validated at once.  :attr:`problems`, :attr:`notes`, :attr:`trailer` and
    :attr:`damage` come from one pass over the frames, made on first use (or by the first
    full iteration) and not repeated.
    """

    def __init__(self, source: str | os.PathLike | BinaryIO, name: str | None = None) -> None:
        self._own = not hasattr(source, "read")
        if self._own:
            self.name = str(source) if name is None else name
            self.path: Path | None = Path(source)  # type: ignore[arg-type]
            try:
                self._f: BinaryIO = open(source, "rb")  # type: ignore[arg-type]  # noqa: SIM115
            except OSError as e:
                raise RecordingFormatError(f"{source}: cannot open recording ({e.strerror})",
                                           file=self.name) from None
        else:
            stream: Any = source
            self.name = name or str(getattr(stream, "name", "<stream>"))
            self.path = Path(self.name) if isinstance(getattr(stream, "name", None), str) \
                else None
            if not (hasattr(stream, "seekable") and stream.seekable()):
                raise UsageError(f"{self.name}: a recording stream must be seekable "
                                 "(read a pipe into io.BytesIO first)")
            self._f = stream
        self._index: _Index | None = None
        try:
            self.header = self._read_header()
        except BaseException:
            self.close()
            raise
        self._decoder = SnapshotDecoder(self.header.arch)
        self._probe_names = [p.name for p in self.header.probes]
        self._sizes = [r.size for r in self.header.regions]
        self._vcpu_plan = self._plan_vcpus()
        self._page_count_index = next((i for i, r in enumerate(self.header.regions)
                                       if r.kind == PAGE_COUNT_KIND), None)

    # -- header ---------------------------------------------------------------------

    def _bad(self, offset: int | None, why: str) -> RecordingFormatError:
        return RecordingFormatError(f"{self.name}: {why}", file=self.name, offset=offset)

    def _read_header(self) -> RecordingHeader:
        f = self._f
        f.seek(0)
        raw = f.read(fmt.HEADER_PREFIX_SIZE)
        if len(raw) < len(fmt.MAGIC) or not raw.startswith(fmt.MAGIC):
            raise self._bad(0, "not an xreplay recording (bad magic)")
        if len(raw) < fmt.HEADER_PREFIX_SIZE:
            raise self._bad(0, "file ends inside the header")
        _magic, major, minor, meta_len = fmt.header_prefix_struct.unpack(raw)
        if major not in fmt.READABLE_MAJORS:
            reads = " and ".join(f"{m}.x" for m in fmt.READABLE_MAJORS)
            raise self._bad(8, f"format version {major}.{minor} is not supported "
                            f"(this xreplay reads {reads}): upgrade xreplay")
        self.version = (major, minor)
        if meta_len > fmt.MAX_META:
            raise self._bad(12, f"header claims {meta_len} bytes of metadata, more than the "
                            f"format allows ({fmt.MAX_META}): the file is corrupt")
        meta = f.read(meta_len)
        crc = f.read(fmt.HEADER_CRC_SIZE)
        if len(meta) < meta_len or len(crc) < fmt.HEADER_CRC_SIZE:
            raise self._bad(0, "file ends inside the header")
        if fmt.header_crc(raw[len(fmt.MAGIC):], meta) != int.from_bytes(crc, "little"):
            raise self._bad(0, "header checksum mismatch: the file is corrupt")
        doc = parse_json_object(meta, "header metadata", self.name, fmt.HEADER_PREFIX_SIZE)
        self._data_start = f.tell()
        return RecordingHeader.from_json(doc, self.name)

    def _plan_vcpus(self) -> list[tuple[int, int | None]]:
        """(vCPU, its vcpu_info region or None) for each header vCPU a snapshot can decode.

        A vCPU with neither a registered vcpu_info region nor a slot in
        ``shared_info.vcpu_info[XEN_LEGACY_MAX_VCPUS]`` has nothing to decode; leaving it
        out here keeps the cost of a snapshot independent of the header's vCPU list.
        """
        registered = {r.vcpu: i for i, r in enumerate(self.header.regions)
                      if r.kind == "vcpu_info" and r.vcpu is not None}
        legacy = self._decoder.structs.legacy_max_vcpus
        return [(v, registered.get(v)) for v in self.header.vcpus
                if v in registered or v < legacy]

    @property
    def decoded_vcpus(self) -> list[int]:
        """The header's vCPUs whose ``vcpu_info`` a snapshot holds (in header order)."""
        return [v for v, _ in self._vcpu_plan]

    # -- frames ---------------------------------------------------------------------

    def _size(self) -> int:
        f = self._f
        try:
            return os.fstat(f.fileno()).st_size
        except (OSError, AttributeError, ValueError):
            here = f.tell()
            end = f.seek(0, os.SEEK_END)
            f.seek(here)
            return end

    def _frames(self, start: int | None, index: _Index | None
                ) -> Iterator[tuple[int, int, bytes, int, int]]:
        """(offset, kind, buffer, start, end) of each intact frame, its payload being
        ``buffer[start:end]``; stops at a torn tail or damage.  Reads in large chunks.

        With ``index`` (the first pass from the first frame), torn tails, damage, notes and
        the trailer are collected into it.  Later passes stop at the damage that pass found
        (a bad note, an undecodable snapshot) without parsing notes again.
        """
        if self.version[0] >= 2:
            return self._frames_v2(start, index)
        return self._frames_v1(start, index)

    def _frames_begin(self, start: int | None, index: _Index | None
                      ) -> tuple[BinaryIO, int, RecordingFormatError | None, int]:
        """(file, offset of the first frame, the damage a completed first pass found and
        its offset, or -1): a later pass stops there without parsing it again."""
        pos = self._data_start if start is None else start
        self._f.seek(pos)
        known = self._index.damage if index is None and self._index is not None else None
        stop = known.offset if known is not None and known.offset is not None else -1
        return self._f, pos, known, stop

    def _frames_v1(self, start: int | None, index: _Index | None
                   ) -> Iterator[tuple[int, int, bytes, int, int]]:
        f, pos, known, stop = self._frames_begin(start, index)
        head_size, crc_size = fmt.FRAME_HEAD_SIZE, fmt.FRAME_CRC_SIZE
        mark, max_frame = fmt.FRAME_MARK, fmt.MAX_FRAME
        crc32, from_bytes = zlib.crc32, int.from_bytes
        buf = b""
        i = 0  # buf[i] is the byte at file offset pos
        while True:
            if pos == stop:
                raise known  # type: ignore[misc]
            if len(buf) - i < head_size:
                buf = buf[i:] + f.read(_CHUNK)
                i = 0
                if not buf:
                    return
                if len(buf) < head_size:
                    self._torn(index, pos)
                    return
            length = from_bytes(buf[i + 2:i + 6], "little")  # FrameHead: mark, kind, length
            if buf[i] != mark or length > max_frame:
                self._damaged(index, pos, "bad frame marker or length")
                return
            end = i + head_size + length + crc_size
            if end > len(buf):
                buf = buf[i:]
                end -= i
                i = 0
                buf += f.read(max(_CHUNK, end - len(buf)))
                if end > len(buf):
                    self._torn(index, pos)
                    return
            # frame_crc: CRC-32 over kind, length and payload, contiguous after the mark
            if crc32(buf[i + 1:end - crc_size]) != from_bytes(buf[end - crc_size:end], "little"):
                if end == len(buf) and not f.read(1):
                    # the last frame: written partly, e.g. by a dying recorder
                    self._torn(index, pos)
                    return
                self._damaged(index, pos, "checksum mismatch")
                return
            kind = buf[i + 1]
            if index is not None and kind in (_KIND_NOTE, _KIND_END):
                try:
                    self._index_json(index, pos, kind, buf[i + head_size:end - crc_size])
                except RecordingFormatError as e:
                    index.damage = e
                    return
            yield pos, kind, buf, i + head_size, end - crc_size
            pos += end - i
            i = end

    def _frames_v2(self, start: int | None, index: _Index | None
                   ) -> Iterator[tuple[int, int, bytes, int, int]]:
        """2.0 frames: head byte (mark nibble, kind), VarInt length, payload, CRC-32 of all
        three."""
        f, pos, known, stop = self._frames_begin(start, index)
        crc_size, max_frame = fmt.FRAME_CRC_SIZE, fmt.MAX_FRAME
        mark, max_kind = fmt.FRAME_MARK_V2, fmt.MAX_FRAME_KIND_V2
        crc32 = zlib.crc32
        longest_head = 1 + 5  # a VarInt of MAX_FRAME takes at most 4 bytes; 5 is damage
        buf = b""
        i = 0  # buf[i] is the byte at file offset pos
        while True:
            if pos == stop:
                raise known  # type: ignore[misc]
            if len(buf) - i < longest_head:
                buf = buf[i:] + f.read(_CHUNK)
                i = 0
                if not buf:
                    return
            head = buf[i]
            if head & 0xF0 != mark:
                self._damaged(index, pos, "bad frame marker")
                return
            length = buf[i + 1] if i + 1 < len(buf) else 0x80
            if length < 0x80:  # a one-byte length: most frames
                j, shift = i + 2, 0
            else:
                length = shift = 0
                j = i + 1
                while True:
                    if j >= len(buf):  # the file ends inside the length
                        self._torn(index, pos)
                        return
                    x = buf[j]
                    j += 1
                    length |= (x & 0x7F) << shift
                    if x < 0x80:
                        break
                    shift += 7
                    if shift > 28:
                        break
            if shift > 28 or length > max_frame:
                self._damaged(index, pos, "bad frame length")
                return
            end = j + length + crc_size
            if end > len(buf):
                buf = buf[i:]
                end -= i
                j -= i
                i = 0
                buf += f.read(max(_CHUNK, end - len(buf)))
                if end > len(buf):
                    self._torn(index, pos)
                    return
            # A CRC-32 over its data followed by itself (little-endian) is always the residue.
            if crc32(buf[i:end]) != _CRC32_RESIDUE:
                if end == len(buf) and not f.read(1):
                    self._torn(index, pos)  # the last frame, written partly
                    return
                self._damaged(index, pos, "checksum mismatch")
                return
            kind = head & max_kind
            if index is not None and kind in (_KIND_NOTE, _KIND_END):
                try:
                    self._index_json(index, pos, kind, buf[j:end - crc_size])
                except RecordingFormatError as e:
                    index.damage = e
                    return
            yield pos, kind, buf, j, end - crc_size
            pos += end - i
            i = end

    def _index_json(self, index: _Index, pos: int, kind: int, payload: bytes) -> None:
        what = "note" if kind == _KIND_NOTE else "end trailer"
        if len(payload) > fmt.MAX_NOTE:
            raise self._bad(pos, f"{what} at byte {pos} holds {len(payload)} bytes, more than "
                            f"the format allows ({fmt.MAX_NOTE}): the file is corrupt")
        data = parse_json_object(payload, what, self.name, pos)
        if kind == _KIND_END:
            index.trailer = data
            return
        after = data.get("after", 0)
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 1 << 63:
            raise self._bad(pos, f"note at byte {pos} has a bad 'after' ({str(after)[:20]!r}): "
                            "the file is corrupt")
        if len(index.notes) < fmt.MAX_NOTES:
            index.notes.append(Note(after, data))
        else:
            index.dropped_notes += 1

    def _torn(self, index: _Index | None, pos: int) -> None:
        if index is not None:
            index.torn_at = pos
            index.problems.append(
                f"{self.name}: torn tail at byte {pos}: the last {self._size() - pos} bytes "
                "hold no complete record (recorder killed or disk full?); earlier snapshots "
                "are intact")

    def _damaged(self, index: _Index | None, pos: int, why: str) -> None:
        err = self._bad(pos, f"corrupt frame at byte {pos} ({why}); the snapshots before it "
                        "are intact")
        if index is None:
            raise err
        index.damage = err

    def _ensure_index(self) -> _Index:
        if self._index is None:
            index = _Index()
            for _ in self._frames(None, index):
                pass
            self._commit(index)
        assert self._index is not None
        return self._index

    def _commit(self, index: _Index) -> None:
        if index.dropped_notes:
            index.problems.append(f"{self.name}: {index.dropped_notes} notes beyond the first "
                                  f"{fmt.MAX_NOTES} were not kept")
        if self._index is None:
            self._index = index

    @property
    def problems(self) -> list[str]:
        """Warnings about the file (a torn tail, notes not kept): data that was not lost."""
        return self._ensure_index().problems

    @property
    def notes(self) -> list[Note]:
        return self._ensure_index().notes

    @property
    def trailer(self) -> dict[str, Any] | None:
        """The end frame of a clean close, or None (the recorder did not finish)."""
        return self._ensure_index().trailer

    @property
    def torn_at(self) -> int | None:
        """The offset where a torn tail begins (the recorder died mid-frame), or None."""
        return self._ensure_index().torn_at

    @property
    def damage(self) -> RecordingFormatError | None:
        """Where frame-level damage stops every read (None: the frames are intact)."""
        return self._ensure_index().damage

    # -- guest time ------------------------------------------------------------------

    def guest_times(self) -> dict[int, int]:
        """Snapshot number -> guest position (QEMU icount), for recordings taken on a replay;
        empty for live recordings (their times are host times only)."""
        out: dict[int, int] = {}
        for pos, kind, buf, i, end in self._frames(None, None):
            if kind == int(fmt.KIND_GUEST_TIME):
                try:
                    c = fmt.guest_time_payload.parse(buf[i:end])
                except (ConstructError, *fmt.PARSE_ERRORS) as e:
                    raise self._bad(pos, f"undecodable guest time at byte {pos}: {e}"
                                    ) from None
                out[c.seq] = c.icount
        return out

    # -- records ---------------------------------------------------------------------

    def deltas(self, start: int = 0) -> Iterator[Hit]:
        """Every snapshot from number ``start`` on as a :class:`~xreplay.xrr.deltas.Hit`,
        its regions applied to :attr:`buffers` (one live ``bytearray`` per region, valid
        until the next hit): the replay's path, which decodes only what changed.

        Raises :class:`RecordingFormatError` at damage, after every intact hit before it.
        """
        for fields, missing, reset, pos in self.raw_deltas(start):
            hit = Hit(*fields)
            hit.missing, hit.reset, hit.offset = missing, reset, pos
            yield hit

    def raw_deltas(self, start: int = 0
                   ) -> Iterator[tuple[HitFields, int, bool, int]]:
        """:meth:`deltas` without the objects: ``(fields, missing, reset, offset)`` per
        snapshot, ``fields`` a :data:`~xreplay.xrr.deltas.HitFields` tuple and the other
        three :class:`~xreplay.xrr.deltas.Hit`'s ``missing``, ``reset`` and ``offset``.
        For inner loops (the replay) that read every snapshot of a long recording;
        :attr:`hulls` then holds, for each region a snapshot rewrote, the span from its
        first rewritten byte to the end of its last (valid until the next snapshot)."""
        begin, expect = self._keyframe_before(start) if start > 0 else (None, 0)
        # The first pass from the first frame checks notes and the end frame as it goes and
        # becomes the reader's index when it completes; later passes reuse it.
        index = _Index() if begin is None and self._index is None else None
        sizes = self._sizes
        bufs: list[bytearray | None] = [None] * len(sizes)
        self.buffers = bufs
        hulls: list[tuple[int, int]] = [(0, 0)] * len(sizes)
        self.hulls = hulls
        nprobes = len(self._probe_names)
        decode = decoder_v2(len(sizes)) if self.version[0] >= 2 else decode_snapshot_v1
        reset = start > 0
        never = (1 << len(sizes)) - 1  # regions not read so far
        gated = self._page_count_index is not None
        for pos, kind, buf, i, end in self._frames(begin, index):
            if kind != _KIND_SNAPSHOT:
                continue  # notes are indexed by _frames; unknown kinds (newer minors) skipped
            try:
                fields = decode(buf, i, end, bufs, sizes, nprobes, hulls)
                seq = fields[0]
                if seq != expect:
                    raise Undecodable(f"snapshot number {seq} where {expect} was due")
            except Undecodable as e:
                err = self._corrupt(pos, str(e))
                if index is not None:
                    index.damage = err
                    self._commit(index)
                raise err from None
            expect += 1
            missing = fields[9]  # unread
            if never:
                touched = fields[8]
                if touched & never:
                    never &= ~touched
                missing |= never
            if gated and missing:
                missing &= ~self._not_in_use(bufs, missing)
            if seq >= start:
                yield fields, missing, reset, pos
                reset = False
        if index is not None:
            self._commit(index)
            if index.damage is not None:
                raise index.damage

    def records(self, start: int = 0) -> Iterator[Record]:
        """Every snapshot record from number ``start`` on, regions rebuilt, in file order.

        Raises :class:`RecordingFormatError` at damage, after every intact record before it.
        """
        nregions = len(self._sizes)
        snap_bytes: list[bytes | None] = [None] * nregions
        for hit in self.deltas(start):
            bufs = self.buffers
            touched = hit.touched
            changed = [bool(touched >> region & 1) for region in range(nregions)]
            if hit.reset:
                snap_bytes = [None if b is None else bytes(b) for b in bufs]
            else:
                for region, flag in enumerate(changed):
                    if flag:
                        snap_bytes[region] = bytes(bufs[region])  # type: ignore[arg-type]
            yield Record(seq=hit.seq, t_ns=hit.t_ns, probe=hit.probe, vcpu=hit.vcpu,
                         flags=hit.flags, pc=hit.pc, sp=hit.sp, regflags=hit.regflags,
                         regions=list(snap_bytes), offset=hit.offset, changed=changed,
                         unread=hit.unread)

    def _corrupt(self, pos: int, why: str) -> RecordingFormatError:
        return self._bad(pos, f"corrupt frame at byte {pos} ({why}); the snapshots before it "
                         "are intact")

    def _keyframe_before(self, start: int) -> tuple[int | None, int | None]:
        """(offset, number) of the last keyframe at or before snapshot ``start``."""
        best: tuple[int | None, int | None] = (None, 0)
        n = 0
        prefix = (SnapshotCodecV2(len(self._sizes)).prefix if self.version[0] >= 2
                  else snapshot_prefix_v1)
        try:
            for pos, kind, buf, i, end in self._frames(None, None):
                if kind != _KIND_SNAPSHOT:
                    continue
                try:
                    seq, flags = prefix(buf, i, end)
                except Undecodable as e:
                    raise self._corrupt(pos, str(e)) from None
                if seq != n:
                    raise self._corrupt(pos, f"snapshot number {seq} where {n} was due")
                if seq > start:
                    break
                if flags & _KEYFRAME:
                    best = (pos, seq)
                n += 1
        except RecordingFormatError:
            # Damage before ``start``: read from the beginning, so that every intact record
            # is yielded and the error is raised at the damage, as a sequential read does.
            return None, 0
        return best

    # -- snapshots -------------------------------------------------------------------

    def snapshot_of(self, rec: Record, cache: dict | None = None) -> Snapshot:
        """Decode a :class:`Record` into a :class:`Snapshot` (vCPU states cached by bytes)."""
        h = self.header
        dec = self._decoder
        shared = None
        watch: dict[str, bytes] = {}
        missing: list[str] = []
        fifo_pages: dict[int, bytes] = {}
        fifo_blocks: dict[int, bytes] = {}
        in_use = self._pages_in_use(rec)
        for i, (spec, data) in enumerate(zip(h.regions, rec.regions, strict=True)):
            if in_use is not None and spec.kind == "fifo_event_page" and (
                    spec.page is None or spec.page >= in_use):
                continue  # not given to Xen yet at this hit: no port lives there
            if data is None or rec.unread >> i & 1:
                missing.append(spec.name)
                continue
            if spec.kind == "shared_info":
                shared = data
            elif spec.kind == "fifo_event_page" and spec.page is not None:
                fifo_pages[spec.page] = data
            elif spec.kind == "fifo_control_block" and spec.vcpu is not None:
                fifo_blocks[spec.vcpu] = data
            elif spec.kind == "watch":
                watch[spec.name] = data
        if in_use is not None:
            # pages in use past those the header declares were not recorded: their ports
            # are unknown, not absent
            declared = {r.page for r in h.regions if r.kind == "fifo_event_page"}
            missing += [f"event_array.{p}" for p in range(in_use) if p not in declared]
        pending = mask = 0
        fifo = None
        if h.abi == "fifo":  # PENDING/MASKED live in the event words, not shared_info
            fifo = FifoState.from_regions(fifo_pages, fifo_blocks)
            pending, mask = fifo.bitmaps()
        elif shared is not None:
            pending, mask = dec.bitmaps(shared)
        vcpus: dict[int, VcpuState] = {}
        for v, region in self._vcpu_plan:
            if region is not None:
                raw = rec.regions[region]
                if raw is None or rec.unread >> region & 1:
                    continue  # its registered copy was not read: the legacy slot is stale
                source = "registered"
            else:
                if shared is None:
                    continue
                raw = dec.embedded_vcpu_info(shared, v)
                source = "shared_info"
                if raw is None:
                    continue
            key = (v, raw, source)
            state = cache.get(key) if cache is not None else None
            if state is None:
                state = dec.vcpu_state(v, raw, source)
                if cache is not None:
                    if len(cache) > 4096:
                        cache.clear()
                    cache[key] = state
            vcpus[v] = state
        return Snapshot(arch=h.arch, index=rec.seq, t_ns=rec.t_ns,
                        probe=self._probe_names[rec.probe], vcpu=rec.vcpu,
                        pc=rec.pc, flags=rec.regflags, evtchn_pending=pending,
                        evtchn_mask=mask, vcpus=vcpus, hang=rec.hang, watch=watch,
                        labels=h.labels, notify=h.notify, missing=tuple(missing), fifo=fifo)

    def _not_in_use(self, bufs: list[bytearray | None], missing: int) -> int:
        """Bits of the event-array pages the guest's page count (read at this hit: not in
        ``missing``) says are not in use: not read because they do not exist yet."""
        i = self._page_count_index
        assert i is not None
        raw = bufs[i]
        if raw is None or missing >> i & 1:
            return 0
        n = int.from_bytes(raw[:PAGE_COUNT_SIZE], "little")
        out = 0
        for j, r in enumerate(self.header.regions):
            if r.kind == "fifo_event_page" and (r.page is None or r.page >= n):
                out |= 1 << j
        return out

    def _pages_in_use(self, rec: Record) -> int | None:
        """The event-array pages in use at ``rec`` by the guest's own count (a
        ``fifo_page_count`` region), or None: no count recorded (every declared page is
        in use), or the count was not read at this hit (then every page is judged by
        whether it was read, and a missing count makes the snapshot incomplete anyway)."""
        i = self._page_count_index
        if i is None:
            return None
        raw = rec.regions[i]
        if raw is None or rec.unread >> i & 1:
            return None
        return min(int.from_bytes(raw[:PAGE_COUNT_SIZE], "little"), MAX_EVENT_ARRAY_PAGES)

    def snapshot_of_hit(self, hit: Hit) -> Snapshot:
        """The full :class:`Snapshot` at ``hit``, from :attr:`buffers` as they are now (call
        it before the next hit, for the few hits a command prints)."""
        regions = [None if b is None else bytes(b) for b in self.buffers]
        return self.snapshot_of(Record(
            seq=hit.seq, t_ns=hit.t_ns, probe=hit.probe, vcpu=hit.vcpu, flags=hit.flags,
            pc=hit.pc, sp=hit.sp, regflags=hit.regflags, regions=regions, offset=hit.offset,
            changed=[False] * len(regions), unread=hit.unread))

    def snapshots(self, start: int = 0) -> Iterator[Snapshot]:
        cache: dict = {}
        for rec in self.records(start):
            yield self.snapshot_of(rec, cache)

    def snapshot(self, n: int) -> Snapshot:
        """Snapshot number ``n`` (seeks from the nearest keyframe)."""
        if n < 0:
            raise UsageError(f"{self.name}: no snapshot #{n}: snapshots are numbered from 0")
        for snap in self.snapshots(n):
            return snap
        raise XReplayError(f"{self.name}: no snapshot #{n} (the recording has fewer)")

    def close(self) -> None:
        if self._own:
            self._f.close()

    def __enter__(self) -> XrrReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
