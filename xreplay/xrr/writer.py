"""Streaming ``.xrr`` writer: keyframes plus byte-run deltas, one flushed frame per snapshot.

Most of a shared_info page never changes between two probe hits, so a snapshot usually
costs about 20 bytes in format 2.0 (the previous snapshot implies its number, time and
registers; keyframes are zlib streams).  Every frame is written and flushed whole, so
whatever happens to the recorder afterwards, the snapshots already written stay readable.

The first failed write (a full disk, a vanished mount) becomes a
:class:`~xreplay.errors.RecordingWriteError` naming the file and the snapshots safely on
disk; the writer then refuses further writes with the same error, and its close does not
write the "closed cleanly" trailer (neither does leaving a ``with`` block on an exception).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from construct import ConstructError

from xreplay.errors import RecordingWriteError, UsageError
from xreplay.xrr import format as fmt
from xreplay.xrr.deltas import (
    CODE_ABSENT,
    CODE_DELTA,
    CODE_FULL,
    SnapshotCodecV2,
    deflate,
    encode_runs,
    uvarint,
)
from xreplay.xrr.header import RecordingHeader

WRITABLE_VERSIONS = ((fmt.VERSION_MAJOR, fmt.VERSION_MINOR), (1, 1), (1, 0))

# Plain ints: IntEnum/IntFlag arithmetic runs in Python, per snapshot.
_KEYFRAME, _HANG = int(fmt.FLAG_KEYFRAME), int(fmt.FLAG_HANG)
_HAVE_FLAGS, _HAVE_SP = int(fmt.FLAG_HAVE_FLAGS), int(fmt.FLAG_HAVE_SP)
_CODE_ABSENT, _CODE_DELTA, _CODE_FULL = CODE_ABSENT, CODE_DELTA, CODE_FULL
_SNAPSHOT_HEAD = bytes((fmt.FRAME_MARK_V2 | fmt.KIND_SNAPSHOT,))
_MAX_VCPUS = fmt.MAX_VCPUS

encode_delta = encode_runs  # the name this module has always exported


class XrrWriter:
    """Append snapshots to a recording.  Use as a context manager, or call :meth:`close`.

    Writes the current format (2.0) unless ``version=(1, 0)`` asks for the old layout
    (kept so that compatibility can be tested against freshly written 1.0 files).
    """

    def __init__(self, dest: str | os.PathLike | BinaryIO, header: RecordingHeader,
                 *, flush_every: int = 1,
                 version: tuple[int, int] = (fmt.VERSION_MAJOR, fmt.VERSION_MINOR)) -> None:
        header.validate(writing=True)  # never write a file the reader would refuse
        if tuple(version) not in WRITABLE_VERSIONS:
            raise UsageError(f"cannot write format version {version[0]}.{version[1]} "
                             f"(writable: {', '.join(f'{a}.{b}' for a, b in WRITABLE_VERSIONS)})")
        self.version = (int(version[0]), int(version[1]))
        self._v2 = SnapshotCodecV2(len(header.regions)) if self.version[0] >= 2 else None
        self.header = header
        self._own = not hasattr(dest, "write")
        self.path = Path(dest) if self._own else None  # type: ignore[arg-type]
        self.name = str(dest) if self._own else str(getattr(dest, "name", "<stream>"))
        self._flush_every = max(1, flush_every)
        self._prev: list[bytes | None] = [None] * len(header.regions)
        self._sizes = [r.size for r in header.regions]
        self._nregions = len(header.regions)
        self._nprobes = len(header.probes)
        self._keyframe_interval = header.keyframe_interval
        self._t0 = time.monotonic_ns()
        self.count = 0
        self.bytes_written = 0
        self.closed = False
        self.error: RecordingWriteError | None = None  # the first failed write, if any
        self._on_disk = 0  # snapshots flushed to the file
        if self._own:
            try:
                self._f: BinaryIO = open(dest, "wb")  # noqa: SIM115 - lives as the writer
            except OSError as e:
                raise RecordingWriteError(self.name, 0, e) from None
        else:
            self._f = dest  # type: ignore[assignment]
        try:
            self._write_header()
        except BaseException:
            self.abandon()
            raise

    def _write_header(self) -> None:
        meta = json.dumps(self.header.to_json(), sort_keys=True).encode()
        prefix = fmt.FileHeaderPrefix.build(
            {"major": self.version[0], "minor": self.version[1], "meta_len": len(meta)})
        crc = fmt.header_crc(prefix[len(fmt.MAGIC):], meta)
        self._emit(prefix + meta + crc.to_bytes(4, "little"))
        self._flush()

    def _failed(self, e: OSError) -> RecordingWriteError:
        if self.error is None:
            self.error = RecordingWriteError(self.name, self._on_disk, e)
        return self.error

    def _emit(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        try:
            self._f.write(data)
        except OSError as e:
            raise self._failed(e) from e
        self.bytes_written += len(data)

    def _flush(self) -> None:
        if self.error is not None:
            raise self.error
        try:
            self._f.flush()
        except OSError as e:
            raise self._failed(e) from e
        self._on_disk = self.count

    def _frame(self, kind: int, payload: bytes) -> None:
        if len(payload) > fmt.MAX_FRAME:
            raise UsageError(f"{self.name}: a frame of {len(payload)} bytes exceeds the "
                             f"format's bound ({fmt.MAX_FRAME})")
        if self._v2 is None:
            head = fmt.frame_head.build({"kind": kind, "length": len(payload)})
            self._emit(head + payload + fmt.frame_crc(kind, payload).to_bytes(4, "little"))
            return
        body = bytes((fmt.FRAME_MARK_V2 | kind,)) + uvarint(len(payload)) + payload
        self._emit(body + zlib.crc32(body).to_bytes(4, "little"))

    @property
    def t0_ns(self) -> int:
        """Host monotonic ns at which the recording began (``t_ns`` counts from here)."""
        return self._t0

    def append(self, *, probe: int | str, vcpu: int, pc: int, regions: list[bytes | None],
               regflags: int | None = None, sp: int | None = None, t_ns: int | None = None,
               hang: bool = False) -> int:
        """Store one snapshot; ``regions`` follows the header's region order (None = unread).

        Returns the snapshot's sequence number.  The recorder's hot path (one call per
        hit): plain ints rather than the format's enums, each region's 2-bit code set
        directly, and the frame written with one call.
        """
        if self.error is not None:
            raise self.error
        if len(regions) != self._nregions:
            raise UsageError(f"expected {self._nregions} regions, got {len(regions)}")
        pid = self.header.probe_index(probe) if isinstance(probe, str) else probe
        if not 0 <= pid < self._nprobes:
            raise UsageError(f"probe {pid} is not declared in the header")
        if not 0 <= vcpu < _MAX_VCPUS:
            raise UsageError(f"vCPU {vcpu} is outside 0..{_MAX_VCPUS - 1}")
        seq = self.count
        keyframe = seq % self._keyframe_interval == 0
        if self._v2 is None:
            return self._append_v1(seq, keyframe, pid, vcpu, pc, regions, regflags, sp, t_ns,
                                   hang)
        flags = ((_KEYFRAME if keyframe else 0) | (_HANG if hang else 0)
                 | (_HAVE_FLAGS if regflags is not None else 0)
                 | (_HAVE_SP if sp is not None else 0))
        prevs, sizes = self._prev, self._sizes
        codes = 0
        data = []
        for i, cur in enumerate(regions):
            if cur is None:
                # Not read at this hit: "absent" says so (readers keep the previous
                # contents for continuity and mark the region unread). After an absent
                # keyframe entry the next read is stored whole, so a reader starting at that
                # keyframe never meets a delta without its base.
                codes |= _CODE_ABSENT << 2 * i
                if keyframe:
                    prevs[i] = None
                continue
            if type(cur) is not bytes:
                cur = bytes(cur)
            if len(cur) != sizes[i]:
                raise UsageError(f"region {self.header.regions[i].name!r}: {len(cur)} bytes, "
                                 f"header says {sizes[i]}")
            prev = prevs[i]
            if keyframe or prev is None:
                codes |= _CODE_FULL << 2 * i  # a page is mostly zeros and 0xff masks
                data.append(deflate(cur))
            elif cur != prev:
                delta = encode_runs(prev, cur)
                if len(delta) < len(cur):
                    codes |= _CODE_DELTA << 2 * i
                    data.append(delta)
                else:
                    codes |= _CODE_FULL << 2 * i
                    data.append(deflate(cur))
            prevs[i] = cur
        t = max(0, time.monotonic_ns() - self._t0 if t_ns is None else t_ns)
        try:
            payload = self._v2.encode(seq, t, pid, vcpu, flags, pc, sp, regflags, codes, data)
        except ValueError as e:  # a register negative or over 64 bits
            raise UsageError(f"snapshot {seq} cannot be stored: {e}") from None
        if len(payload) > fmt.MAX_FRAME:
            raise UsageError(f"{self.name}: a frame of {len(payload)} bytes exceeds the "
                             f"format's bound ({fmt.MAX_FRAME})")
        body = b"".join((_SNAPSHOT_HEAD, uvarint(len(payload)), payload))
        self._emit(body + zlib.crc32(body).to_bytes(4, "little"))
        self.count += 1
        if self.count % self._flush_every == 0:
            self._flush()
        return seq

    def _append_v1(self, seq: int, keyframe: bool, pid: int, vcpu: int, pc: int,
                   regions: list[bytes | None], regflags: int | None, sp: int | None,
                   t_ns: int | None, hang: bool) -> int:
        """The 1.0 layout, built with construct (only tests write it)."""
        flags = (fmt.FLAG_KEYFRAME if keyframe else 0) | (fmt.FLAG_HANG if hang else 0)
        if regflags is not None:
            flags |= fmt.FLAG_HAVE_FLAGS
        if sp is not None:
            flags |= fmt.FLAG_HAVE_SP
        encoded = []
        for i, data in enumerate(regions):
            prev = self._prev[i]
            if data is None:
                encoded.append({"region": i, "encoding": fmt.ENC_ABSENT, "data": b""})
                if keyframe:
                    self._prev[i] = None
                continue
            data = bytes(data)
            if len(data) != self._sizes[i]:
                raise UsageError(f"region {self.header.regions[i].name!r}: {len(data)} bytes, "
                                 f"header says {self._sizes[i]}")
            if keyframe or prev is None:
                encoded.append({"region": i, "encoding": fmt.ENC_FULL, "data": data})
            elif data == prev:
                encoded.append({"region": i, "encoding": fmt.ENC_SAME, "data": b""})
            else:
                delta = encode_delta(prev, data)
                if len(delta) < len(data):
                    encoded.append({"region": i, "encoding": fmt.ENC_DELTA, "data": delta})
                else:
                    encoded.append({"region": i, "encoding": fmt.ENC_FULL, "data": data})
            self._prev[i] = data
        t = max(0, time.monotonic_ns() - self._t0 if t_ns is None else t_ns)
        try:
            payload = fmt.snapshot_payload.build({
                "seq": seq, "t_ns": t, "probe": pid, "vcpu": vcpu, "flags": flags,
                "pc": pc, "sp": sp or 0, "regflags": regflags or 0, "regions": encoded,
            })
        except (ConstructError, ValueError) as e:  # a register negative or over 64 bits
            raise UsageError(f"snapshot {seq} cannot be stored: {e}") from None
        self._frame(fmt.KIND_SNAPSHOT, payload)
        self.count += 1
        if self.count % self._flush_every == 0:
            self._flush()
        return seq

    def guest_time(self, seq: int, icount: int) -> None:
        """Store the guest position of snapshot ``seq`` (e.g. QEMU's icount on a replay)."""
        self._frame(fmt.KIND_GUEST_TIME,
                    fmt.guest_time_payload.build({"seq": seq, "icount": icount}))

    def note(self, event: str, **data: Any) -> None:
        """Record something that happened between snapshots (e.g. a detach)."""
        t = time.monotonic_ns() - self._t0
        body = json.dumps({"event": event, "t_ns": t, "after": self.count, **data}).encode()
        if len(body) > fmt.MAX_NOTE:
            raise UsageError(f"note {event!r} of {len(body)} bytes exceeds the format's "
                             f"bound ({fmt.MAX_NOTE})")
        self._frame(fmt.KIND_NOTE, body)
        self._flush()

    def close(self, **stats: Any) -> None:
        """Write the trailer that marks a clean close, and close the file.

        After a write error there is no trailer (the file did not close cleanly) and the
        error is raised again; the file is closed either way.
        """
        if self.closed:
            return
        try:
            if self.error is None:
                body = json.dumps({"snapshots": self.count, **stats}).encode()
                if len(body) > fmt.MAX_NOTE:  # keep the clean close, drop the statistics
                    body = json.dumps({"snapshots": self.count, "stats": "too large"}).encode()
                self._frame(fmt.KIND_END, body)
                self._flush()
        finally:
            self.abandon()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Close without the trailer (after a failed write): the file ends at its last
        complete frame and reads back as not closed cleanly."""
        if self.closed:
            return
        self.closed = True
        if self._own:
            try:
                self._f.close()  # flushes what is buffered: every complete frame
            except OSError as e:
                self._failed(e)

    def __enter__(self) -> XrrWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # leaving on an exception: not a clean close, and that exception wins
            self.abandon()


def rewrite(src: str | os.PathLike, dst: str | os.PathLike,
            version: tuple[int, int] | None = None) -> int:
    """``src`` written again snapshot for snapshot in ``version`` (default: the current
    format), unread regions kept unread; returns the number of snapshots.  Notes are not
    carried over."""
    from xreplay.xrr.reader import XrrReader

    n = 0
    with XrrReader(src) as r, XrrWriter(dst, r.header, version=version or (
            fmt.VERSION_MAJOR, fmt.VERSION_MINOR)) as w:
        for rec in r.records():
            regions = [None if rec.unread >> i & 1 else data
                       for i, data in enumerate(rec.regions)]
            w.append(probe=rec.probe, vcpu=rec.vcpu, pc=rec.pc, sp=rec.sp,
                     regflags=rec.regflags, t_ns=rec.t_ns, hang=rec.hang, regions=regions)
            n += 1
    return n
