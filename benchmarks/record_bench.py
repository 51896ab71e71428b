"""Record benchmark: snapshots/s of ``xreplay record`` against the practical limit.

Every method does the same job against the same target (``target.c`` under
``gdbserver --once``): at each hit of ``evtchn_upcall_handler`` read
``HYPERVISOR_shared_info`` (x86_64 layout, 3136 bytes), store it, resume.  Methods:

* ``xreplay`` - the library, ``Recorder(RecordOptions(...)).run()``, as ``xreplay record``
  builds it;
* ``raw-rsp`` - :mod:`benchmarks.rsp_client`, one request in flight: the baseline that
  every ratio is taken against, since it is what a stub allows a synchronous client;
* ``raw-rsp-pipelined`` - the same client sending reads, step-over and continue as one
  batch per hit (gdbserver answers queued packets in order): how far past one request in
  flight the stub itself can go;
* ``xreplay-trace`` - the library with ``hit_loop="trace"`` (``--hit-loop trace``):
  gdbserver's tracepoints collect each hit, fetched per batch (:mod:`xreplay.record.trace`);
* ``raw-trace`` - the same tracepoints from the minimal client: registers + shared_info
  collected inside gdbserver at each hit, the batch ending by itself at its last hit, the
  raw trace buffer fetched with pipelined ``qTBuffer`` (the moonshot class of issue 13: no
  round trip per hit at all);
* ``pygdbmi-default`` - the loop a user writes first with pygdbmi's defaults (each
  ``write()`` waits 0.2 s for more output, so it gets few hits);
* ``pygdbmi-tuned`` - the same loop with a 0.5 ms settle time, waiting for records by token.

A second table runs xreplay, xreplay-trace, raw-rsp and raw-trace against ``target.c`` built
the way Solo5 declares the page (``-DTARGET_SOLO5``: ``uint8_t HYPERVISOR_SHARED_INFO[4096]``,
probe ``solo5__xen_evtchn_vector_handler``), xreplay configured by ``--profile solo5`` exactly
as ``xreplay record --profile solo5`` builds it; every method still reads the 3136 bytes of
``struct shared_info`` at the page's start (what xreplay reads of a 4096-byte page).

Each method's time runs from its first resume to its last stored snapshot; start-up
(spawning gdb, connecting, loading symbols) is reported separately as wall time.  Every
stored snapshot is checked: record *i* must hold counter *i* (``wc_version``) and the
upcall-pending byte the loop set, so a lost, duplicated or torn snapshot fails the run.

A third table does the same job against QEMU's whole-machine stub (``qemu-system-x86_64
-accel tcg``), the stub the Xen lab records through, whose limits differ (ack mode only,
2048-byte ``m`` reads): the bare-metal lab guest (``xreplay.lab.guests``, variant
``correct``: real LAPIC upcalls, exits at the end, never hangs), ``HYPERVISOR_shared_info``
in the x86_32 layout (2344 bytes) plus the guest's ``lab_upcall_count`` read at each hit (a
watch region for xreplay, one more ``m`` for the raw client); record *i* must hold count
*i* (the probe sits before the increment).  A fourth table does the same with the lab
guest in its Solo5 style (``GuestBuild("baremetal", style="solo5")``: the page a
``uint8_t[4096]``, the Solo5 names).  Only ``xreplay`` and ``raw-rsp`` run on QEMU (its stub
has no tracepoints; the lab table adds ``xreplay-agent``): the comparison that matters is
xreplay against what the stub allows.  gdb + QEMU can report one hit twice
(shared/gdbstub-limits.md): each method drops a stop whose state repeats the previous one
(xreplay with ``dedupe=True``, the raw client by the counter) and the benchmark prints how
many each dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks import BenchArgs, Measurement, Method, register, run_interleaved, table
from benchmarks.rsp_client import RspClient, RspError, decode_hex

TARGET_SRC = Path(__file__).with_name("target.c")
CFLAGS = ["-DXEN_HAVE_PV_UPCALL_MASK=1", "-O2", "-g", "-no-pie"]
PROBE = "evtchn_upcall_handler"
SHARED_INFO = "HYPERVISOR_shared_info"
DEFAULT_HITS = 2000
DEFAULT_SLOW_HITS = 10  # pygdbmi with defaults: ~0.4 s per hit
BASELINE = "raw-rsp"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the target ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    exe: Path
    probe_addr: int
    shared_info_addr: int
    size: int  # sizeof(struct shared_info) for x86_64: what xreplay reads at each hit
    counter_off: int  # wc_version: the loop's iteration counter
    pending_off: int  # vcpu_info[0].evtchn_upcall_pending: 1 at every hit
    style: str = "lab"  # "solo5": the page is Solo5's uint8_t HYPERVISOR_SHARED_INFO[4096]

    @property
    def probe(self) -> str:
        return STYLES[self.style][1]

    @property
    def shared_info(self) -> str:
        return STYLES[self.style][2]


#: target.c's declaration styles: extra CFLAGS, probe symbol, shared_info symbol.  "solo5"
#: is named and declared as Solo5's bindings/xen (what ``--profile solo5`` expects).
STYLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "lab": ((), PROBE, SHARED_INFO),
    "solo5": (("-DTARGET_SOLO5", "-Devtchn_upcall_handler=solo5__xen_evtchn_vector_handler"),
              "solo5__xen_evtchn_vector_handler", "HYPERVISOR_SHARED_INFO"),
}


def build_target(cache: Path | None = None, style: str = "lab") -> Target:
    """Compile ``target.c`` once per source/flags version into a cache dir (atomic rename)."""
    from xreplay.abi import layout

    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found (apt-get install gcc)")
    flags = [*CFLAGS, *STYLES[style][0]]
    src = TARGET_SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(flags).encode()).hexdigest()[:12]
    cache = cache or Path(tempfile.gettempdir()) / f"xreplay-bench-{os.getuid()}"
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / f"target-{key}"
    if not exe.exists():
        tmp = cache / f".target-{key}-{os.getpid()}"
        subprocess.run([gcc, *flags, "-o", str(tmp), str(TARGET_SRC)], check=True)
        os.replace(tmp, exe)
    syms = _symbols(exe)
    structs = layout("x86_64")
    fields = structs.fields("shared_info")
    vfields = structs.fields("vcpu_info")
    _, probe, shinfo = STYLES[style]
    return Target(exe, syms[probe], syms[shinfo], structs.shared_info.sizeof(),
                  fields["wc_version"][0], vfields["evtchn_upcall_pending"][0], style)


def _symbols(exe: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(exe)], check=True, capture_output=True, text=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GdbServer:
    """``gdbserver --once`` running the target for ``n`` iterations; killed by PID on exit.

    ``relay``: gdb-based methods connect through a counting relay
    (:class:`xreplay.gdb.proxy.StubProxy`) at :attr:`address`, and :attr:`packets` is what
    gdb sent (untimed runs only: the relay adds a hop to every packet).
    """

    def __init__(self, target: Target, n: int, workdir: Path, relay: bool = False) -> None:
        self.target = target
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.relay = None
        self.packets = 0
        self.log = workdir / f"gdbserver-{self.port}.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                ["gdbserver", "--once", self.address, str(target.exe), str(n)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 10
        while b"Listening on port" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gdbserver did not start: {self.log.read_text()[-300:]}")
            time.sleep(0.005)
        if relay:
            from xreplay.gdb.proxy import StubProxy

            self.relay = StubProxy(self.address)
            self.address = self.relay.address

    def inferior_pid(self) -> int | None:
        m = re.search(rb"pid = (\d+)", self.log.read_bytes())
        return int(m.group(1)) if m else None

    def stop(self) -> None:
        if self.relay is not None:
            self.packets = self.relay.gdb_packets
            self.relay.close()
        pid = self.inferior_pid()
        if pid is not None:
            _kill_if(pid, str(self.target.exe))
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> GdbServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_if(pid: int, exe: str) -> None:
    """SIGKILL ``pid`` only if it still runs ``exe`` (the PID may have been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if exe.encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2  # not our child: wait until it is dead (gone or zombie)
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.002)


