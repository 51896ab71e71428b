"""A TCP relay between gdb and the gdbstub, so the recorder can take the connection over.

``gdbserver --once`` and gdbsx serve exactly one connection, and QEMU's stub one at a
time, so a second client cannot join gdb's; instead gdb connects here and every byte is
relayed.  Once gdb has resolved every address and is stopped (idle: it sends nothing),
:meth:`StubProxy.take` pauses the relay and hands the stub's socket to the direct hit
loop; :meth:`StubProxy.give_back` resumes relaying, with the target stopped and no
breakpoint of the loop's left in it, so gdb finds it as it left it (apart from registers
and memory, whose caches the recorder flushes).

The relay also reads what the direct loop must know from gdb's own negotiation: whether the
stub accepted ``QStartNoAckMode`` and its ``PacketSize``; and it counts the packets gdb
sends, for the benchmark's per-hit packet count.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading

_PACKET_SIZE = re.compile(rb"PacketSize=([0-9a-fA-F]+)")


class StubProxy:
    def __init__(self, upstream: str, connect_timeout: float = 10.0) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.connect_timeout = connect_timeout
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.gdb_sock: socket.socket | None = None
        self.stub_sock: socket.socket | None = None
        self.noack = False
        self.packet_size: int | None = None
        self.gdb_packets = 0  # packets gdb sent to the stub
        self.error: str | None = None
        self._noack_asked = False
        self._paused = threading.Event()
        self._idle = threading.Event()  # the relay thread is parked (paused or ended)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xreplay-proxy", daemon=True)
        self._thread.start()

    # -- relay ---------------------------------------------------------------------

    def _accept(self) -> bool:
        """gdb's connection, then ours to the stub; gdb retries a refused connection, so a
        failed upstream connect just closes gdb's and waits for the next."""
        while not self._stop.is_set():
            r, _, _ = select.select([self.listener], [], [], 0.1)
            if not r:
                continue
            conn, _ = self.listener.accept()
            try:
                up = socket.create_connection(self.upstream, timeout=self.connect_timeout)
            except OSError as e:
                self.error = f"cannot connect to the gdbstub at {self.upstream}: {e}"
                conn.close()
                continue
            for s in (conn, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            self.gdb_sock, self.stub_sock = conn, up
            self.noack, self._noack_asked, self.packet_size = False, False, None
            return True
        return False

    def _run(self) -> None:
        """Relay each connection gdb makes (it reconnects, e.g. to retry QEMU with the
        register set QEMU's stub sends) until :meth:`close`."""
        try:
            while self._accept():
                self._relay()
                self._close_both()
        finally:
            self._idle.set()
            self._close_both()

    def _relay(self) -> None:
        assert self.gdb_sock is not None and self.stub_sock is not None
        g, s = self.gdb_sock, self.stub_sock
        try:
            while not self._stop.is_set():
                if self._paused.is_set():
                    self._idle.set()
                    while self._paused.is_set() and not self._stop.is_set():
                        self._stop.wait(0.005)
                    self._idle.clear()
                    continue
                r, _, _ = select.select([g, s], [], [], 0.02)
                for src in r:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is g:
                        self._from_gdb(data)
                        s.sendall(data)
                    else:
                        self._from_stub(data)
                        g.sendall(data)
        except OSError as e:
            self.error = f"relay between gdb and the gdbstub failed: {e}"

    def _from_gdb(self, data: bytes) -> None:
        self.gdb_packets += data.count(b"$")
        if b"$QStartNoAckMode#" in data:
            self._noack_asked = True

    def _from_stub(self, data: bytes) -> None:
        if self.packet_size is None:
            m = _PACKET_SIZE.search(data)
            if m:
                self.packet_size = int(m.group(1), 16)
        if self._noack_asked and not self.noack and b"$OK#" in data:
            self.noack = True
            self._noack_asked = False

    def _close_both(self) -> None:
        for sock in (self.gdb_sock, self.stub_sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    # -- hand-over -----------------------------------------------------------------

    def take(self, timeout: float = 5.0) -> socket.socket | None:
        """Pause the relay and return the stub's socket (None when the relay has ended)."""
        if self.stub_sock is None or not self._thread.is_alive():
            return None
        self._paused.set()
        if not self._idle.wait(timeout) or not self._thread.is_alive():
            return None
        return self.stub_sock

    def give_back(self) -> None:
        """Relay again (gdb's own bytes sent meanwhile were held in its socket)."""
        self._paused.clear()

    def close(self) -> None:
        self._stop.set()
        self._paused.clear()
        self._thread.join(2)
        self._close_both()
        self.listener.close()
