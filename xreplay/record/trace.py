"""The trace hit loop (``--hit-loop trace``): gdbserver collects every hit itself.

The direct loop still pays one round trip per hit; here each probe address carries a
gdbserver tracepoint (:mod:`xreplay.gdb.tracepoints`) that copies the registers and every
region into gdbserver's trace buffer and resumes the thread, with no packet to the
recorder.  A batch of hits ends by itself at its N-th hit (a breakpoint condition on a hit
counter, evaluated in gdbserver), the buffer is fetched in bulk, its frames become the same
snapshots the direct loop stores (probe, pc/sp/flags, regions; the writer's deltas), and
the next batch starts from the stopped thread.

Limits, all checked or stated:

* gdbserver only, all-stop, one thread: trace frames do not say which thread hit, so a
  second thread (seen at each batch's end) ends the run with an error instead of a guess.
* Regions at fixed addresses (no pointer followed at each hit), each checked readable once
  at the start: gdbserver does not report a failed read inside a collection.
* A batch is at most what the buffer holds (``buffer_size`` / the frame size, bounded by
  the ``--count`` left); gdbserver's buffer filling anyway (it stops collecting, not the
  program) is detected at the fetch and is an error, never fewer snapshots in silence.
* Each frame records gdbserver's ``trace_timestamp`` (its steady clock, microseconds), so a
  snapshot's ``t_ns`` is its hit's time (the clock offset measured by one ``qTV`` round trip
  at each batch's start), not the fetch's.  ``--hang-after`` interrupts after that long
  without a *fetched* hit, fetches what the batch holds, and it is a hang when the last hit
  is that old (the hang snapshot then follows, as in the direct loop); otherwise tracing
  goes on.
* What is lost if gdbserver dies: the hits of the batch in progress (they live in its
  memory; how many is unknown).  The ``trace-batches`` note and the end note's ``trace`` key
  say how many batches and snapshots were fetched and, then, ``lost``: which batch.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from xreplay.gdb import tracepoints as tp
from xreplay.gdb.rsp import Connection, RspError, Stop, decode_hex, expand_rle, is_error
from xreplay.record.direct import CRASH_SIGNALS, SIGINT, SIGTRAP, DirectLoop, DirectPlan, Hooks
from xreplay.record.options import EndReason

#: default trace buffer: ~17,000 hits of a 3136-byte shared_info and x86_64 registers
DEFAULT_BUFFER_SIZE = 64 * 1024 * 1024
#: qTBuffer requests in flight at once (their replies are up to PacketSize each)
FETCH_WINDOW = 64
#: exit and exit_group by the size of the pc (x86_64, i386): caught (``QCatchSyscalls``) so
#: a batch is fetched before the process ends (gdbserver closes the connection at the exit
#: of the last process once gdb's session has set it up)
EXIT_SYSCALLS = {8: (0x3C, 0xE7), 4: (0x01, 0xFC)}


def why_not(p: DirectPlan) -> str | None:
    """Why the trace loop cannot record this plan, or None."""
    if p.stub.value != "gdbserver":
        return f"tracepoints are gdbserver's; the stub is {p.stub}"
    if p.follows:
        return ("a region is read through a pointer at each hit (a tracepoint collects fixed "
                "addresses)")
    if any(r.address is None for r in p.regions):
        return "a region has no address yet"
    if len(p.threads) > 1:
        return ("the target has several threads, and trace frames do not say which thread "
                "hit (use --hit-loop direct)")
    if p.dedupe:
        return "de-duplication compares consecutive stops of one thread, done per hit"
    return None


class TraceLoop(DirectLoop):
    def __init__(self, conn: Connection, p: DirectPlan, hooks: Hooks,
                 buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        super().__init__(conn, p, hooks)
        self.buffer_size = max(tp.DEFAULT_BUFFER, buffer_size)
        self.addrs = sorted(p.probes)
        self.regsize = 0
        self.batch = 0  # hits a full batch holds
        self.armed = 0  # the count the breakpoints' conditions end a batch at
        self.tracing = False
        self.in_flight = False  # a batch started and not yet fetched
        #: local monotonic ns minus gdbserver's trace_timestamp in ns (its steady clock; the
        #: same clock on one host, an offset across hosts), measured at each batch's start
        self.clock_offset: int | None = None
        self.last_hit_ns: int | None = None  # local monotonic ns of the last fetched hit
        self.batches = 0
        self.hw_checked = True  # nothing of the direct loop's own checks applies

    def describe(self) -> str:
        return (f"gdbserver tracepoints (hits collected inside gdbserver, batches of up to "
                f"{self.batch}, fetched with qTBuffer)")

    # -- set-up and teardown -----------------------------------------------------------

    def _regions(self) -> list[tuple[int, int]]:
        return [(int(r.address or 0), r.size) for r in self.p.regions]

    def insert(self) -> None:
        """Register block size, regions readable, buffer, conditional breakpoints."""
        g = self._request(b"g")
        if is_error(g) or not g:
            raise RspError(f"g: {g!r}")
        self.regsize = len(expand_rle(g)) // 2
        for r in self.p.regions:
            reply = self._request(b"m%x,1" % int(r.address or 0))
            if is_error(reply) or not reply:
                raise RspError(f"region {r.name} at {int(r.address or 0):#x} is not readable "
                               "(a tracepoint would collect whatever gdbserver's buffer held)")
        per_frame = tp.frame_size(self.regsize, self._regions())
        self.batch = max(1, (self.buffer_size - 4096) // per_frame)
        reply = self._request(b"QTBuffer:size:%x" % self.buffer_size)
        if reply != b"OK":
            raise RspError(f"QTBuffer:size refused: {reply!r}")
        self._arm(self._want())
        exits = EXIT_SYSCALLS.get(self.p.registers["pc"][2])
        caught = exits is not None and self._request(
            b"QCatchSyscalls:1;" + b";".join(b"%x" % n for n in exits)) == b"OK"
        if not caught:
            self.p.notes.append("the process's exit is not caught (QCatchSyscalls): a batch "
                                "in progress when it exits is lost")

    def _want(self) -> int:
        return min(self.batch, self.p.count - self.hits) if self.p.count else self.batch

    def _arm(self, n: int) -> None:
        """A breakpoint at every probe address that stops only at the batch's n-th hit (a
        second Z0 at an address replaces its condition)."""
        cond = tp.batch_condition(n)
        self.c.send(*(b"Z0,%x,1;%s" % (a, cond) for a in self.addrs))
        replies = [self.c.recv() for _ in self.addrs]
        if any(r != b"OK" for r in replies):
            raise RspError(f"conditional Z0 refused: {replies!r}")
        self.inserted = [(b"0", a) for a in self.addrs]
        self.armed = n

    def remove(self) -> None:
        """Tracing stopped, tracepoints out of the code, the breakpoints removed."""
        self._request(b"QTStop")
        self._request(b"QTinit")
        self._request(b"QCatchSyscalls:0")
        self.tracing = False
        super().remove()

    def _start(self, resume: bytes) -> None:
        """The next batch: empty buffer, counter at 0, tracepoints, QTStart, resume."""
        regions = self._regions()
        setup = [b"QTinit", tp.define_counter()]
        for i, a in enumerate(self.addrs):
            setup += tp.define_tracepoint(i + 1, a, regions)
        setup.append(b"QTStart")
        self.c.send(*setup)
        replies = [self.c.recv() for _ in setup]
        if any(r != b"OK" for r in replies):
            raise RspError(f"trace set-up refused: {replies!r}")
        self.tracing = self.in_flight = True
        # the stub's clock against ours, bracketed by one round trip (qTV answers "U"
        # before the first run, so only once tracing)
        t_a = time.monotonic_ns()
        reply = self._request(b"qTV:%x" % tp.TIMESTAMP_TSV)
        t_b = time.monotonic_ns()
        if reply[:1] == b"V":
            with contextlib.suppress(ValueError):
                self.clock_offset = (t_a + t_b) // 2 - int(reply[1:], 16) * 1000
        self.c.send(resume)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> tuple[EndReason, bool]:
        self._start(self._resume(None))
        while True:
            stop, why = self.wait_stop()
            if stop is None:  # the stub went away: lost() says what the end note must
                return EndReason.TARGET_LOST, False
            got = self.drain(stop)
            if stop.exited:
                return EndReason.TARGET_EXITED, False
            if b"syscall_entry" in stop.raw and why is None:  # exit/exit_group: let it end
                self._request(b"QCatchSyscalls:0")
                self.c.send(self._resume(None))
                stop, why = self.wait_stop()
                if stop is None or stop.exited:
                    return EndReason.TARGET_EXITED, False
                return (why or EndReason.INTERRUPTED), True
            sig = stop.signal
            resume = self._resume(None)
            if why is not None:
                if why is EndReason.HANG and got and self._quiet_since_last_hit():
                    got = 0  # hits in the interval, but none for --hang-after: a hang
                if not (why is EndReason.HANG and got):
                    if why in (EndReason.HANG, EndReason.INTERRUPTED) and (
                            why is EndReason.HANG
                            or self._idle() >= self.h.interrupt_hang_after):
                        self.hang_snapshot(stop)
                    return why, True
                # hits in the interval: not a hang; the next batch starts here
            elif sig in CRASH_SIGNALS:
                self.crash_signal = CRASH_SIGNALS[sig]
                return EndReason.TARGET_CRASHED, True
            elif sig not in (SIGTRAP, SIGINT):
                resume = self._resume(stop.thread, sig or 0)  # the target's own signal
            elif not self._at_probe(stop):
                return EndReason.INTERRUPTED, True
            elif got != self.armed:
                raise RspError(f"a batch ended at its hit {got}, armed for {self.armed}")
            if self.p.count and self.hits >= self.p.count:
                return EndReason.COUNT, True
            want = self._want()
            if want != self.armed:
                self._arm(want)
            self._start(resume)

    def _idle(self) -> float:
        """Seconds since the last hit: by its own timestamp once one was fetched."""
        if self.last_hit_ns is None:
            return self.h.idle()
        return (time.monotonic_ns() - self.last_hit_ns) / 1e9

    def _quiet_since_last_hit(self) -> bool:
        """The last fetched hit (by gdbserver's timestamp) is --hang-after old or more."""
        hang_after = self.h.hang_after
        return (hang_after is not None and self.last_hit_ns is not None
                and time.monotonic_ns() - self.last_hit_ns >= hang_after * 1e9)

    def _at_probe(self, stop: Stop) -> bool:
        rnum = self.p.registers["pc"][0]
        if stop.signal != SIGTRAP or rnum not in stop.registers:
            return False
        return self._value(decode_hex(stop.registers[rnum])) in self.p.probes

    def drain(self, stop: Stop) -> int:
        """Stop tracing, fetch the buffer, store its frames as snapshots; their count."""
        self.c.send(b"QTStop", b"qTStatus", b"qfThreadInfo")
        stopped, status_reply, threads = self.c.recv(), self.c.recv(), self.c.recv()
        self.tracing = False
        if stopped != b"OK":
            raise RspError(f"QTStop refused: {stopped!r}")
        status = tp.parse_status(status_reply)
        if status.stop_reason == "tfull":
            raise RspError(f"gdbserver's trace buffer filled after {status.frames} hits of "
                           "this batch: hits after it were not collected")
        if b"," in threads:
            raise RspError("a second thread appeared, and trace frames do not say which "
                           "thread hit: record this target with --hit-loop direct")
        reqs = tp.buffer_requests(status.used, self.p.max_read)
        raw = bytearray()
        at = stored = 0
        vcpu = self._vcpu(stop.thread)
        for w in range(0, len(reqs), FETCH_WINDOW):
            window = reqs[w:w + FETCH_WINDOW]
            self.c.send(*window)
            for _ in window:
                reply = self.c.recv()
                if is_error(reply) or reply == b"l":
                    raise RspError(f"qTBuffer at {len(raw)} of {status.used}: {reply!r}")
                raw += decode_hex(reply)
            # the whole frames so far go to the writer while the next window is fetched
            frames, at = tp.split_frames(raw, at, self.regsize, self.p.byteorder,
                                         final=w + FETCH_WINDOW >= len(reqs))
            snaps = [self._snapshot(fr, vcpu, self.hits + i) for i, fr in enumerate(frames)]
            for snap in snaps:
                self.h.on_snapshot(snap)
            stored += len(snaps)
            self.hits += len(snaps)
        if stored != status.frames:
            raise RspError(f"{stored} trace frames in the buffer, gdbserver counted "
                           f"{status.frames}")
        self.batches += 1
        self.in_flight = False
        return stored

    def lost(self) -> str | None:
        """What the end note must say was not recorded, or None."""
        if not self.in_flight:
            return None
        return (f"the hits of batch {self.batches + 1} (after snapshot {self.hits}) were in "
                "gdbserver's trace buffer and were not fetched: how many is unknown")

    def _snapshot(self, fr: tp.TraceFrame, vcpu: int, seq: int) -> tuple[Any, ...]:
        if not 0 < fr.tracepoint <= len(self.addrs):
            raise RspError(f"a trace frame of tracepoint {fr.tracepoint}, not one of ours")
        addr = self.addrs[fr.tracepoint - 1]
        regs = fr.registers or b""
        values: dict[str, int | None] = {}
        for k, (_, goff, size) in self.p.registers.items():
            raw = regs[goff:goff + size]
            values[k] = self._value(raw) if len(raw) == size else None
        if values.get("pc") != addr:
            raise RspError(f"a trace frame of the probe at {addr:#x} holds pc "
                           f"{values.get('pc')}")
        regions: list[bytes | None] = []
        blocks = iter(fr.memory)
        for r in self.p.regions:
            n = -(-r.size // tp.M_BLOCK_MAX) if r.size else 0
            parts = [next(blocks, (None, b"")) for _ in range(n)]
            data = b"".join(d for _, d in parts)
            if parts and parts[0][0] != r.address or len(data) != r.size:
                raise RspError(f"a trace frame's region {r.name}: {len(data)} of {r.size} "
                               "bytes")
            regions.append(data)
        stamp = fr.values.get(tp.TIMESTAMP_TSV)
        when = None
        if stamp is not None and self.clock_offset is not None:
            when = self.last_hit_ns = stamp * 1000 + self.clock_offset
        return (seq, self.p.probes[addr], vcpu, addr, values.get("sp"),
                values.get("flags"), False, regions, when)
