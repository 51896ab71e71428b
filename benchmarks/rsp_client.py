"""A minimal GDB remote-serial-protocol client: the practical limit for break/read/continue.

It does only what a snapshot loop needs, with as little Python per packet as possible, so
its rate is what the stub and the socket allow (see shared/gdbstub-limits.md): no checksum
check on input (TCP is reliable and gdbserver's no-ack mode assumes exactly that), replies
found with ``bytes.find`` and hex decoded as the direct hit loop decodes it
(:func:`xreplay.gdb.rsp.decode_hex`: ``bytes.find`` for the run-length encoding, then
``bytes.fromhex``).  Neither gdbserver nor QEMU steps over its own Z0 breakpoint, so
:meth:`RspClient.step_over` does ``z0`` / single-step / ``Z0``.  A stub without
``QStartNoAckMode`` (QEMU 7.2) is spoken to in ack mode: every reply is acknowledged with
``+`` (an extra send, no extra wait), and the stub's own ``+`` acks are skipped.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from dataclasses import dataclass, field

# The framing and hex decoding are xreplay's own (xreplay.gdb.rsp), so the baseline does
# exactly the work per packet that the direct hit loop does: the ratio measures the loop.
from xreplay.gdb.rsp import decode_hex, frame

_THREAD = re.compile(rb"thread:([0-9a-fA-Fp.\-]+);")

__all__ = ["RspClient", "RspError", "StopReply", "decode_hex", "frame"]


class RspError(RuntimeError):
    """The stub answered an error or something this client does not understand."""


@dataclass
class StopReply:
    """A ``T``/``S`` stop, or an exit (``W``/``X``)."""

    raw: bytes
    exited: bool
    thread: bytes | None = None


@dataclass
class RspClient:
    """One connection to a gdbstub, one request in flight (or an explicit pipelined batch)."""

    host: str
    port: int
    timeout: float = 10.0
    read_chunk: int | None = None  # bytes per ``m``; None = derived from PacketSize
    sock: socket.socket = field(init=False, repr=False)
    buf: bytearray = field(init=False, repr=False, default_factory=bytearray)
    ack: bool = field(init=False, default=True)
    packet_size: int = field(init=False, default=4096)
    features: dict[str, str] = field(init=False, default_factory=dict)
    vcont: set[str] = field(init=False, default_factory=set)
    packets_sent: int = field(init=False, default=0)

    # -- connection ----------------------------------------------------------------

    def connect(self, retry_for: float = 10.0) -> StopReply:
        """Connect (retrying while the stub starts), negotiate, return the initial stop."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"+")
        reply = self.request(b"qSupported:swbreak+;hwbreak+;vContSupported+")
        for item in reply.decode("ascii", "replace").split(";"):
            if "=" in item:
                k, v = item.split("=", 1)
                self.features[k] = v
            elif item:
                self.features[item[:-1]] = item[-1]
        self.packet_size = int(self.features.get("PacketSize", "1000"), 16)
        if self.features.get("QStartNoAckMode") == "+" and self.request(
                b"QStartNoAckMode") == b"OK":
            self.ack = False
        vc = self.request(b"vCont?")
        if vc.startswith(b"vCont"):
            self.vcont = set(vc.decode().split(";")[1:])
        return self.parse_stop(self.request(b"?"))

    def close(self) -> None:
        if hasattr(self, "sock"):
            self.sock.close()

    # -- packets -------------------------------------------------------------------

    def send(self, *payloads: bytes) -> None:
        """Send packets back to back (pipelining: the stub answers them in order)."""
        self.sock.sendall(b"".join(frame(p) for p in payloads))
        self.packets_sent += len(payloads)

    def recv(self) -> bytes:
        """The next packet's payload (acks and notifications skipped)."""
        buf = self.buf
        while True:
            start = buf.find(b"$")
            if start >= 0:
                end = buf.find(b"#", start)
                if end >= 0 and len(buf) >= end + 3:
                    payload = bytes(buf[start + 1:end])
                    del buf[:end + 3]
                    if self.ack:
                        self.sock.sendall(b"+")
                    return payload
            elif buf:
                buf.clear()  # only '+' acks (or a stray '-') before the next packet
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RspError("the stub closed the connection")
            buf += chunk

    def request(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.recv()

    # -- operations ----------------------------------------------------------------

    @staticmethod
    def parse_stop(reply: bytes) -> StopReply:
        kind = reply[:1]
        if kind in (b"W", b"X"):
            return StopReply(reply, exited=True)
        if kind not in (b"T", b"S"):
            raise RspError(f"not a stop reply: {reply[:60]!r}")
        m = _THREAD.search(reply)
        return StopReply(reply, exited=False, thread=m.group(1) if m else None)

    def resume_packet(self, step: bool = False, thread: bytes | None = None) -> bytes:
        action = "s" if step else "c"
        if action in self.vcont:
            return b"vCont;" + action.encode() + (b":" + thread if step and thread else b"")
        return action.encode()

    def cont(self) -> StopReply:
        return self.parse_stop(self.request(self.resume_packet()))

    def set_breakpoint(self, addr: int, insert: bool = True) -> None:
        reply = self.request(b"%s0,%x,1" % (b"Z" if insert else b"z", addr))
        if reply != b"OK":
            raise RspError(f"{'Z0' if insert else 'z0'} at {addr:#x}: {reply!r}")

    def step_over(self, addr: int, thread: bytes | None) -> StopReply:
        """Remove the breakpoint at ``addr``, single-step, reinsert it."""
        self.set_breakpoint(addr, False)
        stop = self.parse_stop(self.request(self.resume_packet(True, thread)))
        if not stop.exited:
            self.set_breakpoint(addr, True)
        return stop

    def max_read(self) -> int:
        """Bytes per ``m`` packet: the hex reply must fit PacketSize.

        ``read_chunk`` overrides it for a stub whose exact limit is known (QEMU 7.2 accepts
        up to PacketSize/2 = 2048 bytes), so a client reads in the same chunks gdb does.
        """
        if self.read_chunk:
            return self.read_chunk
        return max(16, (self.packet_size - 16) // 2)

    def read_packets(self, addr: int, size: int) -> list[bytes]:
        step = self.max_read()
        return [b"m%x,%x" % (a, min(step, addr + size - a)) for a in range(addr, addr + size, step)]

    def read_memory(self, addr: int, size: int) -> bytes:
        out = []
        for pkt in self.read_packets(addr, size):
            reply = self.request(pkt)
            if reply[:1] == b"E" and len(reply) == 3:
                raise RspError(f"{pkt.decode()}: {reply.decode()}")
            out.append(decode_hex(reply))
        data = b"".join(out)
        if len(data) != size:
            raise RspError(f"read {len(data)} of {size} bytes at {addr:#x}")
        return data

    def read_registers(self) -> bytes:
        """The whole register file with ``g`` (QEMU 7.2 answers ``p`` with "unsupported"),
        in the stub's layout: QEMU's x86_64 stub sends x86-64 order even for 32-bit code."""
        reply = self.request(b"g")
        if reply[:1] == b"E" and len(reply) == 3:
            raise RspError(f"g: {reply.decode()}")
        return decode_hex(reply)

    def kill(self) -> None:
        """Ask the stub to kill the target; the reply (if any) is not awaited."""
        with contextlib.suppress(OSError):
            self.send(b"k")
