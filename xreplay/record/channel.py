"""The recorder's end of the agent's socket: accept, read, decode, dispatch.

The agent (inside gdb) connects back over a Unix socket and streams
:mod:`xreplay.gdb.wire` frames; a reader thread here decodes them, hands snapshots to a
callback and queues JSON events for :meth:`AgentChannel.wait_json`.  A broken stream is
kept in :attr:`AgentChannel.error` and ends the run rather than being lost in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from xreplay.gdb import wire

SnapshotHandler = Callable[[tuple[Any, ...]], None]


class AgentChannel:
    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "agent.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.error: str | None = None
        self._json: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._accepted: list[socket.socket] = []
        self._acceptor: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self.on_json: Callable[[dict[str, Any]], None] | None = None
        self.on_time: Callable[[int, int], None] | None = None  # (hit, icount) on a replay

    def expect_connection(self, timeout: float = 15.0) -> None:
        """Start accepting the agent's connection (before gdb loads it)."""
        self.listener.settimeout(timeout)

        def accept() -> None:
            with contextlib.suppress(OSError):
                self._accepted.append(self.listener.accept()[0])

        self._acceptor = threading.Thread(target=accept, daemon=True)
        self._acceptor.start()

    def start(self, on_snapshot: SnapshotHandler, timeout: float = 15.0) -> bool:
        """Wait for the agent to connect, then read in a thread; False if it never did."""
        assert self._acceptor is not None
        self._acceptor.join(timeout)
        if not self._accepted:
            return False
        conn = self._accepted[0]
        self._reader = threading.Thread(target=self._read, args=(conn, on_snapshot),
                                        daemon=True)
        self._reader.start()
        return True

    def _read(self, conn: socket.socket, on_snapshot: SnapshotHandler) -> None:
        f = conn.makefile("rb", buffering=1 << 16)
        try:
            while True:
                head = f.read(wire.FRAME.size)
                if len(head) < wire.FRAME.size:
                    return
                length, kind = wire.FRAME.unpack(head)
                body = f.read(length - 1)
                if len(body) < length - 1:
                    self.error = "the agent's stream ended inside a message"
                    return
                if kind == wire.SNAPSHOT_KIND:
                    on_snapshot(wire.unpack_snapshot(body))
                elif kind == wire.TIME_KIND:
                    if self.on_time is not None:
                        self.on_time(*wire.TIME.unpack(body))
                elif kind == wire.JSON_KIND:
                    event = json.loads(body)
                    if self.on_json is not None and event.get("event") == "region-moved":
                        self.on_json(event)
                        continue
                    with self._cond:
                        self._json.append(event)
                        self._cond.notify_all()
                else:
                    self.error = f"unknown message type {kind} from the agent"
                    return
        except (OSError, ValueError) as e:
            self.error = f"reading the agent's stream failed: {e}"
        finally:
            f.close()
            conn.close()
            with self._cond:
                self._cond.notify_all()

    def wait_json(self, event: str, timeout: float) -> dict[str, Any] | None:
        """The agent's next JSON message of this ``event``; None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, d in enumerate(self._json):
                    if d.get("event") == event:
                        return self._json.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def join(self, timeout: float) -> None:
        """Let the reader drain what the agent sent before it closed the socket."""
        if self._reader is not None:
            self._reader.join(timeout)

    def close(self) -> None:
        self.listener.close()
