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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from construct import ConstructError, Struct, VarInt

from xreplay.errors import XReplayError
from xreplay.snapshot import FifoState, Snapshot, SnapshotDecoder, VcpuState
from xreplay.xrr import format as fmt
from xreplay.xrr.header import RecordingHeader

_prefix = Struct("seq" / VarInt, "t_ns" / VarInt, "probe" / VarInt, "vcpu" / VarInt,
                 "flags" / fmt.Int8ul).compile()


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

    def _frames(self, start: int | None = None) -> Iterator[tuple[int, int, bytes]]:
        """(offset, kind, payload) of each intact frame, stopping at a torn tail."""
        f = self._f
        pos = self._data_start if start is None else start
        f.seek(pos)
        self.problems = []
        while True:
            head = f.read(fmt.FRAME_HEAD_SIZE)
            if not head:
                return
            if len(head) < fmt.FRAME_HEAD_SIZE:
                self._torn(pos)
                return
            mark, kind, length = head[0], head[1], int.from_bytes(head[2:6], "little")
            if mark != fmt.FRAME_MARK or length > fmt.MAX_FRAME:
                self._corrupt(pos, "bad frame marker or length")
            body = f.read(length + fmt.FRAME_CRC_SIZE)
            if len(body) < length + fmt.FRAME_CRC_SIZE:
                self._torn(pos)
                return
            payload = body[:length]
            if fmt.frame_crc(kind, payload) != int.from_bytes(body[length:], "little"):
                if not f.read(1):  # the last frame: written partly, e.g. by a dying recorder
                    self._torn(pos)
                    return
                self._corrupt(pos, "checksum mismatch")
            yield pos, kind, payload
            pos += fmt.FRAME_HEAD_SIZE + length + fmt.FRAME_CRC_SIZE

    def _torn(self, pos: int) -> None:
        size = os.fstat(self._f.fileno()).st_size
        self.problems.append(
            f"{self.name}: torn tail at byte {pos}: the last {size - pos} bytes hold no "
            "complete record (recorder killed or disk full?); earlier snapshots are intact")

    def _corrupt(self, pos: int, why: str) -> None:
        raise XReplayError(f"{self.name}: corrupt frame at byte {pos} ({why}); "
                           "the snapshots before it are intact")

    # -- records ---------------------------------------------------------------------

    def records(self, start: int = 0) -> Iterator[Record]:
        """Every snapshot record from number ``start`` on, regions rebuilt, in file order."""
        begin = self._keyframe_before(start) if start > 0 else None
        nregions = len(self.header.regions)
        sizes = [r.size for r in self.header.regions]
        cur: list[bytearray | None] = [None] * nregions
        snap_bytes: list[bytes | None] = [None] * nregions
        self.notes = []
        self.trailer = None
        for pos, kind, payload in self._frames(begin):
            if kind == fmt.KIND_SNAPSHOT:
                rec = self._decode(pos, payload, cur, snap_bytes, sizes)
                if rec.seq >= start:
                    yield rec
            elif kind == fmt.KIND_NOTE:
                data = self._json(pos, payload)
                self.notes.append(Note(int(data.get("after", 0)), data))
            elif kind == fmt.KIND_END:
                self.trailer = self._json(pos, payload)
            # unknown kinds are skipped: a newer minor version may add some

    def _json(self, pos: int, payload: bytes) -> dict[str, Any]:
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._corrupt(pos, "note is not a JSON object")
        return data

    def _decode(self, pos: int, payload: bytes, cur: list[bytearray | None],
                snap_bytes: list[bytes | None], sizes: list[int]) -> Record:
        try:
            c = fmt.snapshot_payload.parse(payload)
        except ConstructError as e:
            self._corrupt(pos, f"undecodable snapshot: {e}")
        changed = [False] * len(cur)
        unread = 0
        for reg in c.regions:
            i, enc, data = reg.region, reg.encoding, reg.data
            if i >= len(cur):
                self._corrupt(pos, f"region {i} not declared in the header")
            if enc == fmt.ENC_FULL:
                if len(data) != sizes[i]:
                    self._corrupt(pos, f"region {i} has {len(data)} bytes, not {sizes[i]}")
                cur[i] = bytearray(data)
            elif enc == fmt.ENC_DELTA:
                buf = cur[i]
                if buf is None:
                    self._corrupt(pos, f"delta for region {i} before any keyframe")
                self._apply(pos, buf, data)
            elif enc == fmt.ENC_SAME:
                continue
            elif enc == fmt.ENC_ABSENT:
                if i < len(cur):
                    unread |= 1 << i
                continue
            else:
                self._corrupt(pos, f"unknown region encoding {enc}")
            changed[i] = True
            snap_bytes[i] = bytes(cur[i])
        flags = c.flags
        return Record(
            seq=c.seq, t_ns=c.t_ns, probe=c.probe, vcpu=c.vcpu, flags=flags, pc=c.pc,
            sp=c.sp if flags & fmt.FLAG_HAVE_SP else None,
            regflags=c.regflags if flags & fmt.FLAG_HAVE_FLAGS else None,
            regions=list(snap_bytes), offset=pos, changed=changed, unread=unread)

    def _apply(self, pos: int, buf: bytearray, data: bytes) -> None:
        try:
            runs = fmt.delta_runs.parse(data)
        except ConstructError:
            self._corrupt(pos, "undecodable delta")
        at = 0
        for run in runs:
            at += run.skip
            end = at + len(run.data)
            if end > len(buf):
                self._corrupt(pos, "delta runs past the end of its region")
            buf[at:end] = run.data
            at = end

    def _keyframe_before(self, start: int) -> int | None:
        """Offset of the last keyframe at or before snapshot ``start`` (one cheap pass)."""
        best = None
        for pos, kind, payload in self._frames():
            if kind != fmt.KIND_SNAPSHOT:
                continue
            try:
                p = _prefix.parse(payload)
            except ConstructError:
                self._corrupt(pos, "undecodable snapshot")
            if p.seq > start:
                break
            if p.flags & fmt.FLAG_KEYFRAME:
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
        missing: list[str] = []
        fifo_pages: dict[int, bytes] = {}
        fifo_blocks: dict[int, bytes] = {}
        for i, (spec, data) in enumerate(zip(h.regions, rec.regions, strict=True)):
            if data is None or rec.unread >> i & 1:
                missing.append(spec.name)
                continue
            if spec.kind == "shared_info":
                shared = data
            elif spec.kind == "vcpu_info" and spec.vcpu is not None:
                vcpu_raw[spec.vcpu] = (data, "registered")
            elif spec.kind == "fifo_event_page" and spec.page is not None:
                fifo_pages[spec.page] = data
            elif spec.kind == "fifo_control_block" and spec.vcpu is not None:
                fifo_blocks[spec.vcpu] = data
            else:
                watch[spec.name] = data
        pending = mask = 0
        fifo = None
        if h.abi == "fifo":  # PENDING/MASKED live in the event words, not shared_info
            fifo = FifoState.from_regions(fifo_pages, fifo_blocks)
            pending, mask = fifo.bitmaps()
        elif shared is not None:
            pending, mask = dec.bitmaps(shared)
        vcpus: dict[int, VcpuState] = {}
        for v in h.vcpus:
            raw, source = vcpu_raw.get(v, (None, "shared_info"))
            if raw is None and f"vcpu_info.{v}" in missing:
                continue  # its registered copy was not read: the legacy slot is stale
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
                        labels=h.labels, notify=h.notify, missing=tuple(missing), fifo=fifo)

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
