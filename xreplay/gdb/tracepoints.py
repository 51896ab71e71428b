"""gdbserver's trap tracepoints at the packet level: collect at each hit inside the stub.

With a tracepoint at a probe address, gdbserver itself stops the thread at each hit,
copies the registers (``R``) and the named memory (``M``) into its trace buffer, steps over
and resumes: no round trip to the client per hit (GDB manual, "Tracepoint Packets";
gdbserver/tracepoint.cc).  What this module knows, and what gdbserver 13 does with it:

* **A batch ends by itself after exactly N hits.**  A linear trace buffer that fills stops
  *collecting* but not the program (the hits after it are lost), and a pass count stops
  the run on one tracepoint's count while the program runs on untraced.  So each
  tracepoint's actions also add 1 to a trace state variable (an ``X`` action: ``getv``,
  ``add``, ``setv``), and a GDB breakpoint at every probe address carries a condition
  evaluated in gdbserver (``Z0,ADDR,1;X...``: ``tsv >= N``): gdbserver collects the hit,
  then reports the stop only when the condition holds.  The thread is then stopped at the
  N-th hit, already collected.
* **The next batch**: ``QTinit`` (empties the buffer), the variable redefined at 0
  (``QTDV``), the tracepoints again (``QTDP``), ``QTStart``, continue.  The condition is
  now false, so gdbserver steps over the stopped thread's breakpoint itself, without
  collecting that hit a second time.
* **Frames in bulk**: ``qTBuffer:OFFSET,LEN`` gives the raw buffer (a linear buffer is
  one contiguous run); each frame is a 2-byte tracepoint number, a 4-byte data size, then
  blocks: ``R`` + the register block in ``g``'s layout (pc already rewound onto the
  probe), ``M`` + 8-byte address + 2-byte length + the bytes (at most 65535 a block),
  ``V`` + 4-byte number + 8-byte value.  Host byte order (gdbserver runs on the target).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from xreplay.gdb.rsp import RspError, expand_rle

#: agent-expression opcodes (gdbsupport/ax.def)
_ADD, _LESS_UNSIGNED, _LOG_NOT, _CONST32, _END, _GETV, _SETV, _CONST8, _TRACEV = (
    0x02, 0x15, 0x0E, 0x24, 0x27, 0x2C, 0x2D, 0x22, 0x2E)
#: gdbserver's built-in trace state variable ``trace_timestamp``: microseconds of its steady
#: clock (CLOCK_MONOTONIC on Linux), read by a getter each time it is used
TIMESTAMP_TSV = 1
V_BLOCK = 1 + 4 + 8  # 'V', int number, LONGEST value
#: the trace state variable that counts this batch's hits
COUNTER_TSV = 100  # not 1: gdbserver's built-in trace_timestamp (a getter, kept by QTinit)
COUNTER_NAME = b"xreplay_hits"
FRAME_HEADER = 6  # int tpnum:16, unsigned data_size:32, packed
M_BLOCK_MAX = 65535
M_BLOCK_HEADER = 1 + 8 + 2  # 'M', CORE_ADDR, unsigned short length
#: gdbserver's own default (tracepoint.cc DEFAULT_TRACE_BUFFER_SIZE)
DEFAULT_BUFFER = 5 * 1024 * 1024


def _agent_expr(code: bytes) -> bytes:
    return b"X%x,%s" % (len(code), code.hex().encode())


def count_action() -> bytes:
    """``X``: tsv += 1, and the hit's time recorded in the frame (``tracev`` of
    ``trace_timestamp``: a ``V`` block).  ``setv`` leaves the value on the stack; the
    action's result is dropped by gdbserver."""
    v = COUNTER_TSV.to_bytes(2, "big")
    ts = TIMESTAMP_TSV.to_bytes(2, "big")
    return _agent_expr(bytes([_GETV, *v, _CONST8, 1, _ADD, _SETV, *v, _TRACEV, *ts, _END]))


def batch_condition(n: int) -> bytes:
    """A breakpoint condition gdbserver evaluates at each hit: true once tsv >= ``n``."""
    if not 0 < n < 1 << 32:
        raise ValueError(f"batch size {n} out of range")
    v = COUNTER_TSV.to_bytes(2, "big")
    return _agent_expr(bytes([_GETV, *v, _CONST32, *n.to_bytes(4, "big"), _LESS_UNSIGNED,
                              _LOG_NOT, _END]))


def define_counter() -> bytes:
    """``QTDV``: the hit counter, starting at 0 (redefining it resets it)."""
    return b"QTDV:%x:0:0:%s" % (COUNTER_TSV, COUNTER_NAME.hex().encode())


def define_tracepoint(number: int, addr: int, regions: list[tuple[int, int]]) -> list[bytes]:
    """``QTDP`` packets: an enabled trap tracepoint at ``addr`` (no step, no pass count)
    collecting the registers, each (address, size) region, and counting the hit."""
    actions = [b"R1"] + [b"M-1,%x,%x" % (a, s) for a, s in regions] + [count_action()]
    return [b"QTDP:%x:%x:E:0:0-" % (number, addr),
            b"QTDP:-%x:%x:%s" % (number, addr, b"".join(actions))]