# -- verification --------------------------------------------------------------------------


class RecordLayout(Protocol):
    """Where a stored record keeps what the checks need (both targets provide it)."""

    @property
    def size(self) -> int: ...
    @property
    def counter_off(self) -> int: ...
    @property
    def pending_off(self) -> int: ...


def check_snapshots(target: RecordLayout, snaps: Iterator[bytes],
                    hits: int) -> tuple[bool, str]:
    """Snapshot i must hold counter i and the pending byte: no loss, repeat or tear."""
    n = 0
    for i, data in enumerate(snaps):
        if len(data) != target.size:
            return False, f"snapshot {i}: {len(data)} bytes"
        (counter,) = struct.unpack_from("<I", data, target.counter_off)
        if counter != i:
            return False, f"snapshot {i} holds counter {counter}"
        if data[target.pending_off] != 1:
            return False, f"snapshot {i}: upcall_pending {data[target.pending_off]}"
        n = i + 1
    if n != hits:
        return False, f"{n} snapshots stored, expected {hits}"
    return True, ""


def _blob_snapshots(path: Path, size: int) -> Iterator[bytes]:
    data = path.read_bytes()
    for at in range(0, len(data), size):
        yield data[at:at + size]


def verify_blob(target: RecordLayout, path: Path, hits: int) -> tuple[bool, str]:
    return check_snapshots(target, _blob_snapshots(path, target.size), hits)


