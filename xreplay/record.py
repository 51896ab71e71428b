"""The recorder: attach GDB to a gdbstub, snapshot at probes, stream into an ``.xrr`` file.

pygdbmi steers (connect, symbols, agent, stop, detach); the in-gdb agent takes each
snapshot inside ``Breakpoint.stop()`` and sends it over a Unix socket to a thread here
that appends it to the :class:`~xreplay.xrr.XrrWriter`.  Whatever ends the run — the count,
the duration, a hang, Ctrl-C, the target dying — the file is closed valid, every probe is
removed and the target is detached (or killed with ``kill_target``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xreplay.abi import layout
from xreplay.errors import XReplayError
from xreplay.gdb.session import AGENT_PATH, GdbCommandError, GdbSession
from xreplay.xrr import ProbeSpec, RecordingHeader, RegionSpec, XrrWriter

HANG_PROBE = "hang"
_SNAP = struct.Struct("<IHHQQQB")
_UNREADABLE = 0xFFFFFFFF
_F_HANG, _F_HAVE_SP, _F_HAVE_FLAGS = 1, 2, 4


@dataclass
class WatchSpec:
    """Extra guest memory stored with each snapshot (e.g. a guest's shadow of pending ports)."""

    name: str
    expr: str
    size: int

    @classmethod
    def parse(cls, text: str) -> WatchSpec:
        """``NAME=EXPR:LEN``."""
        name, sep, rest = text.partition("=")
        expr, sep2, size = rest.rpartition(":")
        if not (sep and sep2 and name and expr and size.strip().isdigit()):
            raise XReplayError(f"bad --watch {text!r}: write NAME=EXPR:LEN, "
                               "e.g. shadow=&evtchn_callback_ml:4096")
        return cls(name, expr, int(size))


@dataclass
class RecordOptions:
    output: Path
    arch: str = "x86_64"
    target: str | None = None  # HOST:PORT of a gdbstub
    launch: list[str] | None = None  # command that starts the target (then attach to target)
    elf: Path | None = None
    probes: list[ProbeSpec] = field(default_factory=list)
    shared_info: str = "HYPERVISOR_shared_info"
    vcpu_info: dict[int, str] = field(default_factory=dict)  # vCPU -> expression
    reeval_vcpu_info: bool = False  # re-read the vcpu_info pointer at every hit
    reeval_shared_info: bool = False  # likewise for shared_info (whole-machine stubs)
    vcpu_expr: str | None = None  # gdb expression for the guest's vCPU id (default: thread)
    watch: list[WatchSpec] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    notify: dict[int, int] = field(default_factory=dict)  # port -> notify vCPU (Xen's n=)
    vcpus: list[int] = field(default_factory=lambda: [0])
    count: int | None = None
    duration: float | None = None
    hang_after: float | None = None
    # True: kill the target at the end; False: detach and let it run on; None: kill what
    # --launch started (nobody else owns it), detach from anything else.
    kill_target: bool | None = None
    gdb: str = "gdb"
    gdb_arch: str | None = None  # e.g. i386:x86-64 for QEMU's x86 stub
    dedupe: bool = False  # drop exact repeats (gdb + QEMU can report a hit twice)
    filter: str | None = None  # gdb expression: record only hits where it is true
    target_kind: str = "remote"
    description: str = ""
    connect_timeout: float = 10.0
    delivery: dict[str, Any] = field(default_factory=dict)
    extra_gdb_commands: list[str] = field(default_factory=list)


@dataclass
class RecordResult:
    output: Path
    snapshots: int
    reason: str  # count | duration | hang | interrupted | target-exited | target-lost
    duplicates: int = 0
    foreign: int = 0
    elapsed: float = 0.0
    hang_snapshot: int | None = None

    @property
    def rate(self) -> float:
        return self.snapshots / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class Progress:
    snapshots: int
    elapsed: float
    last_probe: str | None


def flags_register(arch: str) -> str:
    return "eflags" if arch.startswith("x86") else "cpsr"


class Recorder:
    """One recording run.  ``Recorder(options).run()`` returns a :class:`RecordResult`."""

    def __init__(self, options: RecordOptions,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_interrupt: Callable[[], None] | None = None) -> None:
        """``on_interrupt`` runs right after gdb's interrupt request, for stubs that only
        report a stop once something else stops the guest (gdbsx: ``xl pause`` in dom0)."""
        self.o = options
        self.on_interrupt = on_interrupt
        self.kill = (options.launch is not None if options.kill_target is None
                     else options.kill_target)
        self.on_progress = on_progress
        self.structs = layout(options.arch)
        self._stop_reason: str | None = None
        self._lock = threading.Lock()
        self._last_hit = time.monotonic()
        self._last_probe: str | None = None
        self._agent_json: list[dict[str, Any]] = []
        self._json_cond = threading.Condition()
        self._hang_seen = threading.Event()
        self._reader_error: BaseException | None = None
        self.writer: XrrWriter | None = None
        self.launched: subprocess.Popen | None = None
        self.gdb: GdbSession | None = None

    # -- public ----------------------------------------------------------------------

    def request_stop(self, reason: str = "interrupted") -> None:
        """Ask the run to end (signal handlers call this); the loop does the rest."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def run(self) -> RecordResult:
        o = self.o
        if not o.probes:
            raise XReplayError("no probe to record at: give --upcall, --bottom-half, --block "
                               "or --probe NAME=LOCATION")
        if o.target is None:
            raise XReplayError("no gdbstub address: give --target HOST:PORT")
        if o.elf is not None and not Path(o.elf).is_file():
            raise XReplayError(f"{o.elf}: no such ELF file (--elf)")
        with tempfile.TemporaryDirectory(prefix="xreplay-") as tmp:
            sock_path = os.path.join(tmp, "agent.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock_path)
            listener.listen(1)
            ok = False
            try:
                if o.launch:
                    self._launch()
                self.gdb = GdbSession(o.gdb)
                self._connect()
                self._start_agent(tmp, sock_path, listener)
                result = self._record()
                ok = True
            finally:
                listener.close()
                self._teardown(failed=not ok)
        return result

    # -- set-up ----------------------------------------------------------------------

    def _launch(self) -> None:
        assert self.o.launch
        try:
            self.launched = subprocess.Popen(self.o.launch, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL,
                                             start_new_session=True)
        except OSError as e:
            raise XReplayError(f"cannot launch {shlex.join(self.o.launch)}: {e.strerror}"
                               ) from None

    def _connect(self) -> None:
        o, g = self.o, self.gdb
        assert g is not None
        if o.gdb_arch:
            g.mi(f"-gdb-set architecture {o.gdb_arch}")
        if o.elf is not None:
            try:
                g.mi(f"-file-exec-and-symbols {_mi_quote(str(o.elf))}", timeout=60)
            except GdbCommandError as e:
                raise XReplayError(f"{o.elf}: gdb cannot load it: {e}") from None
        for cmd in o.extra_gdb_commands:
            g.console_command(cmd)
        deadline = time.monotonic() + o.connect_timeout
        while True:
            try:
                g.mi(f"-target-select remote {o.target}", timeout=o.connect_timeout)
                return
            except GdbCommandError as e:
                if "Connection timed out" in str(e) or "Ignoring packet error" in str(e):
                    raise XReplayError(self._not_a_stub()) from None
                launched_alive = self.launched is not None and self.launched.poll() is None
                if launched_alive and time.monotonic() < deadline:
                    time.sleep(0.1)  # the launched stub may not listen yet
                    continue
                raise XReplayError(f"cannot attach to the gdbstub at {o.target}: {e} "
                                   "(is the target running and listening there?)") from None
            except XReplayError:  # no answer at all within connect_timeout
                raise XReplayError(self._not_a_stub()) from None

    def _not_a_stub(self) -> str:
        return (f"no GDB remote-protocol answer from {self.o.target} within "
                f"{self.o.connect_timeout:.0f} s: something listens there, but is it a gdbstub "
                "(gdbserver, QEMU -gdb, gdbsx)?")

    def _regions(self) -> list[RegionSpec]:
        o = self.o
        regions = [RegionSpec("shared_info", "shared_info", self.structs.shared_info.sizeof(),
                              o.shared_info)]
        for vcpu, expr in sorted(o.vcpu_info.items()):
            regions.append(RegionSpec(f"vcpu_info.{vcpu}", "vcpu_info",
                                      self.structs.vcpu_info.sizeof(), expr, vcpu))
        regions += [RegionSpec(w.name, "watch", w.size, w.expr) for w in o.watch]
        return regions

    def _start_agent(self, tmp: str, sock_path: str, listener: socket.socket) -> None:
        o, g = self.o, self.gdb
        assert g is not None
        self.regions = self._regions()
        config = {
            "socket": sock_path,
            "probes": [{"name": p.name, "location": p.location} for p in o.probes],
            "regions": [{"name": r.name, "expr": r.expr, "size": r.size,
                         "reeval": (o.reeval_vcpu_info and r.kind == "vcpu_info")
                         or (o.reeval_shared_info and r.kind == "shared_info")}
                        for r in self.regions],
            "flags_register": flags_register(self.structs.arch),
            "count": o.count or 0,
            "dedupe": o.dedupe,
            "filter": o.filter,
            "vcpu_expr": o.vcpu_expr,
        }
        cfg = os.path.join(tmp, "agent.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        g.python("import importlib.util as _u, sys as _s; "
                 f"_p = _u.spec_from_file_location('xreplay_agent', {str(AGENT_PATH)!r}); "
                 "_m = _u.module_from_spec(_p); _s.modules['xreplay_agent'] = _m; "
                 "_p.loader.exec_module(_m)")
        listener.settimeout(15)
        accepted: list[socket.socket] = []

        def accept() -> None:
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        try:
            g.python(f"import xreplay_agent; xreplay_agent.start({cfg!r})", timeout=60)
        except GdbCommandError as e:
            raise XReplayError(self._explain_agent_error(str(e))) from None
        t.join(15)
        if not accepted:
            raise XReplayError("the in-gdb agent did not connect back (gdb's Python broken?)")
        conn = accepted[0]
        probes = [*o.probes, ProbeSpec(HANG_PROBE, "(target interrupted)", "other")]
        header = RecordingHeader(
            arch=self.structs.arch, probes=probes, regions=self.regions, vcpus=o.vcpus,
            labels=o.labels, notify=o.notify, delivery=o.delivery,
            target={"kind": o.target_kind, "address": o.target,
                    "description": o.description or f"{o.target_kind} at {o.target}",
                    "elf": str(o.elf) if o.elf else None,
                    "launch": shlex.join(o.launch) if o.launch else None})
        self.writer = XrrWriter(o.output, header)
        self._hang_pid = len(probes) - 1
        self._probe_names = [p.name for p in probes]
        self._reader = threading.Thread(target=self._read_agent, args=(conn,), daemon=True)
        self._reader.start()
        hello = self._wait_json("hello", 10)
        self._check_sizes(hello)
        if hello is not None:
            self.writer.note("attached", regions=hello.get("regions"), gdb_arch=hello.get("arch"))

    def _check_sizes(self, hello: dict[str, Any] | None) -> None:
        """Debug info that knows shared_info's type must agree with the --arch layout."""
        for info, spec in zip((hello or {}).get("regions", []), self.regions, strict=False):
            size = info.get("type_size")
            if spec.kind in ("vcpu_info", "shared_info") and size and size != spec.size:
                fits = [a for a in ("x86_64", "x86_32", "arm64")
                        if getattr(layout(a), spec.kind).sizeof() == size]
                hint = f": pass --arch {fits[0]}" if fits else ""
                raise XReplayError(
                    f"{spec.expr} is {size} bytes in {self.o.elf or 'the target'}, but "
                    f"struct {spec.kind} is {spec.size} bytes for --arch "
                    f"{self.structs.arch}{hint}")

    def _explain_agent_error(self, msg: str) -> str:
        if "No symbol" in msg or "not defined" in msg:
            hint = ("check the name, give --elf with symbols, or pass the location/address "
                    "explicitly (--shared-info ADDR, --probe NAME=*ADDR)")
            return f"{msg.rstrip('.')} in {self.o.elf or 'the target'}: {hint}"
        return f"gdb refused to set up the probes: {msg}"

    # -- the agent's frames ----------------------------------------------------------

    def _read_agent(self, conn: socket.socket) -> None:
        f = conn.makefile("rb", buffering=1 << 16)
        try:
            while True:
                head = f.read(5)
                if len(head) < 5:
                    return
                length, kind = struct.unpack("<IB", head)
                body = f.read(length - 1)
                if len(body) < length - 1:
                    return
                if kind == ord("S"):
                    self._on_snapshot(body)
                else:
                    with self._json_cond:
                        self._agent_json.append(json.loads(body))
                        self._json_cond.notify_all()
        except BaseException as e:  # surfaced by the main loop
            self._reader_error = e
        finally:
            f.close()

    def _on_snapshot(self, body: bytes) -> None:
        hit, pid, vcpu, pc, sp, regflags, flags = _SNAP.unpack_from(body)
        at = _SNAP.size
        n = body[at]
        at += 1
        regions: list[bytes | None] = []
        for _ in range(n):
            (size,) = struct.unpack_from("<I", body, at)
            at += 4
            if size == _UNREADABLE:
                regions.append(None)
            else:
                regions.append(body[at:at + size])
                at += size
        hang = bool(flags & _F_HANG)
        assert self.writer is not None
        with self._lock:
            seq = self.writer.append(
                probe=pid, vcpu=vcpu, pc=pc, regions=regions,
                sp=sp if flags & _F_HAVE_SP else None,
                regflags=regflags if flags & _F_HAVE_FLAGS else None, hang=hang)
        self._last_hit = time.monotonic()
        self._last_probe = self._probe_names[pid] if pid < len(self._probe_names) else None
        if hang:
            self.hang_seq = seq
            self._hang_seen.set()

    def _wait_json(self, event: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._json_cond:
            while True:
                for i, d in enumerate(self._agent_json):
                    if d.get("event") == event:
                        return self._agent_json.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._json_cond.wait(left)

    # -- the run -----------------------------------------------------------------------

    def _record(self) -> RecordResult:
        o, g = self.o, self.gdb
        assert g is not None and self.writer is not None
        self.hang_seq: int | None = None
        g.wait_stopped(0.2)  # the stop that attaching reported is not ours to act on
        g.pending.clear()
        g.mi("-exec-continue")
        t0 = self._last_hit = time.monotonic()
        next_progress = t0
        reason = None
        running = True
        while reason is None:
            stopped = g.wait_stopped(0.05)
            now = time.monotonic()
            if stopped is not None:
                running = False
                reason = self._why_stopped(stopped)
                if reason is None:  # e.g. a signal the target should get: pass it on
                    g.mi("-exec-continue")
                    running = True
                continue
            if self._gone():
                reason = "target-lost"
                running = False
            elif self._stop_reason:
                reason = self._stop_reason
            elif o.duration is not None and now - t0 >= o.duration:
                reason = "duration"
            elif o.hang_after is not None and now - self._last_hit >= o.hang_after:
                reason = "hang"
            if self.on_progress and now >= next_progress:
                self.on_progress(Progress(self.writer.count, now - t0, self._last_probe))
                next_progress = now + 0.25
        if running and reason != "target-lost":
            running = not self._interrupt()
            if not running and reason == "hang":
                self._hang_seen.clear()
                g.python(f"import xreplay_agent; xreplay_agent.snapshot_now({self._hang_pid})")
                self._hang_seen.wait(10)
        elapsed = time.monotonic() - t0
        stats = self._finish_agent(reason)
        self._detach_or_kill(reason, running)
        # the agent's socket is closed by finish(); the reader drains what was sent
        self._reader.join(5)
        with self._lock:
            self.writer.note("end", reason=reason, **stats)
            self.writer.close(reason=reason, **stats)
        return RecordResult(o.output, self.writer.count, reason, stats.get("duplicates", 0),
                            stats.get("foreign", 0), elapsed, self.hang_seq)

    def _why_stopped(self, payload: dict[str, Any]) -> str | None:
        why = payload.get("reason", "")
        if why.startswith("exited"):
            return "target-exited"
        if why == "signal-received":
            sig = payload.get("signal-name", "")
            if sig in ("SIGKILL", "SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"):
                return "target-exited" if sig == "SIGKILL" else f"target-crashed-{sig}"
            if sig in ("SIGINT", "SIGTRAP", "0"):
                return self._stop_reason or "interrupted"
            return None
        if why in ("breakpoint-hit", "") and self.o.count:
            return "count"  # only the agent's count-limit stop is a user-visible stop
        return self._stop_reason or "stopped"

    def _gone(self) -> bool:
        g = self.gdb
        assert g is not None
        if self.launched is not None and self.launched.poll() is not None:
            return True
        for r in g.pending:
            if r.get("message") == "thread-group-exited":
                return True
        return any("Remote connection closed" in c or "Remote communication error" in c
                   for c in g.console[-5:])

    def _interrupt(self) -> bool:
        """Stop the running target; True once it is stopped."""
        g = self.gdb
        assert g is not None
        try:
            g.mi("-exec-interrupt", timeout=5)
            if self.on_interrupt is not None:
                self.on_interrupt()
        except XReplayError:
            return False
        return g.wait_stopped(10) is not None

    def _finish_agent(self, reason: str) -> dict[str, Any]:
        g = self.gdb
        assert g is not None
        if reason == "target-lost":
            with contextlib.suppress(XReplayError):
                g.python("import xreplay_agent; xreplay_agent.finish()", timeout=5)
        else:
            g.python("import xreplay_agent; xreplay_agent.finish()", timeout=10)
        fin = self._wait_json("finish", 5) or {}
        return {k: fin[k] for k in ("duplicates", "foreign") if k in fin}

    def _detach_or_kill(self, reason: str, running: bool) -> None:
        g = self.gdb
        assert g is not None
        if reason in ("target-exited", "target-lost") or reason.startswith("target-crashed"):
            return
        try:
            if self.kill:
                g.console_command("kill", timeout=10)
            else:
                g.mi("-target-detach", timeout=10)
        except XReplayError:
            pass

    def _teardown(self, failed: bool) -> None:
        if self.gdb is not None:
            self.gdb.exit()
        if self.writer is not None and not self.writer.closed:
            with self._lock:
                self.writer.close(reason="aborted")
        # A launched target is stopped by its PID unless the user asked to detach from it
        # and leave it running; so is one whose recording never started.
        if self.launched is not None and (self.kill or failed):
            _stop_pid(self.launched)


def _stop_pid(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _mi_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
