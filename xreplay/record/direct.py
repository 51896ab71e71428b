"""The direct hit loop: the recorder speaks the remote protocol to the stub itself.

Where the agent's time goes is gdb's own stop and step-over machinery (a full stop per
hit, a thread-list refresh, ~8-11 packets each sent only after the last one's reply;
shared/gdbstub-limits.md).  Once gdb has resolved every address (probe locations,
regions, registers, threads), the recorder takes gdb's connection over
(:class:`~xreplay.gdb.proxy.StubProxy`) and runs the hits here:

* **gdbserver (x86)**: hardware breakpoints (``Z1``).  Linux sets the resume flag after
  an instruction breakpoint, so the thread continues past it without the step-over that a
  ``Z0`` needs (``z0``, single-step, ``Z0``); checked once at the first hit, by a
  single-step that must leave the probe's address.  The register read, the memory reads
  and the continue go out as one batch (gdbserver in all-stop mode answers queued packets
  in order): one round trip per hit.  More probe locations than debug registers, or a
  refused ``Z1``: ``Z0`` with the step-over in the same batch.
* **QEMU**: ``Z0`` (QEMU's ``Z1`` behaves the same under TCG), ack mode.  QEMU stops a
  running guest at any byte that is not an ack of its last reply, so nothing is sent after
  a resume: ``g`` + reads + ``z0`` + single-step in one batch, then ``Z0`` + continue.

De-duplication, the count, the hang snapshot (interrupt, then registers and regions
read here), stop requests, crashes, exits and a vanished stub are handled as the agent
path handles them; at the end every breakpoint of the loop is removed and the target is
left stopped for gdb to detach or kill.  Anything that needs gdb at each hit (``--filter``,
``--vcpu-expr``, regions re-evaluated as expressions) is not planned here: the agent runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xreplay.gdb.rsp import Connection, RspError, Stop, decode_hex, is_error, parse_stop, thread_lwp
from xreplay.gdb.stub import StubKind
from xreplay.record.options import EndReason

SIGINT, SIGTRAP = 2, 5
#: gdb's numbers (the remote protocol's) of the signals the agent path calls a crash
CRASH_SIGNALS = {11: "SIGSEGV", 6: "SIGABRT", 7: "SIGBUS", 4: "SIGILL", 8: "SIGFPE"}
X86_DEBUG_REGISTERS = 4
#: eflags.RF: the resume flag Linux sets after an instruction breakpoint in a debug register
#: so the thread continues past it; the guest's own code never sees it, so it is not stored
X86_RF = 1 << 16


@dataclass
class RegionPlan:
    name: str
    address: int | None
    size: int
    pointer_at: int | None = None  # read the address from this pointer at each hit
    pointer_size: int = 0


@dataclass
class DirectPlan:
    """Everything the loop needs, resolved by gdb before the hand-over."""

    probes: dict[int, int]  # address -> probe index
    regions: list[RegionPlan]
    registers: dict[str, tuple[int, int, int]]  # pc/sp/flags -> (remote nr, g offset, size)
    threads: dict[int, int]  # stub thread (lwp) -> gdb's thread number
    stub: StubKind
    ack: bool
    max_read: int
    dedupe: bool
    count: int
    hang_probe: int
    hardware: bool  # try Z1 without a step-over
    byteorder: str = "little"
    notes: list[str] = field(default_factory=list)

    @property
    def follows(self) -> bool:
        """A region is read through a pointer: a move is re-read before anything else."""
        return any(r.pointer_at is not None for r in self.regions)

    @property
    def pipelined(self) -> bool:
        """The resume goes in the hit's batch: gdbserver (no-ack, all-stop answers queued
        packets in order) and no pointer to follow (a moved region is re-read first)."""
        return not self.ack and self.stub is StubKind.GDBSERVER and not self.follows

    def describe(self, hardware_used: bool) -> str:
        bp = "hardware breakpoints, no step-over" if hardware_used else \
            "software breakpoints with step-over"
        return (f"direct remote protocol ({self.stub}: {bp}, "
                + ("one batch per hit" if self.pipelined else "batched reads") + ")")


def plan(info: dict[str, Any], *, stub: StubKind, region_names: list[str], ack: bool,
         packet_size: int | None, dedupe: bool, count: int, hang_probe: int,
         arch: str) -> DirectPlan | str:
    """A :class:`DirectPlan` from the agent's ``direct`` hello, or why there is none."""
    if info.get("error"):
        return str(info["error"])
    if stub not in (StubKind.GDBSERVER, StubKind.QEMU):
        return f"the {stub} stub is not one the direct loop knows (gdbserver, QEMU)"
    if stub is StubKind.GDBSERVER and ack:
        return "gdbserver did not accept QStartNoAckMode"
    regs = {k: tuple(v) for k, v in (info.get("registers") or {}).items()}
    if "pc" not in regs or "sp" not in regs:
        return "gdb's remote register map has no pc/sp"
    probes: dict[int, int] = {}
    for pid, addrs in enumerate(info.get("probes") or []):
        if not addrs:
            return "a probe has no enabled location"
        for a in addrs:
            probes.setdefault(int(a), pid)
    regions = []
    for name, r in zip(region_names, info.get("regions") or [], strict=False):
        if r.get("in_use"):
            return (f"region {name} is read only while the guest's FIFO page count says it "
                    "is in use (the agent's loop does that)")
        if r.get("reeval"):
            return f"region {name} is an expression gdb re-evaluates at each hit"
        regions.append(RegionPlan(name, r.get("address"), int(r["size"]), r.get("pointer_at"),
                                  int(r.get("pointer_size") or 0)))
    threads = {int(k): int(v) for k, v in (info.get("threads") or {}).items()}
    size = packet_size or 4096
    # QEMU answers ``m`` up to PacketSize/2 bytes; the hex reply must fit the packet anyway
    max_read = size // 2 if stub is StubKind.QEMU else max(16, (size - 16) // 2)
    hardware = stub is StubKind.GDBSERVER and arch.startswith("x86") and (
        len(probes) <= X86_DEBUG_REGISTERS)
    return DirectPlan(probes, regions, regs, threads, stub, ack, max_read, dedupe, count,
                      hang_probe, hardware, info.get("endian") or "little")