def verify_xrr(target: RecordLayout, path: Path, hits: int) -> tuple[bool, str]:
    """The recording's regions, joined in header order, checked like a raw record."""
    from xreplay.xrr import XrrReader

    with XrrReader(path) as reader:
        records = (b"".join(x or b"" for x in r.regions) for r in reader.records())
        ok, note = check_snapshots(target, records, hits)
        if ok and (reader.trailer is None or reader.problems):
            return False, f"not closed cleanly: {reader.problems}"
    return ok, note


# -- methods -------------------------------------------------------------------------------


def run_xreplay(target: Target, workdir: Path, hits: int, hit_loop: str = "auto",
                relay: bool = False) -> Measurement:
    """The library as ``xreplay record --target ... --upcall ... --count N --kill`` uses it
    (``hit_loop`` "agent": as ``--hit-loop agent``, the in-gdb agent at every hit)."""
    from xreplay.record import Recorder, RecordOptions
    from xreplay.xrr import ProbeSpec

    out = workdir / f"xreplay-{target.style}-{hit_loop}.xrr"
    t = time.monotonic()
    with GdbServer(target, hits + 1, workdir, relay=relay) as srv:
        if target.style == "solo5":  # as a Solo5 user writes it: the preset names both
            from xreplay.record.build import RecordChoices, build_options

            opts = build_options(RecordChoices(
                output=out, target=srv.address, elf=target.exe, profile="solo5",
                count=hits, kill_target=True, hit_loop=hit_loop))
            opts.description = "benchmarks/target.c -DTARGET_SOLO5 under gdbserver"
        else:
            opts = RecordOptions(
                output=out, arch="x86_64", target=srv.address, elf=target.exe,
                probes=[ProbeSpec("upcall", PROBE, "upcall")], shared_info=SHARED_INFO,
                count=hits, kill_target=True, hit_loop=hit_loop,
                description="benchmarks/target.c under gdbserver")
        res = Recorder(opts).run()
    wall = time.monotonic() - t
    ok, note = verify_xrr(target, out, hits)
    if res.reason != "count":
        ok, note = False, f"ended by {res.reason} {note}".strip()
    if hit_loop == "direct" and not res.hit_loop.startswith("direct") or (
            hit_loop == "trace" and "tracepoints" not in res.hit_loop):
        ok, note = False, f"recorded by {res.hit_loop}"
    packets = srv.packets if relay else res.packets
    return Measurement(res.snapshots, res.elapsed, ok, wall, note,
                       packets / res.snapshots if packets and res.snapshots else None)


def run_raw(target: Target, workdir: Path, hits: int, pipelined: bool = False) -> Measurement:
    """Own Z0, continue, ``m`` reads, step-over; one request in flight unless ``pipelined``."""
    out = workdir / f"raw-{target.style}{'-pipelined' if pipelined else ''}.bin"
    t = time.monotonic()
    n = 0
    with GdbServer(target, hits + 1, workdir) as srv, open(out, "wb") as f:
        c = RspClient("127.0.0.1", srv.port)
        try:
            c.connect()
            sent0 = c.packets_sent
            c.set_breakpoint(target.probe_addr)
            addr, size = target.shared_info_addr, target.size
            t0 = time.monotonic()
            stop = c.cont()
            while not stop.exited:
                if not pipelined or n == hits - 1:
                    f.write(c.read_memory(addr, size))
                    n += 1
                    if n == hits:
                        break
                    stop = c.step_over(target.probe_addr, stop.thread)
                    if not stop.exited:
                        stop = c.cont()
                    continue
                reads = c.read_packets(addr, size)
                bp = b"%x,1" % target.probe_addr
                c.send(*reads, b"z0," + bp, c.resume_packet(True, stop.thread), b"Z0," + bp,
                       c.resume_packet())
                data = b"".join(decode_hex(c.recv()) for _ in reads)
                if len(data) != size:
                    raise RspError(f"short read: {len(data)} bytes")
                f.write(data)
                n += 1
                replies = [c.recv(), c.parse_stop(c.recv()), c.recv()]
                if replies[0] != b"OK" or replies[2] != b"OK":
                    raise RspError(f"step-over replies: {replies!r}")
                stop = c.parse_stop(c.recv())
            elapsed = time.monotonic() - t0
            packets = (c.packets_sent - sent0) / n if n else None
            c.kill()
        finally:
            c.close()
    wall = time.monotonic() - t
    ok, note = verify_blob(target, out, hits)
    return Measurement(n, elapsed, ok, wall, note, packets)


#: x86_64 ``g`` layout (gdbserver's amd64-linux description): rsp, rip, eflags offsets
X86_64_G_SP, X86_64_G_PC, X86_64_G_FLAGS = 7 * 8, 16 * 8, 17 * 8


