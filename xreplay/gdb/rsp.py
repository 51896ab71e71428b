"""The GDB remote serial protocol at the byte level: framing, replies, stop packets.

Only what the recorder's direct hit loop (:mod:`xreplay.record.direct`) needs, with as
little Python per packet as possible (GDB manual, "Remote Protocol"): ``$payload#cs``
frames, run-length-encoded hex replies (gdbserver sends ``X*c``), and ``T``/``S``/``W``/
``X`` stop replies with their expedited registers.  Input checksums are not checked: the
connection is TCP, which is what gdbserver's no-ack mode relies on too.
"""

from __future__ import annotations

import re
import select
import socket
from dataclasses import dataclass, field

_RLE = re.compile(rb"(.)\*(.)", re.DOTALL)
_PAIR = re.compile(rb"([0-9a-zA-Z]+):([^;]*);")
INTERRUPT = b"\x03"


class RspError(RuntimeError):
    """The stub answered something the direct loop cannot use, or went away."""


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` with the protocol's modulo-256 checksum."""
    return b"$%s#%02x" % (payload, sum(payload) & 0xFF)


def _expand(m: re.Match[bytes]) -> bytes:
    # "X*c": X repeated (ord(c) - 29) more times
    return m.group(1) * (m.group(2)[0] - 28)


def expand_rle(payload: bytes) -> bytes:
    """A reply with gdbserver's run-length encoding (``X*c``) expanded (non-hex replies)."""
    return _RLE.sub(_expand, payload) if b"*" in payload else payload


def decode_hex_reference(payload: bytes) -> bytes:
    """:func:`decode_hex` as one regular expression (slow; the tests hold the two equal)."""
    if b"*" in payload:
        payload = _RLE.sub(_expand, payload)
    return bytes.fromhex(payload.decode("ascii"))


def decode_hex(payload: bytes, limit: int | None = None) -> bytes:
    """A hex (possibly run-length encoded) reply to bytes; ValueError if it is not hex.
    ``limit``: only the first ``limit`` bytes are wanted (a ``g`` reply's first registers),
    so the expansion stops once they are known.

    Every hit decodes a few kilobytes of replies in which gdbserver run-length encodes each
    run of equal hex digits (~100 runs in a mostly-zero shared_info page), so the runs are
    found with ``bytes.find`` and joined once, not substituted by a regex callback each.
    """
    j = payload.find(b"*")
    if j < 0:
        return bytes.fromhex((payload if limit is None else payload[:2 * limit]).decode("ascii"))
    find = payload.find
    parts = []
    pos = 0
    end = len(payload) - 1
    want = -1 if limit is None else 2 * limit  # hex digits
    have = 0
    while j >= 0:
        if j == pos or j >= end:  # no digit before the '*' or no count after it
            raise ValueError(f"bad run-length encoding at {j}")
        literal = payload[pos:j - 1]
        run = payload[j - 1:j] * (payload[j + 1] - 28)
        parts.append(literal)
        parts.append(run)
        pos = j + 2
        if want >= 0:
            have += len(literal) + len(run)
            if have >= want:
                return bytes.fromhex(b"".join(parts)[:want].decode("ascii"))
        j = find(b"*", pos)
    parts.append(payload[pos:])
    out = b"".join(parts)
    return bytes.fromhex((out if want < 0 else out[:want]).decode("ascii"))


def is_error(reply: bytes) -> bool:
    return reply[:1] == b"E" and len(reply) == 3


@dataclass
class Stop:
    """A stop reply: ``signal`` (None for an exit), the thread, expedited registers."""

    raw: bytes
    signal: int | None
    thread: bytes | None = None
    registers: dict[int, bytes] = field(default_factory=dict)  # remote number -> raw value

    @property
    def exited(self) -> bool:
        return self.signal is None


def parse_stop(reply: bytes) -> Stop:
    kind = reply[:1]
    if kind in (b"W", b"X"):
        return Stop(reply, None)
    if kind not in (b"T", b"S") or len(reply) < 3:
        raise RspError(f"not a stop reply: {reply[:60]!r}")
    sig = int(reply[1:3], 16)
    stop = Stop(reply, sig)
    if kind == b"T":
        for key, value in _PAIR.findall(reply[3:] + b";"):
            if key == b"thread":
                stop.thread = value
            elif all(c in b"0123456789abcdefABCDEF" for c in key):
                stop.registers[int(key, 16)] = value
    return stop


def thread_lwp(thread: bytes | None) -> int | None:
    """The thread number of ``pPID.TID`` or ``TID`` (hex), as gdb's ptid ``lwp``."""
    if not thread:
        return None
    tid = thread.rsplit(b".", 1)[-1]
    try:
        return int(tid, 16)
    except ValueError:
        return None


class Connection:
    """One stub connection, taken over from gdb (see :mod:`xreplay.gdb.proxy`).

    ``ack``: the stub runs in ack mode (QEMU 7.2 has no ``QStartNoAckMode``).  Acks are
    sent only where :meth:`recv` is told to: QEMU stops a running guest at any byte that is
    not an ack of its last reply, so an ack for a reply whose successor was already sent
    must not go out.
    """

    def __init__(self, sock: socket.socket, ack: bool, pending: bytes = b"") -> None:
        self.sock = sock
        self.ack = ack
        self.buf = bytearray(pending)
        self.sent = 0  # packets sent
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def send(self, *payloads: bytes) -> None:
        self.sock.sendall(b"".join(frame(p) for p in payloads))
        self.sent += len(payloads)

    def interrupt(self) -> None:
        self.sock.sendall(INTERRUPT)

    def poll(self, timeout: float) -> bool:
        """True once a whole packet is buffered (or the stub closed: recv raises then)."""
        if self._complete() >= 0:
            return True
        # poll(2) on the blocking socket: two syscalls, not settimeout's two fcntls more
        if not self._poller.poll(timeout * 1000):
            return False
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RspError("the stub closed the connection")
        self.buf += chunk
        return self._complete() >= 0

    def _complete(self) -> int:
        buf = self.buf
        start = buf.find(b"$")
        if start < 0:
            if buf:
                buf.clear()  # only acks ('+') before the next packet
            return -1
        end = buf.find(b"#", start)
        return end if end >= 0 and len(buf) >= end + 3 else -1

    def recv(self, ack: bool = True) -> bytes:
        """The next packet's payload (acks skipped); ``ack``: acknowledge it (ack mode)."""
        buf = self.buf
        while True:
            end = self._complete()
            if end >= 0:
                start = buf.find(b"$")
                payload = bytes(buf[start + 1:end])
                del buf[:end + 3]
                if self.ack and ack:
                    self.sock.sendall(b"+")
                return payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RspError("the stub closed the connection")
            buf += chunk