def frame_size(register_bytes: int, regions: list[tuple[int, int]]) -> int:
    """Bytes one hit takes in the trace buffer (header, ``R`` block, ``M`` blocks, the
    timestamp's ``V`` block)."""
    size = FRAME_HEADER + 1 + register_bytes + V_BLOCK
    for _, length in regions:
        blocks = -(-length // M_BLOCK_MAX) if length else 0
        size += blocks * M_BLOCK_HEADER + length
    return size


@dataclass
class TraceStatus:
    """``qTStatus``'s answer: running, why it stopped, frames held and created, space."""

    running: bool
    stop_reason: str
    frames: int
    created: int
    free: int
    size: int
    raw: bytes = b""

    @property
    def used(self) -> int:
        return self.size - self.free


def parse_status(reply: bytes) -> TraceStatus:
    if reply[:1] != b"T" or len(reply) < 2:
        raise RspError(f"not a trace status: {reply[:60]!r}")
    reply = expand_rle(reply)  # gdbserver run-length encodes every reply ("50*!")
    fields: dict[str, str] = {}
    reason = ""
    for i, item in enumerate(reply[2:].lstrip(b";").decode("ascii", "replace").split(";")):
        key, _, value = item.partition(":")
        if i == 0:
            reason = key  # tnotrun, tstop, tfull, tpasscount, tdisconnected, terror...
        fields[key] = value
    try:
        return TraceStatus(reply[1:2] == b"1", reason, int(fields.get("tframes", "0"), 16),
                           int(fields.get("tcreated", "0"), 16),
                           int(fields.get("tfree", "0"), 16), int(fields.get("tsize", "0"), 16),
                           reply)
    except ValueError:
        raise RspError(f"trace status with a bad number: {reply[:120]!r}") from None


def buffer_requests(total: int, chunk: int) -> list[bytes]:
    """``qTBuffer`` packets for the first ``total`` bytes, ``chunk`` at a time (pipelined,
    the stub answers them in order); ``chunk`` must fit the stub's reply packet."""
    return [b"qTBuffer:%x,%x" % (at, min(chunk, total - at)) for at in range(0, total, chunk)]


@dataclass
class TraceFrame:
    tracepoint: int
    registers: bytes | None = None
    memory: list[tuple[int, bytes]] = field(default_factory=list)
    values: dict[int, int] = field(default_factory=dict)  # trace state variables recorded


def parse_frames(raw: bytes, register_bytes: int, byteorder: str = "little"
                 ) -> Iterator[TraceFrame]:
    """The frames of a linear trace buffer's bytes; RspError on anything malformed."""
    frames, at = split_frames(raw, 0, register_bytes, byteorder, final=True)
    yield from frames


def split_frames(raw: bytes | bytearray, at: int, register_bytes: int,
                 byteorder: str = "little", final: bool = False
                 ) -> tuple[list[TraceFrame], int]:
    """The whole frames in ``raw`` from byte ``at`` on, and where the next one starts (a
    buffer still being fetched ends inside a frame; ``final``: it must not).  RspError on
    anything malformed."""
    end = "<" if byteorder == "little" else ">"
    head = struct.Struct(end + "hI")
    addr_len = struct.Struct(end + "QH")
    tsv = struct.Struct(end + "iq")
    n = len(raw)
    frames: list[TraceFrame] = []
    while at < n:
        if at + FRAME_HEADER > n:
            if final:
                raise RspError(f"trace buffer ends inside a frame header at byte {at}")
            break
        tp, size = head.unpack_from(raw, at)
        if tp == 0:  # the end-of-buffer marker
            return frames, n
        data, stop = at + FRAME_HEADER, at + FRAME_HEADER + size
        if stop > n:
            if final:
                raise RspError(f"trace frame at byte {at} runs past the buffer ({size} bytes)")
            break
        frame = TraceFrame(tp)
        p = data
        while p < stop:
            kind = raw[p]
            p += 1
            if kind == 0x52:  # 'R'
                frame.registers = bytes(raw[p:p + register_bytes])
                p += register_bytes
            elif kind == 0x4D:  # 'M'
                addr, length = addr_len.unpack_from(raw, p)
                p += 10
                frame.memory.append((addr, bytes(raw[p:p + length])))
                p += length
            elif kind == 0x56:  # 'V'
                num, value = tsv.unpack_from(raw, p)
                frame.values[num] = value
                p += 12
            else:
                raise RspError(f"trace frame at byte {at}: unknown block {kind:#x}")
        if p != stop:
            raise RspError(f"trace frame at byte {at}: blocks end at {p - data} of {size} "
                           "bytes (register block size wrong?)")
        frames.append(frame)
        at = stop
    return frames, at


def frame_memory(frame: TraceFrame, addr: int, size: int) -> bytes | None:
    """The ``size`` bytes at ``addr`` from a frame's memory blocks (None if not all there)."""
    parts = []
    want = addr
    for a, data in frame.memory:
        if a == want and want < addr + size:
            parts.append(data)
            want += len(data)
    out = b"".join(parts)
    return out[:size] if len(out) >= size else None