def run_raw_trace(target: Target, workdir: Path, hits: int, batch: int | None = None
                  ) -> Measurement:
    """gdbserver's tracepoints (:mod:`xreplay.gdb.tracepoints`): registers + shared_info
    collected inside gdbserver at each hit, ``batch`` hits (default: all) per trace run,
    each ending by itself at its last hit (a breakpoint condition on a hit counter), then
    the raw trace buffer fetched with pipelined ``qTBuffer`` and split into snapshots.

    Every frame's pc must be the probe's and its sp/flags readable: a snapshot carries
    what xreplay's carries (registers, the 3136 bytes of shared_info).
    """
    from xreplay.gdb import tracepoints as tp

    out = workdir / f"raw-trace-{target.style}.bin"
    t = time.monotonic()
    n = 0
    batch = batch or hits
    regions = [(target.shared_info_addr, target.size)]
    with GdbServer(target, hits + 1, workdir) as srv, open(out, "wb") as f:
        c = RspClient("127.0.0.1", srv.port)
        try:
            c.connect()
            sent0 = c.packets_sent
            regsize = len(c.read_registers())
            per_frame = tp.frame_size(regsize, regions)
            chunk = (c.packet_size - 16) // 2  # qTBuffer's reply is hex, like ``m``'s
            # the frames of one batch, with room for the end marker; gdbserver's default
            # (5 MiB) is the floor
            size = max(tp.DEFAULT_BUFFER, per_frame * batch + 4096)
            for pkt in (b"QTBuffer:size:%x" % size,
                        b"Z0,%x,1;%s" % (target.probe_addr, tp.batch_condition(batch))):
                if (r := c.request(pkt)) != b"OK":
                    raise RspError(f"{pkt[:20]!r}: {r!r}")
            t0 = time.monotonic()
            while n < hits:
                want = min(batch, hits - n)
                setup = [b"QTinit", tp.define_counter(),
                         *tp.define_tracepoint(1, target.probe_addr, regions), b"QTStart"]
                if want < batch:  # a shorter last batch: the condition's count changes
                    setup.insert(0, b"Z0,%x,1;%s" % (target.probe_addr,
                                                     tp.batch_condition(want)))
                c.send(*setup, c.resume_packet())
                replies = [c.recv() for _ in setup]
                if any(r != b"OK" for r in replies):
                    raise RspError(f"trace set-up: {replies!r}")
                stop = c.parse_stop(c.recv())
                if stop.exited:
                    raise RspError(f"the target exited during batch at {n}")
                c.send(b"QTStop", b"qTStatus")
                if c.recv() != b"OK":
                    raise RspError("QTStop refused")
                status = tp.parse_status(c.recv())
                if status.frames != want or status.stop_reason == "tfull":
                    raise RspError(f"batch at {n}: {status.frames} frames of {want} "
                                   f"({status.stop_reason})")
                reqs = tp.buffer_requests(status.used, chunk)
                c.send(*reqs)
                raw = b"".join(decode_hex(c.recv()) for _ in reqs)
                for fr in tp.parse_frames(raw, regsize):
                    regs = fr.registers or b""
                    pc = int.from_bytes(regs[X86_64_G_PC:X86_64_G_PC + 8], "little")
                    if pc != target.probe_addr or len(regs) < X86_64_G_FLAGS + 4:
                        raise RspError(f"frame {n}: pc {pc:#x}, {len(regs)} register bytes")
                    data = tp.frame_memory(fr, target.shared_info_addr, target.size)
                    if data is None:
                        raise RspError(f"frame {n}: shared_info not collected")
                    f.write(data)
                    n += 1
            elapsed = time.monotonic() - t0
            packets = (c.packets_sent - sent0) / n if n else None
            c.kill()
        finally:
            c.close()
    wall = time.monotonic() - t
    ok, note = verify_blob(target, out, hits)
    return Measurement(n, elapsed, ok, wall, note, packets)


def _start_gdbmi(time_to_check: float | None) -> Any:
    from pygdbmi.gdbcontroller import GdbController

    if time_to_check is None:
        return GdbController()  # pygdbmi's defaults, as a first attempt would use them
    return GdbController(time_to_check_for_additional_output_sec=time_to_check)


def _stop_gdbmi(gdbmi: Any) -> None:
    proc = gdbmi.gdb_process
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    gdbmi.gdb_process = None