class Hooks:
    """What the loop asks of the recorder."""

    def __init__(self, on_snapshot: Callable[[tuple[Any, ...]], None],
                 should_stop: Callable[[], EndReason | None],
                 note: Callable[..., None], idle: Callable[[], float],
                 interrupt_hang_after: float, hang_after: float | None = None) -> None:
        self.on_snapshot = on_snapshot
        self.should_stop = should_stop
        self.note = note
        self.idle = idle
        self.interrupt_hang_after = interrupt_hang_after
        self.hang_after = hang_after  # --hang-after (the trace loop judges it per batch)


class DirectLoop:
    def __init__(self, conn: Connection, p: DirectPlan, hooks: Hooks) -> None:
        self.c = conn
        self.p = p
        self.h = hooks
        self.inserted: list[tuple[bytes, int]] = []  # (b"0"|b"1", address)
        self.hardware = False
        self.hw_checked = False
        self.hits = 0
        self.duplicates = 0
        self.last: dict[int, tuple[Any, ...]] = {}
        self.crash_signal: str | None = None
        self.next_thread = max(p.threads.values(), default=0) + 1
        # neither gdbserver 13 nor QEMU 7.2 answers ``p``: registers not in the stop reply
        # come from ``g``, at the offsets gdb's own map gives
        self.use_g = True
        # only the registers before the last one needed are expanded from ``g``'s reply
        self._g_needed = max((goff + size for _, goff, size in p.registers.values()),
                             default=0)
        self.vcpus: dict[bytes | None, int] = {}

    # -- breakpoints -----------------------------------------------------------------

    def insert(self) -> None:
        """Every probe address; Z1 where wanted and accepted, else Z0. RspError: none."""
        kind = b"1" if self.p.hardware else b"0"
        for addr in sorted(self.p.probes):
            reply = self._request(b"Z%s,%x,1" % (kind, addr))
            if reply != b"OK" and kind == b"1":
                self.remove()
                self.p.notes.append(f"Z1 at {addr:#x} refused ({reply.decode(errors='replace')}"
                                    "): software breakpoints")
                kind = b"0"
                return self._insert_all(kind)
            if reply != b"OK":
                self.remove()
                raise RspError(f"Z0 at {addr:#x}: {reply.decode(errors='replace') or 'empty'}")
            self.inserted.append((kind, addr))
        self.hardware = kind == b"1"
        return None

    def _insert_all(self, kind: bytes) -> None:
        for addr in sorted(self.p.probes):
            reply = self._request(b"Z%s,%x,1" % (kind, addr))
            if reply != b"OK":
                self.remove()
                raise RspError(f"Z{kind.decode()} at {addr:#x}: "
                               f"{reply.decode(errors='replace') or 'empty'}")
            self.inserted.append((kind, addr))
        self.hardware = kind == b"1"

    def remove(self) -> None:
        for kind, addr in self.inserted:
            self._request(b"z%s,%x,1" % (kind, addr))
        self.inserted = []

    def _request(self, payload: bytes) -> bytes:
        self.c.send(payload)
        return self.c.recv()

    # -- registers and memory ----------------------------------------------------------

    def _value(self, raw: bytes) -> int:
        return int.from_bytes(raw, self.p.byteorder) & 0xFFFFFFFFFFFFFFFF

    def register_packets(self, stop: Stop) -> list[bytes]:
        missing = [k for k, (rnum, _, _) in self.p.registers.items()
                   if rnum not in stop.registers]
        if not missing:
            return []
        if self.use_g:
            return [b"g"]
        return [b"p%x" % self.p.registers[k][0] for k in missing]

    def registers_from(self, stop: Stop, replies: list[bytes]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        g: bytes | None = None
        if self.use_g and replies:
            g = None if is_error(replies[0]) else decode_hex(replies[0], self._g_needed)
        it = iter(replies)
        for k, (rnum, goff, size) in self.p.registers.items():
            if rnum in stop.registers:
                raw: bytes | None = decode_hex(stop.registers[rnum])
            elif self.use_g:
                raw = g[goff:goff + size] if g is not None and len(g) >= goff + size else None
            else:
                reply = next(it, b"E01")
                raw = None if is_error(reply) or not reply or b"x" in reply else \
                    decode_hex(reply)
            out[k] = self._value(raw) if raw else None
        return out

    def read_packets(self, addr: int, size: int) -> list[bytes]:
        step = self.p.max_read
        return [b"m%x,%x" % (a, min(step, addr + size - a))
                for a in range(addr, addr + size, step)]

    def region_packets(self) -> list[list[bytes]]:
        """Per region: the pointer read (if followed), then the reads at its last address."""
        out = []
        for r in self.p.regions:
            pkts = []
            if r.pointer_at is not None:
                pkts.append(b"m%x,%x" % (r.pointer_at, r.pointer_size))
            if r.address is not None:
                pkts += self.read_packets(r.address, r.size)
            out.append(pkts)
        return out

    def _join(self, replies: list[bytes], size: int) -> bytes | None:
        if any(is_error(x) or not x for x in replies):
            return None
        try:
            data = b"".join(decode_hex(x) for x in replies)
        except ValueError:
            return None
        return data if len(data) == size else None

    def regions_from(self, packets: list[list[bytes]], replies: list[bytes]
                     ) -> list[bytes | None]:
        out: list[bytes | None] = []
        at = 0
        for r, pkts in zip(self.p.regions, packets, strict=True):
            mine = replies[at:at + len(pkts)]
            at += len(pkts)
            if r.pointer_at is not None:
                ptr = self._join(mine[:1], r.pointer_size)
                addr = (self._value(ptr) or None) if ptr is not None else None
                mine = mine[1:]
                if addr != r.address:
                    r.address = addr
                    self.h.note("region-moved", region=r.name, address=addr, hit=self.hits)
                    if addr is None:
                        out.append(None)
                        continue
                    # moved: read it where it is now (the target is still stopped)
                    self.c.send(*self.read_packets(addr, r.size))
                    mine = [self.c.recv() for _ in self.read_packets(addr, r.size)]
            if r.address is None:
                out.append(None)
                continue
            out.append(self._join(mine, r.size))
        return out

    # -- the loop ----------------------------------------------------------------------

    def _vcpu(self, thread: bytes | None) -> int:
        vcpu = self.vcpus.get(thread)
        if vcpu is None:
            vcpu = self.vcpus[thread] = self._vcpu_of(thread)
        return vcpu

    def _vcpu_of(self, thread: bytes | None) -> int:
        lwp = thread_lwp(thread)
        if lwp is None:
            return 0
        num = self.p.threads.get(lwp)
        if num is None:  # a thread gdb had not seen: numbered as gdb would, in order
            num = self.p.threads[lwp] = self.next_thread
            self.next_thread += 1
        return max(0, num - 1)

    def _resume(self, thread: bytes | None, signal: int = 0) -> bytes:
        if signal:
            return b"vCont;C%02x:%s" % (signal, thread) if thread else b"C%02x" % signal
        return b"vCont;c"

    def _step(self, thread: bytes | None) -> bytes:
        return b"vCont;s:" + thread if thread else b"vCont;s"

    def wait_stop(self) -> tuple[Stop | None, EndReason | None]:
        """The next stop reply, checking the recorder's stop conditions meanwhile; a stop
        condition interrupts the target and returns the stop that follows."""
        while True:
            why = self.h.should_stop()
            if why is EndReason.TARGET_LOST:
                return None, why
            if why is not None:
                return self._interrupt(), why
            if self.c.poll(0.05):
                reply = self.c.recv()
                if reply[:1] == b"O" and reply != b"OK":
                    continue  # console output
                return parse_stop(reply), None

    def _interrupt(self) -> Stop | None:
        self.c.interrupt()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.c.poll(0.1):
                reply = self.c.recv()
                if reply[:1] == b"O" and reply != b"OK":
                    continue
                stop = parse_stop(reply)
                if not stop.exited and stop.signal != SIGINT and self.c.poll(0.05):
                    return parse_stop(self.c.recv())  # a hit raced the interrupt's stop
                return stop
        return None

    def run(self) -> tuple[EndReason, bool]:
        """Record until a stop condition; returns (reason, target still there)."""
        self.c.send(self._resume(None))
        stop, why = self.wait_stop()
        while True:
            if stop is None:
                return EndReason.TARGET_LOST, False
            if stop.exited:
                return EndReason.TARGET_EXITED, False
            if why is not None:
                if why in (EndReason.HANG, EndReason.INTERRUPTED) and (
                        why is EndReason.HANG or self.h.idle() >= self.h.interrupt_hang_after):
                    self.hang_snapshot(stop)
                return why, True
            stop, why, end = self.on_stop(stop)
            if end is not None:
                return end, True

    def on_stop(self, stop: Stop) -> tuple[Any, EndReason | None, EndReason | None]:
        """Handle one stop; returns (next stop, stop condition, end reason)."""
        sig = stop.signal
        thread = stop.thread
        if sig in CRASH_SIGNALS:
            self.crash_signal = CRASH_SIGNALS[sig]
            return None, None, EndReason.TARGET_CRASHED
        if sig not in (SIGTRAP, SIGINT):
            self.c.send(self._resume(thread, sig or 0))  # a signal the target should get
            return (*self.wait_stop(), None)
        rpk = self.register_packets(stop)
        pc_known = self.p.registers["pc"][0] in stop.registers
        if pc_known:
            pc = self._value(decode_hex(stop.registers[self.p.registers["pc"][0]]))
            if sig != SIGTRAP or pc not in self.p.probes:
                return None, None, EndReason.INTERRUPTED
        regpk = self.region_packets()
        flat = [x for pk in regpk for x in pk]
        # what follows the reads in the same batch
        probe_addrs = sorted(self.p.probes)
        tail: list[bytes] = []
        resume_in_batch = False
        last_needed = self.p.count and self.hits + 1 >= self.p.count
        if self.p.pipelined and pc_known and not last_needed and self.hw_checked:
            if self.hardware:
                tail = [self._resume(None)]
            else:
                tail = [b"z0,%x,1" % pc, self._step(thread), b"Z0,%x,1" % pc,
                        self._resume(None)]
            resume_in_batch = True
        elif (self.p.stub is StubKind.QEMU and not last_needed and sig == SIGTRAP
              and not self.p.follows):
            # z0 of every probe address (the pc is not known before ``g``'s reply) + step
            tail = [*(b"z0,%x,1" % a for a in probe_addrs), self._step(thread)]
        self.c.send(*rpk, *flat, *tail)
        n_ack = len(rpk) + len(flat) + len(tail)
        replies = [self.c.recv(ack=(i == n_ack - 1)) for i in range(len(rpk) + len(flat))]
        regs = self.registers_from(stop, replies[:len(rpk)])
        pc = regs.get("pc") or 0
        if not pc_known and (sig != SIGTRAP or pc not in self.p.probes):
            if tail:  # QEMU: the speculative step-over ran; put the breakpoints back
                self._finish_tail(tail, len(rpk) + len(flat), n_ack, probe_addrs, thread)
            return None, None, EndReason.INTERRUPTED
        regions = self.regions_from(regpk, replies[len(rpk):])
        pid = self.p.probes[pc]
        vcpu = self._vcpu(thread)
        stored = True
        if self.p.dedupe:
            key = (pid, pc, regs.get("sp"), regs.get("flags") if not self.hardware else
                   (regs.get("flags") or 0) & ~X86_RF, tuple(regions))
            if self.last.get(vcpu) == key:
                self.duplicates += 1
                stored = False
            else:
                self.last[vcpu] = key
        flags = regs.get("flags")
        if flags is not None and self.hardware:
            flags &= ~X86_RF  # set by the kernel for the resume past the debug register hit
        if stored:
            self.h.on_snapshot((self.hits, pid, vcpu, pc, regs.get("sp"), flags, False,
                                regions))
            self.hits += 1
        if self.p.count and self.hits >= self.p.count:
            if tail:
                self._finish_tail(tail, len(rpk) + len(flat), n_ack, probe_addrs, thread,
                                  resume=False)
            return None, None, EndReason.COUNT
        if resume_in_batch:
            if not self.hardware:
                step_ok = self.c.recv()
                step = parse_stop(self.c.recv())
                back = self.c.recv()
                if step_ok != b"OK" or back != b"OK" or step.exited:
                    raise RspError(f"step-over failed: {step_ok!r} {step.raw[:40]!r} {back!r}")
            return (*self.wait_stop(), None)
        if tail:  # QEMU
            return (*self._finish_tail(tail, len(rpk) + len(flat), n_ack, probe_addrs, thread),
                    None)
        # sequential: step over (or check the hardware breakpoint once), then continue
        if self.hardware and not self.hw_checked:
            self.hw_checked = True
            self.c.send(self._step(thread))
            step = parse_stop(self.c.recv())
            if step.exited:
                return step, None, None
            spc = self.registers_from(step, [self._request(x) for x in
                                             self.register_packets(step)]).get("pc")
            if spc == pc:  # the stub re-triggers: step over like a software breakpoint
                self.remove()
                self._insert_all(b"0")
                self.p.notes.append("Z1 re-triggers at the same pc on this stub: software "
                                    "breakpoints")
                step = self._step_over(pc, thread)
                if step.exited:
                    return step, None, None
        elif not self.hardware:
            self.hw_checked = True
            step = self._step_over(pc, thread)
            if step.exited:
                return step, None, None
        self.c.send(self._resume(None))
        return (*self.wait_stop(), None)

    def _step_over(self, pc: int, thread: bytes | None) -> Stop:
        self._request(b"z0,%x,1" % pc)
        self.c.send(self._step(thread))
        step = parse_stop(self.c.recv())
        if not step.exited:
            self._request(b"Z0,%x,1" % pc)
        return step

    def _finish_tail(self, tail: list[bytes], done: int, n_ack: int, addrs: list[int],
                     thread: bytes | None, resume: bool = True
                     ) -> tuple[Stop | None, EndReason | None]:
        """QEMU: the z0s' replies and the single-step's stop, then Z0s (+ continue)."""
        for _ in tail[:-1]:
            self.c.recv(ack=False)
        step = parse_stop(self.c.recv())  # acked: nothing was sent after the step
        if step.exited:
            return step, None
        back = [b"Z0,%x,1" % a for a in addrs]
        if resume:
            self.c.send(*back, self._resume(None))
            for _ in back:
                if self.c.recv(ack=False) != b"OK":
                    raise RspError("Z0 after the step-over refused")
            return self.wait_stop()
        self.c.send(*back)
        for i in range(len(back)):
            self.c.recv(ack=i == len(back) - 1)
        return None, None

    def hang_snapshot(self, stop: Stop) -> None:
        rpk = self.register_packets(stop)
        regpk = self.region_packets()
        flat = [x for pk in regpk for x in pk]
        self.c.send(*rpk, *flat)
        n = len(rpk) + len(flat)
        replies = [self.c.recv(ack=i == n - 1) for i in range(n)]
        regs = self.registers_from(stop, replies[:len(rpk)])
        regions = self.regions_from(regpk, replies[len(rpk):])
        self.h.on_snapshot((self.hits, self.p.hang_probe, self._vcpu(stop.thread),
                            regs.get("pc") or 0, regs.get("sp"), regs.get("flags"), True,
                            regions))
