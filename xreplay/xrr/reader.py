"""Streaming ``.xrr`` reader: constant memory, bounded lengths, a torn tail is a warning.

Follows the shape of pyelftools' readers: the file object stays open and records are
decoded lazily, one frame at a time.  A file cut off mid-frame (a killed recorder, a full
disk) yields every complete snapshot and then reports the torn tail in :attr:`problems`;
damage before the last frame is an error that names the byte offset, after the intact
snapshots before it have been yielded.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xreplay.errors import XReplayError
from xreplay.snapshot import Snapshot, SnapshotDecoder, VcpuState
from xreplay.xrr import format as fmt
from xreplay.xrr.deltas import Hit, Undecodable, decode_snapshot_v1, varint
from xreplay.xrr.header import RecordingHeader

_CHUNK = 1 << 18  # bytes read at a time



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

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & fmt.FLAG_KEYFRAME)

    @property
    def hang(self) -> bool:
        return bool(self.flags & fmt.FLAG_HANG)


@dataclass(frozen=True, slots=True)
class Note:
    """A non-snapshot event stored between snapshots."""

    after: int  # number of snapshots before it
    data: dict[str, Any]


class XrrReader:
    """Read a recording.  ``XrrReader(path)`` validates the header at once."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(path)
        try:
            self._f = open(path, "rb")  # noqa: SIM115 - kept open for lazy iteration
        except OSError as e:
            raise XReplayError(f"{path}: cannot open recording ({e.strerror})") from None
        self.problems: list[str] = []
        self.trailer: dict[str, Any] | None = None
        self.notes: list[Note] = []
        self.header = self._read_header()
        self._decoder = SnapshotDecoder(self.header.arch)
        self._probe_names = [p.name for p in self.header.probes]

    # -- header ---------------------------------------------------------------------

    def _read_header(self) -> RecordingHeader:
        raw = self._f.read(fmt.HEADER_PREFIX_SIZE)
        if len(raw) < len(fmt.MAGIC) or not raw.startswith(fmt.MAGIC):
            raise XReplayError(f"{self.name}: not an xreplay recording (bad magic)")
        if len(raw) < fmt.HEADER_PREFIX_SIZE:
            raise XReplayError(f"{self.name}: file ends inside the header")
        pre = fmt.FileHeaderPrefix.parse(raw)
        if pre.major != fmt.VERSION_MAJOR:
            raise XReplayError(
                f"{self.name}: format version {pre.major}.{pre.minor} is not supported "
                f"(this xreplay reads {fmt.VERSION_MAJOR}.x): upgrade xreplay")
        if pre.meta_len > fmt.MAX_META:
            raise XReplayError(f"{self.name}: header claims {pre.meta_len} bytes of metadata, "
                               "more than the format allows: the file is corrupt")
        meta = self._f.read(pre.meta_len)
        crc = self._f.read(4)
        if len(meta) < pre.meta_len or len(crc) < 4:
            raise XReplayError(f"{self.name}: file ends inside the header")
        if fmt.header_crc(raw[len(fmt.MAGIC):], meta) != int.from_bytes(crc, "little"):
            raise XReplayError(f"{self.name}: header checksum mismatch: the file is corrupt")
        try:
            doc = json.loads(meta)
        except ValueError:
            raise XReplayError(f"{self.name}: header metadata is not valid JSON") from None
        self._data_start = self._f.tell()
        return RecordingHeader.from_json(doc, self.name)

    # -- frames ---------------------------------------------------------------------

    def _frames(self, start: int | None = None) -> Iterator[tuple[int, int, bytes, int, int]]:
        """(offset, kind, buffer, start, end) of each intact frame, its payload being
        ``buffer[start:end]``; stops at a torn tail.  Reads the file in large chunks."""
        f = self._f
        pos = self._data_start if start is None else start
        f.seek(pos)
        self.problems = []
        head_size, crc_size, mark = fmt.FRAME_HEAD_SIZE, fmt.FRAME_CRC_SIZE, fmt.FRAME_MARK
        crc32, from_bytes = zlib.crc32, int.from_bytes
        buf = b""
        i = 0  # buf[i] is the byte at file offset pos
        while True:
            if len(buf) - i < head_size:
                buf = buf[i:] + f.read(_CHUNK)
                i = 0
                if not buf:
                    return
                if len(buf) < head_size:
                    self._torn(pos)
                    return
            length = from_bytes(buf[i + 2:i + 6], "little")
            if buf[i] != mark or length > fmt.MAX_FRAME:
                self._corrupt(pos, "bad frame marker or length")
            end = i + head_size + length + crc_size
            if end > len(buf):
                buf = buf[i:]
                end -= i
                i = 0
                buf += f.read(max(_CHUNK, end - len(buf)))
                if end > len(buf):
                    self._torn(pos)
                    return
            if crc32(buf[i + 1:end - crc_size]) != from_bytes(buf[end - crc_size:end], "little"):
                if end == len(buf) and not f.read(1):
                    # the last frame: written partly, e.g. by a dying recorder
                    self._torn(pos)
                    return
                self._corrupt(pos, "checksum mismatch")
            yield pos, buf[i + 1], buf, i + head_size, end - crc_size
            pos += end - i
            i = end

    def _torn(self, pos: int) -> None:
        size = os.fstat(self._f.fileno()).st_size
        self.problems.append(
            f"{self.name}: torn tail at byte {pos}: the last {size - pos} bytes hold no "
            "complete record (recorder killed or disk full?); earlier snapshots are intact")

    def _corrupt(self, pos: int, why: str) -> None:
        raise XReplayError(f"{self.name}: corrupt frame at byte {pos} ({why}); "
                           "the snapshots before it are intact")

    # -- records ---------------------------------------------------------------------

    def deltas(self, start: int = 0) -> Iterator[Hit]:
        """Every snapshot from number ``start`` on as a :class:`Hit`, its regions applied to
        :attr:`buffers` (one live ``bytearray`` per region, valid until the next hit)."""
        begin = self._keyframe_before(start) if start > 0 else None
        sizes = [r.size for r in self.header.regions]
        bufs: list[bytearray | None] = [None] * len(sizes)
        self.buffers = bufs
        self.notes = []
        self.trailer = None
        decode = decode_snapshot_v1
        reset = start > 0
        for pos, kind, buf, i, end in self._frames(begin):
            if kind == fmt.KIND_SNAPSHOT:
                try:
                    hit = decode(buf, i, end, bufs, sizes)
                except Undecodable as e:
                    self._corrupt(pos, str(e))
                if hit.seq >= start:
                    hit.offset = pos
                    if reset:
                        hit.reset, reset = True, False
                    yield hit
            elif kind == fmt.KIND_NOTE:
                data = self._json(pos, buf[i:end])
                self.notes.append(Note(int(data.get("after", 0)), data))
            elif kind == fmt.KIND_END:
                self.trailer = self._json(pos, buf[i:end])
            # unknown kinds are skipped: a newer minor version may add some

    def records(self, start: int = 0) -> Iterator[Record]:
        """Every snapshot record from number ``start`` on, regions rebuilt, in file order."""
        nregions = len(self.header.regions)
        snap_bytes: list[bytes | None] = [None] * nregions
        for hit in self.deltas(start):
            bufs = self.buffers
            changed = [False] * nregions
            for region, _, _ in hit.dirty:
                changed[region] = True
            if hit.reset:
                snap_bytes = [None if b is None else bytes(b) for b in bufs]
            else:
                for region, flag in enumerate(changed):
                    if flag:
                        snap_bytes[region] = bytes(bufs[region])  # type: ignore[arg-type]
            yield Record(seq=hit.seq, t_ns=hit.t_ns, probe=hit.probe, vcpu=hit.vcpu,
                         flags=hit.flags, pc=hit.pc, sp=hit.sp, regflags=hit.regflags,
                         regions=list(snap_bytes), offset=hit.offset, changed=changed)

    def _json(self, pos: int, payload: bytes) -> dict[str, Any]:
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._corrupt(pos, "note is not a JSON object")
        return data

    def _keyframe_before(self, start: int) -> int | None:
        """Offset of the last keyframe at or before snapshot ``start`` (one cheap pass)."""
        best = None
        for pos, kind, buf, i, end in self._frames():
            if kind != fmt.KIND_SNAPSHOT:
                continue
            try:
                seq, j = varint(buf, i)
                for _ in range(3):  # t_ns, probe, vcpu
                    _, j = varint(buf, j)
                flags = buf[j]
            except IndexError:
                self._corrupt(pos, "undecodable snapshot")
            if j >= end:
                self._corrupt(pos, "undecodable snapshot")
            if seq > start:
                break
            if flags & fmt.FLAG_KEYFRAME:
                best = pos
        return best

    # -- snapshots -------------------------------------------------------------------

    def snapshot_of(self, rec: Record, cache: dict | None = None) -> Snapshot:
        """Decode a :class:`Record` into a :class:`Snapshot` (vCPU states cached by bytes)."""
        h = self.header
        dec = self._decoder
        shared = None
        vcpu_raw: dict[int, tuple[bytes, str]] = {}
        watch: dict[str, bytes] = {}
        for spec, data in zip(h.regions, rec.regions, strict=True):
            if data is None:
                continue
            if spec.kind == "shared_info":
                shared = data
            elif spec.kind == "vcpu_info" and spec.vcpu is not None:
                vcpu_raw[spec.vcpu] = (data, "registered")
            else:
                watch[spec.name] = data
        pending = mask = 0
        if shared is not None:
            pending, mask = dec.bitmaps(shared)
        vcpus: dict[int, VcpuState] = {}
        for v in h.vcpus:
            raw, source = vcpu_raw.get(v, (None, "shared_info"))
            if raw is None and shared is not None:
                raw = dec.embedded_vcpu_info(shared, v)
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
        probe = (self._probe_names[rec.probe] if rec.probe < len(self._probe_names)
                 else f"probe{rec.probe}")
        return Snapshot(arch=h.arch, index=rec.seq, t_ns=rec.t_ns, probe=probe, vcpu=rec.vcpu,
                        pc=rec.pc, flags=rec.regflags, evtchn_pending=pending,
                        evtchn_mask=mask, vcpus=vcpus, hang=rec.hang, watch=watch,
                        labels=h.labels, notify=h.notify)

    def snapshots(self, start: int = 0) -> Iterator[Snapshot]:
        cache: dict = {}
        for rec in self.records(start):
            yield self.snapshot_of(rec, cache)

    def snapshot(self, n: int) -> Snapshot:
        """Snapshot number ``n`` (seeks from the nearest keyframe)."""
        for snap in self.snapshots(n):
            return snap
        raise XReplayError(f"{self.name}: no snapshot #{n} (the recording has fewer)")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> XrrReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