def run_pygdbmi_default(target: Target, workdir: Path, hits: int,
                        relay: bool = False) -> Measurement:
    """The naive loop: ``write()`` each MI command and take what comes back."""
    out = workdir / "pygdbmi-default.bin"
    t = time.monotonic()
    n = 0
    with GdbServer(target, hits + 1, workdir, relay) as srv, open(out, "wb") as f:
        gdbmi = _start_gdbmi(None)
        try:
            gdbmi.write(f"-file-exec-and-symbols {target.exe}", timeout_sec=30)
            gdbmi.write(f"-target-select remote {srv.address}", timeout_sec=30)
            gdbmi.write(f"-break-insert {PROBE}")
            t0 = time.monotonic()
            while n < hits:
                resp = gdbmi.write("-exec-continue")
                while not (stopped := [r for r in resp if r.get("message") == "stopped"]):
                    resp = gdbmi.get_gdb_response(timeout_sec=10)
                if stopped[0]["payload"].get("reason", "").startswith("exited"):
                    break
                resp = gdbmi.write(f"-data-read-memory-bytes &{SHARED_INFO} {target.size}")
                done = next(r for r in resp if r.get("type") == "result")
                f.write(bytes.fromhex(done["payload"]["memory"][0]["contents"]))
                n += 1
            elapsed = time.monotonic() - t0
        finally:
            _stop_gdbmi(gdbmi)
    wall = time.monotonic() - t
    ok, note = verify_blob(target, out, hits)
    return Measurement(n, elapsed, ok, wall, note, srv.packets / n if relay and n else None)


