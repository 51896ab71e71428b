"""The writer side of a recording: the output file, created only once set-up succeeded.

A run that fails before its first snapshot must not destroy a recording that was already
at the output path, nor leave an empty "closed cleanly" file behind, so the
:class:`~xreplay.xrr.XrrWriter` is created by :meth:`RecordingSink.open`, after the agent
said hello.  The first failed write (a full disk) stops appending; the file keeps every
complete frame before it, and the recorder ends the run with ``write-error``.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from xreplay.errors import XReplayError
from xreplay.xrr import RecordingHeader, XrrWriter
from xreplay.xrr.header import PAGE_COUNT_KIND


class RecordingSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: XrrWriter | None = None
        self.header: RecordingHeader | None = None
        self.lock = threading.Lock()
        self.error: str | None = None  # the first write failure, as one line
        self.unreadable: Counter[str] = Counter()
        self.readable_shared_info = 0
        self.hang_seq: int | None = None
        self._failed = threading.Event()

    @property
    def count(self) -> int:
        return self.writer.count if self.writer is not None else 0

    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def open(self, header: RecordingHeader) -> None:
        try:
            self.writer = XrrWriter(self.path, header)
        except OSError as e:
            raise XReplayError(f"{self.path}: cannot write the recording ({e.strerror})"
                               ) from None
        self.header = header

    def _fail(self, e: Exception) -> None:
        if self.error is None:
            cause = e if isinstance(e, OSError) else e.__cause__
            errno_ = getattr(cause, "errno", None)
            what = ("disk full" if errno_ == 28 else
                    getattr(cause, "strerror", None) or str(e))
            self.error = f"{what} writing {self.path} after {self.count} snapshots"
        self._failed.set()

    def since_start(self, monotonic_ns: int) -> int:
        """A host monotonic time (ns) as the recording's ``t_ns`` (since it began)."""
        assert self.writer is not None
        return max(0, monotonic_ns - self.writer.t0_ns)

    def append(self, **snapshot: Any) -> int | None:
        """Store one snapshot; None once writing has failed."""
        regions = snapshot["regions"]
        assert self.writer is not None and self.header is not None
        with self.lock:
            if self.failed:
                return None
            try:
                seq = self.writer.append(**snapshot)
            except (OSError, XReplayError) as e:
                self._fail(e)
                return None
        in_use = self._pages_in_use(regions)
        for spec, data in zip(self.header.regions, regions, strict=False):
            if data is None and in_use is not None and spec.kind == "fifo_event_page" and (
                    spec.page is None or spec.page >= in_use):
                continue  # a FIFO page the guest has not given Xen yet: nothing to read
            if data is None:
                self.unreadable[spec.name] += 1
            elif spec.kind == "shared_info":
                self.readable_shared_info += 1
        if snapshot.get("hang"):
            self.hang_seq = seq
        return seq

    def _pages_in_use(self, regions: list[bytes | None]) -> int | None:
        """The guest's FIFO page count read at this hit, if the header has one."""
        assert self.header is not None
        for spec, data in zip(self.header.regions, regions, strict=False):
            if spec.kind == PAGE_COUNT_KIND:
                return None if data is None else int.from_bytes(data[:4], "little")
        return None

    def guest_time(self, icount: int) -> None:
        """The guest position (QEMU icount) of the snapshot appended last."""
        if self.writer is None or not self.count:
            return
        with self.lock:
            if self.failed:
                return
            try:
                self.writer.guest_time(self.count - 1, icount)
            except OSError as e:
                self._fail(e)

    def note(self, event: str, **data: Any) -> None:
        if self.writer is None:
            return
        with self.lock:
            if self.failed:
                return
            try:
                self.writer.note(event, **data)
            except (OSError, XReplayError) as e:
                self._fail(e)

    def close(self, **stats: Any) -> None:
        """The trailer that marks a clean close, unless writing failed (then the file
        ends at its last complete frame and reads as not closed cleanly)."""
        if self.writer is None or self.writer.closed:
            return
        with self.lock:
            if not self.failed:
                try:
                    self.writer.close(**stats)
                    return
                except (OSError, XReplayError) as e:
                    self._fail(e)
            self.writer.abandon()

    def abandon(self) -> None:
        """Close without the trailer: the run broke off (an exception), so the file must
        not claim a clean close."""
        if self.writer is not None and not self.writer.closed:
            with self.lock:
                self.writer.abandon()
