"""The recorder: attach GDB to a gdbstub, snapshot at probes, stream into an ``.xrr`` file.

pygdbmi steers (connect, symbols, agent, stop, detach); the in-gdb agent takes each
snapshot inside ``Breakpoint.stop()`` and sends it over a Unix socket
(:class:`~xreplay.record.channel.AgentChannel`) to the
:class:`~xreplay.record.sink.RecordingSink`.  Whatever ends the run — the count, the
duration, a hang, Ctrl-C, the target dying, a full disk — the file is closed valid, every
probe is removed and the target is detached (or killed with ``kill_target``).  A run that
fails during set-up leaves an existing recording alone and the target stopped where it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from xreplay.abi import canonical_arch, layout
from xreplay.elf import ElfInfo, read_elf
from xreplay.errors import TargetError, XReplayError
from xreplay.gdb.proxy import StubProxy
from xreplay.gdb.rsp import Connection, RspError
from xreplay.gdb.session import AGENT_PATH, GdbCommandError, GdbSession
from xreplay.gdb.stub import G_TOO_LONG, QEMU_X86_GDB_ARCH, StubInfo, StubKind, identify
from xreplay.paths import check_output
from xreplay.record import direct, trace
from xreplay.record.channel import AgentChannel
from xreplay.record.options import EndReason, Progress, RecordOptions, RecordResult
from xreplay.record.sink import RecordingSink
from xreplay.record.target import LaunchedTarget, launch_log_path
from xreplay.xrr import ProbeSpec, RecordingHeader, RegionSpec
from xreplay.xrr.header import FIFO_KINDS, PAGE_COUNT_KIND, fifo_regions

HANG_PROBE = "hang"
#: the GIL switch interval while the direct loop runs (CPython's default is 5 ms)
SWITCH_INTERVAL = 0.0002
#: gdb's architecture names -> guest ABI, where the name alone decides it.
_GDB_ARCHES = {"i386:x86-64": "x86_64", "i386": "x86_32", "aarch64": "arm64", "arm": "arm32"}
_CRASH_SIGNALS = ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE")
#: seconds a stop is waited for after gdb's interrupt
STOP_PATIENCE = 30.0
#: seconds without a stop after which gdb's interrupt is sent again (within STOP_PATIENCE)
INTERRUPT_AGAIN = 5.0


def flags_register(arch: str) -> str:
    return "eflags" if arch.startswith("x86") else "cpsr"


def resolve_arch(arch: str | None, elf: ElfInfo | None) -> str | None:
    """The guest ABI from ``--arch`` and the image; None when only the stub can tell."""
    if arch is not None:
        arch = canonical_arch(arch)
        if elf is not None and elf.arch is not None and elf.arch != arch:
            raise XReplayError(
                f"--arch {arch} contradicts {elf.path} ({elf.describe()}, the {elf.arch} "
                f"ABI): drop --arch, or give the image the guest really runs")
        return arch
    if elf is not None:
        if elf.arch is None:
            raise XReplayError(f"{elf.path}: {elf.describe()} is not a Xen guest ABI this tool "
                               "decodes (x86_64, x86_32, arm64, arm32): pass --arch")
        return elf.arch
    return None


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
        self.sink = RecordingSink(Path(options.output))
        self.launched: LaunchedTarget | None = None
        self.gdb: GdbSession | None = None
        self.channel: AgentChannel | None = None
        self.stub = StubInfo(StubKind.UNKNOWN)
        self.elf: ElfInfo | None = None
        self.arch: str | None = None
        self.regions: list[RegionSpec] = []
        self.probes: list[ProbeSpec] = []
        self._stop_reason: EndReason | None = None
        self._last_hit = time.monotonic()
        self._last_probe: str | None = None
        self._domains: dict[bytes, int] = {}  # arch_shared_info identity -> first snapshot
        self._mixed: str | None = None
        self._stopped_at: str | None = None
        self._identity: slice | None = None
        self.proxy: StubProxy | None = None
        self.plan: direct.DirectPlan | None = None
        self._trace: dict[str, Any] | None = None  # the trace loop's batches, for the end note
        self._loop_error: str | None = None
        self.hit_loop = "agent"
        self._agent_why: str | None = None  # why the agent records (``auto`` chose it)
        self._packets: int | None = None
        self._last_icount: int | None = None

    # -- public ----------------------------------------------------------------------

    def request_stop(self, reason: str = "interrupted") -> None:
        """Ask the run to end (signal handlers call this); the loop does the rest."""
        if self._stop_reason is None:
            self._stop_reason = EndReason(reason)

    def run(self) -> RecordResult:
        o = self.o
        if not o.probes:
            raise XReplayError("no probe to record at: give --upcall, --bottom-half, --block, "
                               "--probe NAME=LOCATION or --profile")
        if o.target is None:
            raise XReplayError("no gdbstub address: give --target HOST:PORT")
        if o.elf is not None:
            if not Path(o.elf).is_file():
                raise XReplayError(f"{o.elf}: no such ELF file (--elf)")
            self.elf = read_elf(o.elf)
        self.arch = resolve_arch(o.arch, self.elf)
        check_output(o.output)
        if self.arch is not None:
            self._check_ports_and_vcpus()
        if o.hit_loop not in ("auto", "agent", "direct", "trace"):
            raise XReplayError(f"hit loop {o.hit_loop!r}: use auto, agent, direct or trace")
        why_not = self._direct_excluded()
        if o.hit_loop in ("direct", "trace") and why_not:
            raise XReplayError(f"--hit-loop {o.hit_loop}: {why_not}")
        if o.hit_loop == "auto":
            self._agent_why = why_not
        with tempfile.TemporaryDirectory(prefix="xreplay-") as tmp:
            self.channel = AgentChannel(tmp)
            started = False
            try:
                if o.launch:
                    self.launched = LaunchedTarget(o.launch, launch_log_path(Path(o.output)))
                if not why_not:
                    # gdb speaks to the stub through a relay the direct loop can take over
                    self.proxy = StubProxy(o.target, o.connect_timeout)
                self.gdb = GdbSession(o.gdb)
                self._connect()
                self._start_agent(tmp)
                started = True
                return self._record()
            finally:
                self.channel.close()
                self._teardown(started)
                if self.proxy is not None:
                    self.proxy.close()

    # -- set-up ----------------------------------------------------------------------

    def _direct_excluded(self) -> str | None:
        """Why the options need gdb at each hit (so no direct loop), or None."""
        o = self.o
        if o.hit_loop == "agent":
            return "the agent was asked for"
        if o.filter:
            return "--filter is evaluated by gdb at each hit"
        if o.vcpu_expr:
            return "--vcpu-expr is evaluated by gdb at each hit"
        if o.reeval_vcpu_info or o.reeval_shared_info:
            return "a region is re-evaluated by gdb at each hit"
        if o.replay:
            return "a QEMU record/replay run stores the guest's instruction count at each hit"
        if o.target_kind == str(StubKind.GDBSX):
            return "gdbsx answers no Z packets (gdb writes its breakpoints into memory)"
        return None

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
        self._attach()
        for cmd in o.attach_commands:
            g.console_command(cmd)
        self.stub = identify(g)
        if o.target_kind is not None:
            with contextlib.suppress(ValueError):
                self.stub.kind = StubKind(o.target_kind)
        if o.on_attach is not None:  # e.g. the Linux profile's guest check, in this session
            o.on_attach(g)
        if self.stub.kind is StubKind.GDBSX:
            from xreplay.gdb.gdbsx import prepare_session

            prepare_session(g, o, self.stub.answers)
        if self.arch is None:
            self.arch = self._arch_from_stub()

    def _attach(self) -> None:
        o, g = self.o, self.gdb
        assert g is not None
        deadline = time.monotonic() + o.connect_timeout
        arch_forced = bool(o.gdb_arch)
        while True:
            try:
                where = self.proxy.address if self.proxy is not None else o.target
                g.mi(f"-target-select remote {where}", timeout=o.connect_timeout)
                return
            except GdbCommandError as e:
                msg = str(e)
                if G_TOO_LONG in msg and not arch_forced and (self.arch or "x86").startswith(
                        "x86"):
                    # QEMU's x86 stub sends the 64-bit register file whatever the guest's
                    # mode: a 32-bit image makes gdb expect fewer registers.  QEMU takes a
                    # new connection, so retry with the architecture it needs.
                    g.mi(f"-gdb-set architecture {QEMU_X86_GDB_ARCH}")
                    arch_forced = True
                    continue
                if G_TOO_LONG in msg:
                    raise XReplayError(
                        f"the gdbstub at {o.target} reports more registers than gdb's "
                        "architecture has: pass --arch (or --elf) for the guest") from None
                if "Connection timed out" in msg or "Ignoring packet error" in msg:
                    raise XReplayError(self._not_a_stub()) from None
                if self.launched is not None and self.launched.alive() and (
                        time.monotonic() < deadline):
                    time.sleep(0.1)  # the launched stub may not listen yet
                    continue
                why = self.launched.explain() if self.launched is not None else ""
                if self.proxy is not None and self.proxy.error:
                    msg = self.proxy.error.replace(str(self.proxy.upstream), o.target)
                raise XReplayError(f"cannot attach to the gdbstub at {o.target}: "
                                   f"{_short(msg)} (is the target running and listening "
                                   f"there?){why}") from None
            except XReplayError:  # no answer at all within connect_timeout
                raise XReplayError(self._not_a_stub()) from None

    def _not_a_stub(self) -> str:
        return (f"no GDB remote-protocol answer from {self.o.target} within "
                f"{self.o.connect_timeout:.0f} s: something listens there, but is it a gdbstub "
                "(gdbserver, QEMU -gdb, gdbsx)?")

    def _gdb_arch_name(self) -> str:
        assert self.gdb is not None
        seen = len(self.gdb.console)
        self.gdb.console_command("show architecture")
        text = "".join(self.gdb.console[seen:])
        m = re.search(r'currently "([^"]+)"', text) or re.search(r'is "([^"]+)"', text)
        return m.group(1) if m else ""

    def _arch_from_stub(self) -> str:
        name = self._gdb_arch_name()
        arch = _GDB_ARCHES.get(name) or ("arm32" if name.startswith("arm") else None)
        if arch is None or (self.stub.kind is StubKind.QEMU and arch.startswith("x86")):
            # QEMU's x86 stub always looks 64-bit; a gdbserver-style stub reports the
            # process's own architecture.
            raise XReplayError(
                f"cannot tell the guest ABI from the {self.stub.kind} stub at "
                f"{self.o.target} (gdb architecture {name or 'unknown'}): pass --elf with "
                "the guest image, or --arch x86_64|x86_32|arm64|arm32")
        return arch

    def _make_regions(self) -> list[RegionSpec]:
        o = self.o
        st = layout(self.arch or "x86_64")
        regions = [RegionSpec("shared_info", "shared_info", st.shared_info.sizeof(),
                              o.shared_info)]
        for vcpu, expr in sorted(o.vcpu_info.items()):
            regions.append(RegionSpec(f"vcpu_info.{vcpu}", "vcpu_info",
                                      st.vcpu_info.sizeof(), expr, vcpu))
        if o.fifo_control_block or o.fifo_event_pages:
            if not (o.fifo_control_block and o.fifo_event_pages):
                raise XReplayError("a FIFO recording needs both the control blocks and the "
                                   "event-array pages")
            exprs = {f"control_block.{v}": e for v, e in o.fifo_control_block.items()}
            exprs |= {f"event_array.{i}": e for i, e in enumerate(o.fifo_event_pages)}
            regions += fifo_regions(sorted(o.fifo_control_block), len(o.fifo_event_pages),
                                    exprs, o.fifo_page_count)
        regions += [RegionSpec(w.name, "watch", w.size, w.expr) for w in o.watch]
        return regions

    def _check_ports_and_vcpus(self) -> None:
        o = self.o
        st = layout(self.arch or "x86_64")
        for option, ports in (("--label", o.labels), ("--bind", o.notify)):
            bad = [p for p in ports if not 0 <= p < st.nr_ports]
            if bad:
                raise XReplayError(f"{option} port {bad[0]}: the {st.arch} 2-level ABI has "
                                   f"ports 0-{st.nr_ports - 1}")
        implicit = [v for v in o.vcpus if v not in o.vcpu_info]
        bad_v = [v for v in implicit if not 0 <= v < st.legacy_max_vcpus]
        if bad_v:
            raise XReplayError(
                f"--vcpus {bad_v[0]}: shared_info holds vcpu_info for vCPUs 0-"
                f"{st.legacy_max_vcpus - 1} only; give that vCPU's registered vcpu_info with "
                f"--vcpu-info {bad_v[0]}=EXPR")
        bad_n = sorted({v for v in o.notify.values() if v not in o.vcpus})
        if bad_n:
            raise XReplayError(f"--bind names vCPU {bad_n[0]}, which is not recorded: add it "
                               "to --vcpus")

    def _start_agent(self, tmp: str) -> None:
        o, g, ch = self.o, self.gdb, self.channel
        assert g is not None and ch is not None and self.arch is not None
        self._check_ports_and_vcpus()
        self.regions = self._make_regions()
        dedupe = self.stub.dedupe if o.dedupe is None else o.dedupe
        count_at = next((i for i, r in enumerate(self.regions) if r.kind == PAGE_COUNT_KIND),
                        None)
        config = {
            "socket": ch.path,
            "probes": [{"name": p.name, "location": p.location} for p in o.probes],
            "regions": [{"name": r.name, "expr": r.expr, "size": r.size,
                         "reeval": (o.reeval_vcpu_info
                                    and r.kind in ("vcpu_info", *FIFO_KINDS))
                         or (o.reeval_shared_info and r.kind == "shared_info"),
                         **({"in_use": {"count": count_at, "page": r.page}}
                            if count_at is not None and r.kind == "fifo_event_page" else {})}
                        for r in self.regions],
            "flags_register": flags_register(self.arch),
            "count": o.count or 0,
            "dedupe": dedupe,
            "stable_reads": o.stable_reads,
            "filter": o.filter,
            "vcpu_expr": o.vcpu_expr,
            "direct": self.proxy is not None,
            "guest_time": bool(o.replay),
        }
        cfg = os.path.join(tmp, "agent.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        g.python("import importlib.util as _u, sys as _s; "
                 f"_p = _u.spec_from_file_location('xreplay_agent', {str(AGENT_PATH)!r}); "
                 "_m = _u.module_from_spec(_p); _s.modules['xreplay_agent'] = _m; "
                 "_p.loader.exec_module(_m)")
        ch.expect_connection()
        try:
            g.python(f"import xreplay_agent; xreplay_agent.start({cfg!r})", timeout=60)
        except GdbCommandError as e:
            raise XReplayError(self._explain_agent_error(str(e))) from None
        self.probes = [*o.probes, ProbeSpec(HANG_PROBE, "(target interrupted)", "other")]
        self._hang_pid = len(self.probes) - 1
        self._probe_names = [p.name for p in self.probes]
        ch.on_json = self._on_region_moved
        ch.on_time = self._on_guest_time
        if not ch.start(self._on_snapshot):
            raise XReplayError("the in-gdb agent did not connect back (gdb's Python broken?)")
        hello = ch.wait_json("hello", 10)
        if hello is None:
            raise XReplayError("the in-gdb agent did not report its set-up within 10 s"
                               + (f" ({ch.error})" if ch.error else ""))
        infos = hello.get("regions", [])
        self.regions = [dataclasses.replace(r, size=int(i.get("size") or r.size))
                        for r, i in zip(self.regions, infos, strict=False)] or self.regions
        self._check_regions(infos)
        self._plan_direct(hello.get("direct"), dedupe)
        header = RecordingHeader(
            arch=self.arch, probes=self.probes, regions=self.regions, vcpus=o.vcpus,
            labels=o.labels, notify=o.notify, delivery=o.delivery, replay=o.replay,
            target={"kind": str(self.stub.kind), "address": o.target,
                    "description": o.description or f"{self.stub.kind} at {o.target}",
                    "elf": str(o.elf) if o.elf else None,
                    "launch": shlex.join(o.launch) if o.launch else None,
                    "stub": self.stub.to_json(), "hit_loop": self.hit_loop,
                    **({"hit_loop_why": self._agent_why}
                       if self.hit_loop == "agent" and self._agent_why else {})})
        self._identity = self._identity_slice()
        self.sink.open(header)
        self.sink.note("attached", regions=infos, gdb_arch=hello.get("arch"),
                       stub=str(self.stub.kind))
        if self.proxy is not None and self.plan is None:
            self.sink.note("hit-loop", path="agent", why=self._agent_why or "")

    def _plan_direct(self, info: dict[str, Any] | None, dedupe: bool) -> None:
        """The direct loop's plan from what gdb resolved, or the reason for the agent."""
        if self.proxy is None:
            return
        why: str | None = None
        if info is None:
            why = "the agent did not report the addresses"
        else:
            p = direct.plan(info, stub=self.stub.kind,
                            region_names=[r.name for r in self.regions],
                            ack=not self.proxy.noack, packet_size=self.proxy.packet_size,
                            dedupe=dedupe, count=self.o.count or 0, hang_probe=self._hang_pid,
                            arch=self.arch or "")
            if isinstance(p, str):
                why = p
            elif self.o.hit_loop == "trace" and (no := trace.why_not(p)) is not None:
                why = no
            elif self.o.hit_loop == "auto" and p.stub is StubKind.QEMU and p.follows:
                # Proven through the Xen-lab and lab suites: gdbserver with or without
                # pointers, QEMU with regions at fixed addresses.  A region read through a
                # pointer on QEMU (a moved region re-read in ack mode, mid-batch) has no
                # suite behind it yet: `auto` keeps the agent there; `direct` may try.
                why = ("a region is read through a pointer on QEMU's stub (the direct loop "
                       "is proven there only for regions at fixed addresses)")
            else:
                self.plan = p
                self.hit_loop = "trace" if self.o.hit_loop == "trace" else "direct"
        if why is not None:
            if self.o.hit_loop in ("direct", "trace"):
                raise XReplayError(f"--hit-loop {self.o.hit_loop}: {why}")
            self._agent_why = why

    def _check_regions(self, infos: list[dict[str, Any]]) -> None:
        """Debug info and the target must agree with what we are about to decode."""
        st_arch = self.arch or "x86_64"
        for info, spec in zip(infos, self.regions, strict=False):
            size, code = info.get("type_size"), info.get("type_code")
            if spec.kind in ("vcpu_info", "shared_info") and size:
                if code == "struct" and size != spec.size:
                    fits = [a for a in ("x86_64", "x86_32", "arm64")
                            if getattr(layout(a), spec.kind).sizeof() == size]
                    hint = f": pass --arch {fits[0]}" if fits else ""
                    raise XReplayError(
                        f"{spec.expr} is a {size}-byte struct in {self.o.elf or 'the target'}, "
                        f"but struct {spec.kind} is {spec.size} bytes for --arch "
                        f"{st_arch}{hint}")
                if code == "array" and size < spec.size:
                    raise XReplayError(
                        f"{spec.expr} is {size} bytes in {self.o.elf or 'the target'}, smaller "
                        f"than struct {spec.kind} ({spec.size} bytes for {st_arch}): is it "
                        "really the shared page?")
            if info.get("how") == "address" and not info.get("readable") and (
                    not self.stub.whole_machine):
                addr = int(info.get("address") or 0)
                raise XReplayError(f"{spec.name} at {spec.expr}: {addr:#x} is not mapped in "
                                   f"the target{self._pie_hint(addr)}")

    def _pie_hint(self, addr: int) -> str:
        if self.elf is None or not self.elf.is_pie or self.gdb is None:
            return ""
        seen = len(self.gdb.console)
        with contextlib.suppress(XReplayError):
            self.gdb.console_command("info files")
        m = re.search(r"Entry point: (0x[0-9a-f]+)", "".join(self.gdb.console[seen:]))
        bias = int(m.group(1), 16) - self.elf.entry if m else 0
        if not bias:
            return " (pass the symbol name instead of a number)"
        return (f"; {self.elf.path} is a PIE loaded at offset {bias:#x}, so an nm address "
                f"{addr:#x} is {addr + bias:#x} at run time: pass the symbol name, or that "
                "address")

    def _explain_agent_error(self, msg: str) -> str:
        msg = re.sub(r"^(gdb\.)?GdbError: ", "", msg.strip())
        if "not found" in msg and msg.startswith("probe "):
            return (f"{msg} in {self.o.elf or 'the target'}: check the name (nm the image), "
                    "give --elf with symbols, or pass an address as *0xADDR")
        if "No symbol" in msg or "not defined" in msg:
            hint = ("check the name, give --elf with symbols, or pass the location/address "
                    "explicitly (--shared-info ADDR, --probe NAME=*ADDR)")
            return f"{msg.rstrip('.')} in {self.o.elf or 'the target'}: {hint}"
        if "gdb cannot evaluate" in msg:
            return msg
        return f"gdb refused to set up the probes: {msg}"

    def _identity_slice(self) -> slice | None:
        """Where in shared_info a domain's own constants live (x86 ``arch.max_pfn`` and
        ``pfn_to_mfn_frame_list_list``): two domains never share them."""
        if not (self.stub.whole_machine and not self.o.filter and self.o.single_domain
                and (self.arch or "").startswith("x86")):
            return None
        st = layout(self.arch or "x86_64")
        off = st.describe()["structs"]["shared_info"]["fields"]["arch"]["offset"]
        return slice(off, off + 2 * st.bits_per_word // 8)

    # -- the agent's frames ----------------------------------------------------------

    def _on_snapshot(self, snap: tuple[Any, ...]) -> None:
        _hit, pid, vcpu, pc, sp, regflags, hang, regions = snap[:8]
        if self.sink.failed or self._mixed:
            return
        # the trace loop's snapshots carry their hit's time (monotonic ns), fetched later
        when = snap[8] if len(snap) > 8 else None
        seq = self.sink.append(probe=pid, vcpu=vcpu, pc=pc, regions=regions, sp=sp,
                               regflags=regflags, hang=hang,
                               **({"t_ns": self.sink.since_start(when)} if when else {}))
        self._last_hit = time.monotonic()
        self._last_probe = self._probe_names[pid] if pid < len(self._probe_names) else None
        if self._identity is not None and seq is not None and regions and regions[0]:
            ident = bytes(regions[0][self._identity])
            if any(ident) and ident not in self._domains:
                self._domains[ident] = seq
                if len(self._domains) > 1:
                    first = next(iter(self._domains.values()))
                    self._mixed = (
                        f"hits of more than one domain: snapshots #{first} and #{seq} show "
                        "different shared_info pages (arch.max_pfn / pfn_to_mfn_frame_list_"
                        "list differ); on a whole-machine stub give --domain (with --symbols) "
                        "or --filter EXPR to record one domain")

    def _on_guest_time(self, _hit: int, icount: int) -> None:
        self.sink.guest_time(icount)
        self._last_icount = icount

    def _on_region_moved(self, event: dict[str, Any]) -> None:
        addr = event.get("address")
        self.sink.note("region-moved", region=event.get("region"), address=addr,
                       hit=event.get("hit"))

    # -- the run -----------------------------------------------------------------------

    def _record(self) -> RecordResult:
        o, g = self.o, self.gdb
        assert g is not None and self.channel is not None
        g.wait_stopped(0.2)  # the stop that attaching reported is not ours to act on
        g.pending.clear()
        t0 = self._last_hit = time.monotonic()
        gdb_packets0 = self.proxy.gdb_packets if self.proxy is not None else 0
        outcome = self._run_direct(t0) if self.plan is not None else None
        direct_dups = 0
        if outcome is None:
            reason, crash_signal = self._run_agent(t0)
            if self.proxy is not None:
                self._packets = self.proxy.gdb_packets - gdb_packets0
        else:
            reason, crash_signal, direct_dups = outcome
        elapsed = time.monotonic() - t0
        stats = self._finish_agent(reason)
        if direct_dups:
            stats["duplicates"] = stats.get("duplicates", 0) + direct_dups
        self._detach_or_kill(reason, False)
        # the agent's socket is closed by finish(); the reader drains what was sent
        self.channel.join(5)
        extra: dict[str, Any] = {"hit_loop": self.hit_loop}
        if self.hit_loop == "agent" and self._agent_why:
            extra["hit_loop_why"] = self._agent_why
        if self._packets is not None:
            extra["packets"] = self._packets
        if crash_signal:
            extra["signal"] = crash_signal
        if self._stopped_at:
            extra["stopped_at"] = self._stopped_at
        if self._trace is not None:  # what the trace loop fetched, and what it could not
            extra["trace"] = self._trace
        message = self.sink.error if reason is EndReason.WRITE_ERROR else (
            self._mixed or self._loop_error or (self._trace or {}).get("lost"))
        if message:
            extra["message"] = message
        unread = dict(self.sink.unreadable)
        self.sink.note("end", reason=str(reason), unreadable=unread, **stats, **extra)
        self.sink.close(reason=str(reason), unreadable=unread, **stats, **extra)
        return RecordResult(
            Path(o.output), self.sink.count, reason, stats.get("duplicates", 0),
            stats.get("foreign", 0), elapsed, self.sink.hang_seq, signal=crash_signal,
            unreadable=unread, readable_shared_info=self.sink.readable_shared_info,
            message=message or self.sink.error,
            launch_log=self.launched.log if self.launched else None,
            stub=str(self.stub.kind), arch=self.arch,
            filter_errors=stats.get("filter_errors", 0), hit_loop=self.hit_loop,
            hit_loop_why=self._agent_why if self.hit_loop == "agent" else None,
            unstable_reads=stats.get("unstable_reads", 0),
            packets=self._packets, stopped_at=self._stopped_at)

    def _stop_condition(self, t0: float) -> EndReason | None:
        """Why the run should end now (checked while the target runs), or None."""
        o, now = self.o, time.monotonic()
        if self.sink.failed:
            return EndReason.WRITE_ERROR
        if self._mixed:
            return EndReason.MIXED_DOMAINS
        if self.channel is not None and self.channel.error:
            return EndReason.TARGET_LOST
        if self.launched is not None and not self.launched.alive():
            return EndReason.TARGET_LOST
        if self._stop_reason:
            return self._stop_reason
        if o.duration is not None and now - t0 >= o.duration:
            return EndReason.DURATION
        if o.hang_after is not None and now - self._last_hit >= o.hang_after:
            return EndReason.HANG
        return None

    def _direct_checker(self, t0: float) -> Callable[[], EndReason | None]:
        """The stop conditions, plus the progress report every 0.25 s."""
        next_progress = [t0]

        def check() -> EndReason | None:
            if self.on_progress is not None:
                now = time.monotonic()
                if now >= next_progress[0]:
                    self.on_progress(Progress(self.sink.count, now - t0, self._last_probe))
                    next_progress[0] = now + 0.25
            return self._stop_condition(t0)

        return check

    def _run_direct(self, t0: float) -> tuple[EndReason, str | None, int] | None:
        """The hits through the direct loop; None when it could not start (the agent then
        records, and a note says why)."""
        o = self.o
        assert self.proxy is not None and self.plan is not None and self.gdb is not None
        sock = self.proxy.take()
        why = None if sock is not None else "the relay to the stub had ended"
        loop = None
        if sock is not None:
            conn = Connection(sock, ack=self.plan.ack)
            queue: SimpleQueue[tuple[Any, ...] | None] = SimpleQueue()

            def enqueue(snap: tuple[Any, ...]) -> None:
                self._last_hit = time.monotonic()
                queue.put(snap)

            hooks = direct.Hooks(enqueue, self._direct_checker(t0),
                                 self.sink.note, lambda: time.monotonic() - self._last_hit,
                                 o.interrupt_hang_after, o.hang_after)
            loop = (trace.TraceLoop(conn, self.plan, hooks) if o.hit_loop == "trace"
                    else direct.DirectLoop(conn, self.plan, hooks))
            try:
                loop.insert()
            except (RspError, OSError, ValueError) as e:
                why = f"the stub refused the breakpoints: {e}"
                if o.hit_loop == "trace":
                    with contextlib.suppress(RspError, OSError, ValueError):
                        loop.remove()
        if why is not None or loop is None:
            self.proxy.give_back()
            if o.hit_loop in ("direct", "trace"):
                raise XReplayError(f"--hit-loop {o.hit_loop}: {why}")
            self.plan = None
            self.hit_loop = "agent"
            self._agent_why = why
            self.sink.note("hit-loop", path="agent", why=why)
            return None
        self.hit_loop = self._describe(loop)
        self.sink.note("hit-loop", path="trace" if isinstance(loop, trace.TraceLoop)
                       else "direct", how=self.hit_loop, notes=self.plan.notes)
        there = True
        # The file is written by a thread of its own: encoding a snapshot costs about as
        # much CPU as the stub's round trip, and the loop waits on its socket meanwhile (the
        # GIL is released there).  A short switch interval hands the GIL back to the loop
        # as soon as the stub answers, instead of after 5 ms.
        writer = threading.Thread(target=self._write_queued, args=(queue,),
                                  name="xreplay-writer", daemon=True)
        writer.start()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            reason, there = loop.run()
        except (RspError, OSError, ValueError) as e:
            reason, there = EndReason.TARGET_LOST, False
            self.sink.note("direct-loop-error", error=str(e))
            if isinstance(loop, trace.TraceLoop):
                self._loop_error = f"the trace loop stopped: {e}"
        finally:
            queue.put(None)
            writer.join()
            sys.setswitchinterval(interval)
        if there:
            try:
                loop.remove()
                while conn.poll(0.02):  # a stop that raced the interrupt: not gdb's
                    conn.recv()
            except (RspError, OSError, ValueError):
                there = False
        if isinstance(loop, trace.TraceLoop):
            self._trace = {"batches": loop.batches, "snapshots": loop.hits, "batch": loop.batch,
                           **({"lost": loop.lost()} if loop.lost() else {})}
            self.sink.note("trace-batches", **self._trace)
        elif self.plan.notes:
            self.hit_loop = self._describe(loop)
            self.sink.note("hit-loop", path="direct", how=self.hit_loop, notes=self.plan.notes)
        self._packets = conn.sent
        self.proxy.give_back()
        if there:
            # gdb's caches still hold the attach stop's registers and memory
            for cmd in ("maint flush register-cache", "maint flush dcache"):
                with contextlib.suppress(XReplayError):
                    self.gdb.console_command(cmd)
        return reason, loop.crash_signal, loop.duplicates

    def _describe(self, loop: direct.DirectLoop) -> str:
        assert self.plan is not None
        if isinstance(loop, trace.TraceLoop):
            return "direct remote protocol (" + loop.describe() + ")"
        return self.plan.describe(loop.hardware)

    def _write_queued(self, queue: SimpleQueue[tuple[Any, ...] | None]) -> None:
        while (snap := queue.get()) is not None:
            self._on_snapshot(snap)

    def _run_agent(self, t0: float) -> tuple[EndReason, str | None]:
        """The hits through the in-gdb agent: gdb runs the target, this loop watches."""
        o, g = self.o, self.gdb
        assert g is not None and self.channel is not None
        g.mi("-exec-continue")
        next_progress = t0
        reason: EndReason | None = None
        crash_signal: str | None = None
        running = True
        while reason is None:
            stopped = g.wait_stopped(0.05)
            now = time.monotonic()
            if stopped is not None:
                running = False
                reason, crash_signal = self._why_stopped(stopped)
                if reason is None:  # e.g. a signal the target should get: pass it on
                    g.mi("-exec-continue")
                    running = True
                continue
            if self._gone():
                reason = EndReason.TARGET_LOST
                running = False
            else:
                reason = self._stop_condition(t0)
            if self.on_progress and now >= next_progress:
                self.on_progress(Progress(self.sink.count, now - t0, self._last_probe))
                next_progress = now + 0.25
        idle = time.monotonic() - self._last_hit
        if reason is EndReason.REPLAY_END and o.end_is_hang is not None and \
                o.end_is_hang(self._last_icount):
            reason = EndReason.HANG  # the log ends in a hang: its snapshot is taken there
            self._hang_snapshot()
        if running and reason is not EndReason.TARGET_LOST:
            running = not self._interrupt()
            if running and not self._gone():
                raise TargetError(
                    f"the target did not stop within {STOP_PATIENCE:.0f} s of gdb's interrupt "
                    f"(the run ended: {reason.value}); the {self.sink.count} snapshots "
                    f"recorded so far are intact in {o.output}, without an end trailer. "
                    "Check that the stub still answers, then record again")
            quiet_interrupt = (reason is EndReason.INTERRUPTED
                               and idle >= o.interrupt_hang_after)
            if not running and (reason is EndReason.HANG or quiet_interrupt):
                self._hang_snapshot()
        return reason, crash_signal

    def _hang_snapshot(self) -> None:
        assert self.gdb is not None
        before = self.sink.hang_seq
        self.gdb.python(f"import xreplay_agent; xreplay_agent.snapshot_now({self._hang_pid})")
        deadline = time.monotonic() + 10
        while self.sink.hang_seq == before and time.monotonic() < deadline:
            time.sleep(0.01)

    def _why_stopped(self, payload: dict[str, Any]) -> tuple[EndReason | None, str | None]:
        why = payload.get("reason", "")
        if why.startswith("exited"):
            return EndReason.TARGET_EXITED, None
        if why == "signal-received":
            sig = payload.get("signal-name", "")
            if sig == "SIGKILL":
                return EndReason.TARGET_EXITED, None
            if sig in _CRASH_SIGNALS:
                return EndReason.TARGET_CRASHED, sig
            if sig in ("SIGINT", "SIGTRAP", "0"):
                if self._stop_reason is None:
                    frame = payload.get("frame") or {}
                    self._stopped_at = (f"{sig} at {frame.get('addr', '?')}"
                                        + (f" in {frame['func']}" if frame.get("func") else "")
                                        + (f", thread {payload['thread-id']}"
                                           if payload.get("thread-id") else ""))
                return self._stop_reason or EndReason(self.o.spontaneous_stop), None
            return None, None
        if why in ("breakpoint-hit", "") and self.o.count:
            return EndReason.COUNT, None  # only the agent's count-limit stop is visible
        return self._stop_reason or EndReason.STOPPED, None

    def _gone(self) -> bool:
        g = self.gdb
        assert g is not None
        if self.launched is not None and not self.launched.alive():
            return True
        for r in g.pending:
            if r.get("message") == "thread-group-exited":
                return True
        return any("Remote connection closed" in c or "Remote communication error" in c
                   for c in g.console[-5:])

    def _interrupt(self) -> bool:
        """Stop the running target; True once it is stopped.  A whole machine under QEMU
        TCG on a loaded host has taken over 10 s to report the stop, so it is waited for up
        to :data:`STOP_PATIENCE` seconds."""
        g = self.gdb
        assert g is not None
        deadline = time.monotonic() + STOP_PATIENCE
        first = True
        while True:
            # Sent again while no stop comes: an interrupt that reaches the stub while gdb
            # is inside a breakpoint stop it then resumes from (the agent's per-hit stop) is
            # taken by that stop and lost, and the target runs on (seen on QEMU's stub).
            try:
                g.mi("-exec-interrupt", timeout=5)
                if first and self.on_interrupt is not None:
                    self.on_interrupt()
            except XReplayError:
                if first:
                    return False
            first = False
            left = deadline - time.monotonic()
            if g.wait_stopped(min(INTERRUPT_AGAIN, max(left, 0.0))) is not None:
                return True
            if left <= INTERRUPT_AGAIN:
                return False

    def _finish_agent(self, reason: EndReason) -> dict[str, Any]:
        g, ch = self.gdb, self.channel
        assert g is not None and ch is not None
        try:
            g.python("import xreplay_agent; xreplay_agent.finish()",
                     timeout=5 if reason is EndReason.TARGET_LOST else 10)
        except XReplayError:
            if reason is not EndReason.TARGET_LOST:
                raise
        fin = ch.wait_json("finish", 5) or {}
        return {k: fin[k] for k in ("duplicates", "foreign", "filter_errors", "unstable_reads")
                if fin.get(k)}

    def _detach_or_kill(self, reason: EndReason, _running: bool) -> None:
        g = self.gdb
        assert g is not None
        if reason in (EndReason.TARGET_EXITED, EndReason.TARGET_LOST,
                      EndReason.TARGET_CRASHED):
            return
        try:
            if self.kill:
                g.console_command("kill", timeout=10)
            else:
                g.mi("-target-detach", timeout=10)
        except XReplayError:
            pass

    def _teardown(self, started: bool) -> None:
        if self.gdb is not None:
            if not started:
                # Set-up failed: close the connection without detaching, so a guest that
                # waited for the debugger (QEMU -S, gdbsx) stays stopped where it was.
                with contextlib.suppress(XReplayError):
                    self.gdb.console_command("disconnect", timeout=5)
            self.gdb.exit()
        self.sink.abandon()  # still open only when the run broke off with an exception
        # A launched target is stopped by its PID unless the user asked to detach from it
        # and leave it running; so is one whose recording never started.
        if self.launched is not None and (self.kill or not started):
            self.launched.stop()


def _short(msg: str, limit: int = 200) -> str:
    """gdb's message without a hex dump of a register file (QEMU's can be 1.4 KB)."""
    msg = re.sub(r"[0-9a-fA-F]{64,}", "<hex>", msg)
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _mi_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