class _TunedMi:
    """pygdbmi with a 0.5 ms settle time; waits for the record it needs, by token."""

    def __init__(self) -> None:
        self.ctl = _start_gdbmi(0.0005)
        self.token = 0
        self.pending: list[dict[str, Any]] = []

    def _wait(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, r in enumerate(self.pending):
                if match(r):
                    return self.pending.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("gdb did not answer")
            self.pending += [r for r in self.ctl.get_gdb_response(
                timeout_sec=left, raise_error_on_timeout=False)
                if r.get("type") in ("result", "notify")]

    def mi(self, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
        self.token += 1
        tok = self.token
        self.ctl.write(f"{tok}{cmd}", read_response=False)
        r = self._wait(lambda r: r.get("type") == "result" and r.get("token") == tok, timeout)
        if r.get("message") == "error":
            raise RuntimeError(f"{cmd}: {r.get('payload')}")
        return r

    def wait_stopped(self, timeout: float = 10.0) -> dict[str, Any]:
        return self._wait(lambda r: r.get("message") == "stopped", timeout)["payload"]


def run_pygdbmi_tuned(target: Target, workdir: Path, hits: int,
                      relay: bool = False) -> Measurement:
    out = workdir / "pygdbmi-tuned.bin"
    t = time.monotonic()
    n = 0
    with GdbServer(target, hits + 1, workdir, relay) as srv, open(out, "wb") as f:
        g = _TunedMi()
        try:
            g.mi(f"-file-exec-and-symbols {target.exe}", 30)
            g.mi(f"-target-select remote {srv.address}", 30)
            g.mi(f"-break-insert {PROBE}")
            g.pending.clear()
            read = f"-data-read-memory-bytes &{SHARED_INFO} {target.size}"
            t0 = time.monotonic()
            while n < hits:
                g.mi("-exec-continue")
                if g.wait_stopped().get("reason", "").startswith("exited"):
                    break
                f.write(bytes.fromhex(g.mi(read)["payload"]["memory"][0]["contents"]))
                n += 1
            elapsed = time.monotonic() - t0
        finally:
            _stop_gdbmi(g.ctl)
    wall = time.monotonic() - t
    ok, note = verify_blob(target, out, hits)
    return Measurement(n, elapsed, ok, wall, note, srv.packets / n if relay and n else None)


def gdb_packets_per_hit(run: Callable[[int], Measurement], hits: int = 100) -> float | None:
    """Packets gdb sends per hit, through a counting relay, untimed: the difference between
    a run of ``2 * hits`` and one of ``hits`` (set-up cancelled), divided by ``hits``."""
    a, b = run(hits), run(2 * hits)
    if a.packets is None or b.packets is None or not (a.verified and b.verified):
        return None
    return (b.packets * b.hits - a.packets * a.hits) / (b.hits - a.hits)


# -- QEMU ----------------------------------------------------------------------------------

QEMU_COUNTER = "lab_upcall_count"  # uint32_t, incremented by the probed function itself
QEMU_READ_CHUNK = 2048  # QEMU 7.2 answers ``m`` up to PacketSize/2 (4096/2) bytes
QEMU_RIP_OFF = 16 * 8  # rip in ``g``: x86-64 order (16 GPRs, rip) even for 32-bit code
QEMU_METHODS = ("xreplay", "xreplay-agent", "raw-rsp")


@dataclass(frozen=True)
class QemuTarget:
    """The bare-metal lab guest's addresses; a record is shared_info + the 4-byte counter."""

    elf: Path
    probe_addr: int
    shared_info_addr: int
    shared_info_size: int  # sizeof(struct shared_info) for x86_32: 2344
    counter_addr: int
    pending_off: int  # vcpu_info[0].evtchn_upcall_pending: 1 whenever the top half runs
    style: str = "lab"  # "solo5": the lab guest's Solo5 style (a uint8_t[4096] page)

    @property
    def probe(self) -> str:
        return STYLES[self.style][1]

    @property
    def shared_info(self) -> str:
        return STYLES[self.style][2]

    @property
    def size(self) -> int:
        return self.shared_info_size + 4

    @property
    def counter_off(self) -> int:
        return self.shared_info_size


def build_qemu_target(style: str = "lab") -> QemuTarget:
    """Build (or reuse from the lab cache) the bare-metal guest; XReplayError if it cannot.
    ``style`` "solo5": the lab guest's Solo5 declarations (``xreplay.lab.guests.STYLES``)."""
    from xreplay.abi import layout
    from xreplay.errors import XReplayError
    from xreplay.lab.guests import GuestBuild, build_guest

    if shutil.which("qemu-system-x86_64") is None:
        raise XReplayError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    elf = build_guest(GuestBuild("baremetal", style=style))
    syms = _symbols(elf)
    structs = layout("x86_32")
    _, probe, shinfo = STYLES[style]
    return QemuTarget(elf, syms[probe], syms[shinfo], structs.shared_info.sizeof(),
                      syms[QEMU_COUNTER], structs.fields("vcpu_info")["evtchn_upcall_pending"][0],
                      style)


def qemu_events(hits: int) -> int:
    """Schedule length with at least ``hits`` upcalls (seed 1 has about ``events - 45``:
    2000 give 1958, 100 give 86), so the guest never exits before the count is reached."""
    return hits + hits // 10 + 100


@contextlib.contextmanager
def _qemu_guest(target: QemuTarget, hits: int) -> Iterator[Any]:
    """QEMU frozen (``-S``) on a fresh stub; killed by PID on exit (``LabGuest.stop``)."""
    from xreplay.lab.guests import start_guest

    with start_guest("baremetal", "correct", events=qemu_events(hits), elf=target.elf) as guest:
        yield guest


def run_qemu_xreplay(target: QemuTarget, workdir: Path, hits: int, dups: list[int],
                     hit_loop: str = "auto", relay: bool = False) -> Measurement:
    """The library as the lab records QEMU, reduced to the upcall probe plus the counter."""
    from xreplay.demo import lab_record_options
    from xreplay.gdb.proxy import StubProxy
    from xreplay.record import Recorder, WatchSpec
    from xreplay.xrr import ProbeSpec

    out = workdir / f"qemu-xreplay-{target.style}-{hit_loop}.xrr"
    t = time.monotonic()
    packets = None
    with _qemu_guest(target, hits) as guest:
        opts = lab_record_options(
            guest, out, probes=[ProbeSpec("upcall", target.probe, "upcall")],
            shared_info=target.shared_info,
            watch=[WatchSpec(QEMU_COUNTER, f"&{QEMU_COUNTER}", 4)], count=hits, dedupe=True,
            hit_loop=hit_loop)
        proxy = StubProxy(opts.target) if relay and opts.target else None
        if proxy is not None:
            opts.target = proxy.address
        try:
            res = Recorder(opts).run()
        finally:
            if proxy is not None:
                packets = proxy.gdb_packets
                proxy.close()
    wall = time.monotonic() - t
    dups.append(res.duplicates)
    ok, note = verify_xrr(target, out, hits)
    if res.reason != "count":
        ok, note = False, f"ended by {res.reason} {note}".strip()
    packets = packets if relay else res.packets
    return Measurement(res.snapshots, res.elapsed, ok, wall, note,
                       packets / res.snapshots if packets and res.snapshots else None)


def run_qemu_raw(target: QemuTarget, workdir: Path, hits: int, dups: list[int]) -> Measurement:
    """Own Z0, continue, 2048-byte ``m`` reads + counter, step-over; ack mode, one in flight.

    A stop whose counter equals the previous one is a repeated report of the same hit:
    counted and not stored (as xreplay's de-duplication does), so it cannot pass unseen.
    The first stop's rip is checked once: stops are the probe's, not something else.
    """
    out = workdir / f"qemu-raw-{target.style}.bin"
    t = time.monotonic()
    n = dup = 0
    last: bytes | None = None
    with _qemu_guest(target, hits) as guest, open(out, "wb") as f:
        host, port = str(guest.address).rsplit(":", 1)
        c = RspClient(host, int(port), read_chunk=QEMU_READ_CHUNK)
        try:
            c.connect()
            sent0 = c.packets_sent
            c.set_breakpoint(target.probe_addr)
            t0 = time.monotonic()
            stop = c.cont()
            if not stop.exited:
                regs = c.read_registers()
                pc = int.from_bytes(regs[QEMU_RIP_OFF:QEMU_RIP_OFF + 8], "little")
                if pc != target.probe_addr:
                    raise RspError(f"first stop at {pc:#x}, not at {target.probe} "
                                   f"({target.probe_addr:#x})")
            while not stop.exited:
                data = c.read_memory(target.shared_info_addr, target.shared_info_size)
                counter = c.read_memory(target.counter_addr, 4)
                if counter == last:
                    dup += 1
                else:
                    f.write(data + counter)
                    last = counter
                    n += 1
                    if n == hits:
                        break
                stop = c.step_over(target.probe_addr, stop.thread)
                if not stop.exited:
                    stop = c.cont()
            elapsed = time.monotonic() - t0
            packets = (c.packets_sent - sent0) / n if n else None
            c.kill()
        finally:
            c.close()
    wall = time.monotonic() - t
    dups.append(dup)
    ok, note = verify_blob(target, out, hits)
    return Measurement(n, elapsed, ok, wall, note, packets)


def qemu_record_benchmark(hits: int = DEFAULT_HITS, runs: int = 3,
                          log: Callable[[str], None] = _log, target: QemuTarget | None = None,
                          count_packets: bool = True, names: tuple[str, ...] = QEMU_METHODS,
                          ) -> tuple[list[Method], dict[str, list[int]]]:
    """The methods ``runs`` times interleaved on QEMU; also the duplicate stops per run."""
    target = target or build_qemu_target()
    dups: dict[str, list[int]] = {n: [] for n in QEMU_METHODS}
    with tempfile.TemporaryDirectory(prefix="xreplay-bench-qemu-") as tmp:
        work = Path(tmp)
        methods = [
            Method("xreplay", "xreplay", hits,
                   lambda h: run_qemu_xreplay(target, work, h, dups["xreplay"])),
            Method("xreplay-agent", "agent", hits,
                   lambda h: run_qemu_xreplay(target, work, h, dups["xreplay-agent"],
                                              "agent")),
            Method("raw-rsp", "raw", hits,
                   lambda h: run_qemu_raw(target, work, h, dups["raw-rsp"])),
        ]
        methods = [m for m in methods if m.name in names]
        run_interleaved(methods, runs, log)
        if count_packets and "xreplay-agent" in names:
            methods[1].packets = gdb_packets_per_hit(
                lambda h: run_qemu_xreplay(target, work, h, [], "agent", relay=True),
                min(hits, 100))
    return methods, dups


# -- the benchmark -------------------------------------------------------------------------

METHOD_NAMES = ("xreplay", "xreplay-agent", "xreplay-trace", "raw-rsp", "raw-rsp-pipelined",
                "raw-trace", "pygdbmi-default", "pygdbmi-tuned")
#: the Solo5-declared target (``uint8_t HYPERVISOR_SHARED_INFO[4096]``, ``--profile solo5``)
SOLO5_METHODS = ("xreplay", "xreplay-trace", "raw-rsp", "raw-trace")
#: gdb-based methods: packets per hit counted through a relay, in untimed runs of this many
PACKET_COUNT_HITS = {"xreplay-agent": 100, "pygdbmi-default": 3, "pygdbmi-tuned": 50}


def record_methods(target: Target, workdir: Path, hits: int,
                   slow_hits: int | None = None,
                   names: tuple[str, ...] = METHOD_NAMES) -> list[Method]:
    """The methods with their hit counts: slow pygdbmi variants get fewer hits."""
    slow = slow_hits if slow_hits is not None else min(hits, DEFAULT_SLOW_HITS)
    table_ = {
        "xreplay": ("xreplay", hits, lambda h: run_xreplay(target, workdir, h)),
        "xreplay-agent": ("agent", hits, lambda h: run_xreplay(target, workdir, h, "agent")),
        "xreplay-trace": ("xtrace", hits, lambda h: run_xreplay(target, workdir, h, "trace")),
        "raw-rsp": ("raw", hits, lambda h: run_raw(target, workdir, h)),
        "raw-rsp-pipelined": ("pipelined", hits,
                              lambda h: run_raw(target, workdir, h, pipelined=True)),
        "raw-trace": ("trace", hits, lambda h: run_raw_trace(target, workdir, h)),
        "pygdbmi-default": ("pygdbmi", slow,
                            lambda h: run_pygdbmi_default(target, workdir, h)),
        "pygdbmi-tuned": ("tuned", max(1, hits // 10),
                          lambda h: run_pygdbmi_tuned(target, workdir, h)),
    }
    return [Method(n, *table_[n]) for n in names]


def record_benchmark(hits: int = DEFAULT_HITS, runs: int = 3, slow_hits: int | None = None,
                     names: tuple[str, ...] = METHOD_NAMES,
                     log: Callable[[str], None] = _log, style: str = "lab") -> list[Method]:
    """Build the target, run every method ``runs`` times interleaved; results on the methods."""
    for tool in ("gdb", "gdbserver", "nm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (apt-get install gdb gdbserver binutils)")
    target = build_target(style=style)
    with tempfile.TemporaryDirectory(prefix="xreplay-bench-") as tmp:
        work = Path(tmp)
        methods = record_methods(target, work, hits, slow_hits, names)
        run_interleaved(methods, runs, log)
        counted: dict[str, Callable[[int], Measurement]] = {
            "xreplay-agent": lambda h: run_xreplay(target, work, h, "agent", relay=True),
            "pygdbmi-default": lambda h: run_pygdbmi_default(target, work, h, relay=True),
            "pygdbmi-tuned": lambda h: run_pygdbmi_tuned(target, work, h, relay=True)}
        for m in methods:
            if m.name in counted:
                m.packets = gdb_packets_per_hit(counted[m.name],
                                                min(hits, PACKET_COUNT_HITS[m.name]))
    return methods


def goals(methods: list[Method], wanted: dict[str, tuple[float, float]]) -> str:
    """One line per method: its ratio to raw-rsp against issue 13's goal and moonshot."""
    base = next(m for m in methods if m.name == BASELINE).median_rate()
    lines = []
    for m in methods:
        if m.name in wanted and base:
            goal, moon = wanted[m.name]
            r = m.median_rate() / base
            lines.append(f"goal: {m.name}/raw-rsp = {r:.2f} (goal >= {goal}: "
                         f"{'met' if r >= goal else 'NOT met'}; moonshot >= {moon}: "
                         f"{'met' if r >= moon else 'not met'})")
    return "\n".join(lines)


@register("record", "snapshots/s of xreplay record vs a raw RSP client and pygdbmi loops")
def main(args: BenchArgs) -> bool:
    from xreplay.errors import XReplayError

    hits = args.hits or DEFAULT_HITS
    _log(f"record: target.c under gdbserver, {hits} hits for fast methods, {args.runs} runs "
         "interleaved")
    methods = record_benchmark(hits, args.runs)
    print(table(methods, BASELINE, "\nrecord, gdbserver target (snapshots/s; ratios against "
                "raw-rsp measured in the same run):"))
    print(goals(methods, {"xreplay": (1.0, 2.5), "xreplay-trace": (1.0, 2.5),
                          "raw-trace": (1.0, 2.5)}))
    ok = all(x.verified for m in methods for x in m.results)
    _log(f"record: target.c -DTARGET_SOLO5 (uint8_t HYPERVISOR_SHARED_INFO[4096], --profile "
         f"solo5) under gdbserver, {hits} hits, {args.runs} runs interleaved")
    smethods = record_benchmark(hits, args.runs, names=SOLO5_METHODS, style="solo5")
    print(table(smethods, BASELINE, "\nrecord, gdbserver target, Solo5 declaration: uint8_t "
                "HYPERVISOR_SHARED_INFO[4096], --profile solo5 (snapshots/s; ratios against "
                "raw-rsp measured in the same run):"))
    print(goals(smethods, {"xreplay": (1.0, 2.5), "xreplay-trace": (1.0, 2.5),
                           "raw-trace": (1.0, 2.5)}))
    ok = ok and all(x.verified for m in smethods for x in m.results)
    try:
        qemu_target = build_qemu_target()
        qemu_solo5 = build_qemu_target("solo5")
    except XReplayError as e:  # an environment without QEMU or gcc-multilib
        print(f"qemu: skipped ({str(e).splitlines()[0]})")
        return ok
    _log(f"record: bare-metal lab guest (correct, seed 1, events {qemu_events(hits)}) under "
         f"QEMU TCG, {hits} hits, {args.runs} runs interleaved")
    qmethods, dups = qemu_record_benchmark(hits, args.runs, target=qemu_target)
    print(table(qmethods, BASELINE, f"\nrecord, QEMU TCG target: bare-metal lab guest, "
                f"{qemu_target.shared_info_size} B x86_32 shared_info + 4 B counter per hit "
                "(snapshots/s; ratios against raw-rsp measured in the same run):"))
    print("duplicate stops dropped per run: " + "; ".join(
        f"{name} {dups[name]}" for name in QEMU_METHODS))
    print(goals(qmethods, {"xreplay": (0.9, 2.5)}))
    ok = ok and all(x.verified for m in qmethods for x in m.results)
    _log(f"record: the same guest in the lab's Solo5 style under QEMU TCG, {hits} hits, "
         f"{args.runs} runs interleaved")
    names = ("xreplay", "raw-rsp")
    q5, dups5 = qemu_record_benchmark(hits, args.runs, target=qemu_solo5, names=names)
    print(table(q5, BASELINE, f"\nrecord, QEMU TCG target, Solo5 declaration: bare-metal lab "
                f"guest (style solo5: uint8_t HYPERVISOR_SHARED_INFO[4096]), "
                f"{qemu_solo5.shared_info_size} B x86_32 shared_info + 4 B counter per hit "
                "(snapshots/s; ratios against raw-rsp measured in the same run):"))
    print("duplicate stops dropped per run: " + "; ".join(
        f"{name} {dups5[name]}" for name in names))
    print(goals(q5, {"xreplay": (0.9, 2.5)}))
    return ok and all(x.verified for m in q5 for x in m.results)
