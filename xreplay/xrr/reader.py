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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from construct import ConstructError

from xreplay.errors import RecordingFormatError, UsageError, XReplayError
from xreplay.snapshot import Snapshot, SnapshotDecoder, VcpuState
from xreplay.xrr import format as fmt
from xreplay.xrr.header import RecordingHeader, parse_json_object

_FULL, _DELTA = fmt.RegionEncoding.FULL.name, fmt.RegionEncoding.DELTA.name
_SAME, _ABSENT = fmt.RegionEncoding.SAME.name, fmt.RegionEncoding.ABSENT.name
# Plain ints: IntFlag arithmetic runs in Python, per snapshot.
_KEYFRAME, _HANG = int(fmt.FLAG_KEYFRAME), int(fmt.FLAG_HANG)
_HAVE_FLAGS, _HAVE_SP = int(fmt.FLAG_HAVE_FLAGS), int(fmt.FLAG_HAVE_SP)
_KIND_SNAPSHOT, _KIND_NOTE, _KIND_END = (int(fmt.KIND_SNAPSHOT), int(fmt.KIND_NOTE),
                                         int(fmt.KIND_END))


@dataclass(slots=True)
class Record:
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

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & _KEYFRAME)

    @property
    def hang(self) -> bool:
        return bool(self.flags & _HANG)


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
        if major != fmt.VERSION_MAJOR:
            raise self._bad(8, f"format version {major}.{minor} is not supported "
                            f"(this xreplay reads {fmt.VERSION_MAJOR}.x): upgrade xreplay")
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
                ) -> Iterator[tuple[int, int, bytes]]:
        """(offset, kind, payload) of each intact frame, stopping at a torn tail or damage.

        With ``index`` (the first pass from the first frame), torn tails, damage, notes and
        the trailer are collected into it.  Later passes stop at the damage that pass found
        (a bad note, an undecodable snapshot) without parsing notes again.
        """
        f = self._f
        pos = self._data_start if start is None else start
        f.seek(pos)
        head_size, crc_size = fmt.FRAME_HEAD_SIZE, fmt.FRAME_CRC_SIZE
        unpack = fmt.frame_head_struct.unpack
        known = self._index.damage if index is None and self._index is not None else None
        stop = known.offset if known is not None and known.offset is not None else -1
        while True:
            if pos == stop:
                raise known  # type: ignore[misc]
            head = f.read(head_size)
            if not head:
                return
            if len(head) < head_size:
                self._torn(index, pos)
                return
            mark, kind, length = unpack(head)
            if mark != fmt.FRAME_MARK or length > fmt.MAX_FRAME:
                self._damaged(index, pos, "bad frame marker or length")
                return
            body = f.read(length + crc_size)
            if len(body) < length + crc_size:
                self._torn(index, pos)
                return
            payload = body[:length]
            if fmt.frame_crc(kind, payload) != int.from_bytes(body[length:], "little"):
                if not f.read(1):  # the last frame: written partly, e.g. by a dying recorder
                    self._torn(index, pos)
                    return
                self._damaged(index, pos, "checksum mismatch")
                return
            if index is not None and kind in (_KIND_NOTE, _KIND_END):
                try:
                    self._index_json(index, pos, kind, payload)
                except RecordingFormatError as e:
                    index.damage = e
                    return
            yield pos, kind, payload
            pos += head_size + length + crc_size

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
    def damage(self) -> RecordingFormatError | None:
        """Where frame-level damage stops every read (None: the frames are intact)."""
        return self._ensure_index().damage

    # -- guest time ------------------------------------------------------------------

    def guest_times(self) -> dict[int, int]:
        """Snapshot number -> guest position (QEMU icount), for recordings taken on a replay;
        empty for live recordings (their times are host times only)."""
        out: dict[int, int] = {}
        for pos, kind, payload in self._frames(None, None):
            if kind == int(fmt.KIND_GUEST_TIME):
                try:
                    c = fmt.guest_time_payload.parse(payload)
                except (ConstructError, *fmt.PARSE_ERRORS) as e:
                    raise self._bad(pos, f"undecodable guest time at byte {pos}: {e}"
                                    ) from None
                out[c.seq] = c.icount
        return out

    # -- records ---------------------------------------------------------------------

    def records(self, start: int = 0) -> Iterator[Record]:
        """Every snapshot record from number ``start`` on, regions rebuilt, in file order.

        Raises :class:`RecordingFormatError` at damage, after every intact record before it.
        """
        begin, expect = self._keyframe_before(start) if start > 0 else (None, 0)
        # The first pass from the first frame checks notes and the end frame as it goes and
        # becomes the reader's index when it completes; later passes reuse it.
        index = _Index() if begin is None and self._index is None else None
        cur: list[bytearray | None] = [None] * len(self._sizes)
        snap_bytes: list[bytes | None] = [None] * len(self._sizes)
        for pos, kind, payload in self._frames(begin, index):
            if kind == _KIND_SNAPSHOT:
                try:
                    rec = self._decode(pos, payload, cur, snap_bytes, expect)
                except RecordingFormatError as e:
                    if index is not None:
                        index.damage = e
                        self._commit(index)
                    raise
                expect += 1
                if rec.seq >= start:
                    yield rec
            # unknown kinds are skipped: a newer minor version may add some
        if index is not None:
            self._commit(index)
            if index.damage is not None:
                raise index.damage

    def _decode(self, pos: int, payload: bytes, cur: list[bytearray | None],
                snap_bytes: list[bytes | None], expect: int | None) -> Record:
        try:
            c = fmt.snapshot_payload.parse(payload)
        except (ConstructError, *fmt.PARSE_ERRORS) as e:
            raise self._corrupt(pos, f"undecodable snapshot: {type(e).__name__}") from None
        if expect is not None and c.seq != expect:
            raise self._corrupt(pos, f"snapshot number {c.seq} where {expect} was due")
        if c.probe >= len(self._probe_names):
            raise self._corrupt(pos, f"probe {c.probe} not declared in the header")
        if c.vcpu >= fmt.MAX_VCPUS:
            raise self._corrupt(pos, f"vCPU {c.vcpu} beyond the ABI's {fmt.MAX_VCPUS}")
        sizes = self._sizes
        changed = [False] * len(cur)
        seen = unread = 0
        for reg in c.regions:
            i, enc, data = reg.region, reg.encoding, reg.data
            if i >= len(cur):
                raise self._corrupt(pos, f"region {i} not declared in the header")
            if seen >> i & 1:
                raise self._corrupt(pos, f"region {i} stored twice")
            seen |= 1 << i
            if enc == _FULL:
                if len(data) != sizes[i]:
                    raise self._corrupt(pos, f"region {i} has {len(data)} bytes, not {sizes[i]}")
                cur[i] = bytearray(data)
            elif enc == _DELTA:
                buf = cur[i]
                if buf is None:
                    raise self._corrupt(pos, f"delta for region {i} before any keyframe")
                if len(data) >= sizes[i]:
                    raise self._corrupt(pos, f"delta for region {i} is not shorter than it")
                self._apply(pos, buf, data)
            elif enc in (_SAME, _ABSENT):
                if data:
                    raise self._corrupt(pos, f"region {i} is {enc.lower()} but carries data")
                if enc == _ABSENT:
                    unread |= 1 << i
                continue
            else:
                raise self._corrupt(pos, f"unknown region encoding {int(enc)}")
            changed[i] = True
            snap_bytes[i] = bytes(cur[i])  # type: ignore[arg-type]
        flags = fmt.flags_value(c.flags)
        return Record(
            seq=c.seq, t_ns=c.t_ns, probe=c.probe, vcpu=c.vcpu, flags=flags, pc=c.pc,
            sp=c.sp if flags & _HAVE_SP else None,
            regflags=c.regflags if flags & _HAVE_FLAGS else None,
            regions=list(snap_bytes), offset=pos, changed=changed, unread=unread)

    def _corrupt(self, pos: int, why: str) -> RecordingFormatError:
        return self._bad(pos, f"corrupt frame at byte {pos} ({why}); the snapshots before it "
                         "are intact")

    def _apply(self, pos: int, buf: bytearray, data: bytes) -> None:
        try:
            runs = fmt.delta_runs.parse(data)
        except (ConstructError, *fmt.PARSE_ERRORS):
            raise self._corrupt(pos, "undecodable delta") from None
        at = 0
        for run in runs:
            at += run.skip
            end = at + len(run.data)
            if end > len(buf):
                raise self._corrupt(pos, "delta runs past the end of its region")
            buf[at:end] = run.data
            at = end

    def _keyframe_before(self, start: int) -> tuple[int | None, int | None]:
        """(offset, number) of the last keyframe at or before snapshot ``start``."""
        best: tuple[int | None, int | None] = (None, 0)
        n = 0
        try:
            for pos, kind, payload in self._frames(None, None):
                if kind != _KIND_SNAPSHOT:
                    continue
                try:
                    p = fmt.snapshot_prefix.parse(payload)
                except (ConstructError, *fmt.PARSE_ERRORS):
                    raise self._corrupt(pos, "undecodable snapshot") from None
                if p.seq != n:
                    raise self._corrupt(pos, f"snapshot number {p.seq} where {n} was due")
                if p.seq > start:
                    break
                if p.flags.KEYFRAME:
                    best = (pos, p.seq)
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
        for i, (spec, data) in enumerate(zip(h.regions, rec.regions, strict=True)):
            if data is None or rec.unread >> i & 1:
                missing.append(spec.name)
                continue
            if spec.kind == "shared_info":
                shared = data
            elif spec.kind == "watch":
                watch[spec.name] = data
        pending = mask = 0
        if shared is not None:
            pending, mask = dec.bitmaps(shared)
        vcpus: dict[int, VcpuState] = {}
        for v, region in self._vcpu_plan:
            raw = None
            source = "registered"
            if region is not None:
                if rec.unread >> region & 1 or rec.regions[region] is None:
                    continue  # its registered copy was not read: the legacy slot is stale
                raw = rec.regions[region]
            if raw is None:  # not registered: the legacy slot in shared_info
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
                        labels=h.labels, notify=h.notify, missing=tuple(missing))

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
