"""Record the lab's Linux guests, and check a recording's view against Xen's own 'e' key.

Why: a recorder that reads the wrong copy of vcpu_info, or the right bytes at the wrong
moment, still produces plausible [p/m/s] tables. The only independent witness is the
hypervisor, so :func:`cross_check` freezes the domU (``xl pause``), has Xen print what it
holds for every port (``xl debug-keys e``), reads the same domain's shared_info and live
vcpu_info by machine address through QEMU's gdbstub, and compares port by port: p and m
for every port, s from the notify vCPU's selector word (the binding comes from
``lsevtchn``). A second 'e' dump after the read shows that nothing moved in between, and
Xen's 'q' key (``upcall_pend``/``upcall_mask``) checks the vcpu_info copy we chose.

Machine addresses, not virtual ones: with the domU paused the stub can only stop in Xen
or dom0, whose page tables map *dom0's* kernel at the very addresses the domU uses, so a
virtual read would silently return dom0's data. The addresses come from one stop inside
the domU beforehand (:func:`~xreplay.profiles.linux.inspect_guest`: ``start_info`` gives
shared_info's MA, a page-table walk gives the per-cpu vcpu_info's MA).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xreplay.abi import fifo as fifo_abi
from xreplay.debugkeys import DomainEvtchnDump, PortDiff, compare, latest, parse
from xreplay.errors import XReplayError
from xreplay.lab.xen.lab import Lab
from xreplay.lab.xen.stage import Progress, quiet
from xreplay.profiles.linux import GuestFacts, LinuxSymbols, apply, inspect_guest
from xreplay.profiles.peek import StubPeek
from xreplay.record import Recorder, RecordOptions, RecordResult
from xreplay.snapshot import FifoState, PortState, Snapshot, SnapshotDecoder, VcpuState
from xreplay.xrr import ProbeSpec, RecordingHeader, XrrWriter

#: VIRQ numbers (xen/include/public/xen.h) as labels.
VIRQ_NAMES = {0: "VIRQ_TIMER", 1: "VIRQ_DEBUG", 2: "VIRQ_CONSOLE", 3: "VIRQ_DOM_EXC",
              4: "VIRQ_TBUF", 6: "VIRQ_DEBUGGER", 7: "VIRQ_XENOPROF", 8: "VIRQ_CON_RING",
              9: "VIRQ_PCPU_STATE", 10: "VIRQ_MEM_EVENT", 11: "VIRQ_ARGO",
              12: "VIRQ_ENOMEM", 13: "VIRQ_XENPMU"}
VIRQ_TIMER = 0
#: Linux's VIRQ_TIMER handler: it runs after the guest cleared the port's pending bit, so
#: each timer event shows Xen's set and the guest's clear.
LAB_EXTRA_PROBES = ("xen_timer_interrupt",)
VIRQ_DEBUG = 1
ARCH = "x86_64"

_LSEVTCHN = re.compile(r"^\s*(\d+): VCPU (\d+): (.+?)\s*$")
_VIRQ = re.compile(r"Virtual IRQ (\d+)")
_INTERDOMAIN = re.compile(r"Interdomain \((\w+)\) - Remote Domain (\d+), Port (\d+)")
_Q_VCPUS = re.compile(r"VCPU information and callbacks for domain (\d+):")
_Q_VCPU = re.compile(r"VCPU(\d+): CPU\d+ .*?upcall_pend=([0-9a-f]{2}) upcall_mask=([0-9a-f]{2})")



# ----------------------------------------------------------------------------- lsevtchn


@dataclass(frozen=True)
class Binding:
    """One line of ``lsevtchn DOMID``: the port, its notify vCPU and what it is bound to."""

    port: int
    vcpu: int
    what: str  # e.g. "Virtual IRQ 0", "IPI", "Interdomain (Connected) - Remote Domain 0, ..."

    @property
    def virq(self) -> int | None:
        m = _VIRQ.search(self.what)
        return int(m.group(1)) if m else None

    @property
    def label(self) -> str:
        """A short name for recordings: ``VIRQ_TIMER``, ``IPI``, ``dom0:18``..."""
        if self.virq is not None:
            return VIRQ_NAMES.get(self.virq, f"VIRQ {self.virq}")
        m = _INTERDOMAIN.search(self.what)
        if m:
            return f"dom{m.group(2)}:{m.group(3)}"
        return self.what.split(" (")[0]


def parse_lsevtchn(text: str) -> dict[int, Binding]:
    """``port -> Binding`` from ``lsevtchn`` output (unparsable lines are ignored)."""
    out: dict[int, Binding] = {}
    for line in text.splitlines():
        m = _LSEVTCHN.match(line)
        if m:
            out[int(m.group(1))] = Binding(int(m.group(1)), int(m.group(2)), m.group(3))
    return out


def parse_q_vcpus(text: str, domid: int) -> dict[int, tuple[int, int]]:
    """``vcpu -> (upcall_pend, upcall_mask)`` from the last 'q' dump of ``domid``."""
    out: dict[int, tuple[int, int]] = {}
    inside = False
    for line in text.splitlines():
        m = _Q_VCPUS.search(line)
        if m:
            inside = int(m.group(1)) == domid
            if inside:
                out = {}
            continue
        if "General information for domain" in line or "'q' pressed" in line:
            inside = False
        elif inside:
            v = _Q_VCPU.search(line)
            if v:
                out[int(v.group(1))] = (int(v.group(2), 16), int(v.group(3), 16))
    return out


def port_labels(bindings: dict[int, Binding], facts: GuestFacts | None = None) -> dict[int, str]:
    """Labels for a recording: lsevtchn's kinds, then the guest's xenstore/console ports."""
    labels = {p: b.label for p, b in bindings.items()}
    if facts is not None:
        labels.update(facts.labels())
    return labels


# ----------------------------------------------------------------------------- recording


def lab_vcpus(lab: Lab, domain: str = "domu") -> list[int]:
    """The vCPU ids of one of the lab's guests: the domU's ``domu_vcpus``, dom0's one
    (``dom0_max_vcpus=1``). The default for recording and cross-checking: all of them."""
    return lab.vcpus if domain == "domu" else [0]


def lab_stub(lab: Lab, stub: str | None = None) -> str:
    """The stub to record through: ``stub``, else the one the lab was booted for."""
    booted = lab.state.stub if lab.state else "qemu"
    stub = stub or booted
    if stub == "gdbsx" and booted != "gdbsx":
        raise XReplayError("this lab has no gdbsx: boot it with `xreplay lab up --stub gdbsx`")
    return stub


def lab_record_options(lab: Lab, output: Path, *, domain: str = "domu",
                       vcpus: Iterable[int] | None = None, block: bool = True,
                       extra: Iterable[str] = LAB_EXTRA_PROBES,
                       count: int | None = None, duration: float | None = None,
                       hang_after: float | None = None, stub: str | None = None,
                       ) -> tuple[RecordOptions, GuestFacts]:
    """RecordOptions for one of the lab's Linux guests, checked live (2-level or FIFO: the
    guest's ``evtchn_ops`` picks the regions and the bottom half).

    Reads the port bindings from dom0 first (the machine must run for that), then stops
    once in the guest (:func:`inspect_guest`). ``vcpus`` defaults to all of the guest's
    (:func:`lab_vcpus`): each gets its live vcpu_info region, and lsevtchn's notify vCPUs
    route every port to one of them in the replay. ``stub`` (default: the lab's) ``gdbsx``
    records the domU through gdbsx in dom0, one gdbsx for the check and one for the run.
    """
    domid = lab.domid if domain == "domu" else 0
    if domid is None:
        raise XReplayError("the lab has no domU (booted with domu='none')")
    vcpus = sorted(set(lab_vcpus(lab, domain) if vcpus is None else vcpus))
    syms = LinuxSymbols.load(lab.symbol_map)
    bindings = parse_lsevtchn(lab.dom0(f"lsevtchn {domid}", timeout=30))
    if lab_stub(lab, stub) == "gdbsx":
        return _gdbsx_record_options(lab, output, domain, vcpus, syms, bindings, block=block,
                                     extra=extra, count=count, duration=duration,
                                     hang_after=hang_after)
    facts = inspect_guest(lab.gdb_address, syms, domain, vcpus, require_2level=False)
    options = RecordOptions(
        output=Path(output), target=lab.gdb_address, count=count, duration=duration,
        hang_after=hang_after, target_kind="qemu")
    apply(options, syms, vcpus, domain, block=block, extra=extra, facts=facts)
    options.labels = port_labels(bindings, facts)
    options.notify = {p: b.vcpu for p, b in bindings.items()}  # replay routes each port
    options.description = (f"xreplay Xen 4.17 lab, {domain} (domid {domid}, {facts.domain_type}"
                           f" Linux {lab.state.kver if lab.state else ''}, vCPUs "
                           f"{', '.join(map(str, vcpus))}) via QEMU's gdbstub")
    return options, facts


def _gdbsx_record_options(lab: Lab, output: Path, domain: str, vcpus: list[int],
                          syms: LinuxSymbols, bindings: dict[int, Binding], *, block: bool,
                          extra: Iterable[str], count: int | None, duration: float | None,
                          hang_after: float | None) -> tuple[RecordOptions, GuestFacts]:
    """The gdbsx variant: per-domain stub, guest virtual addresses, vCPU = thread id."""
    from xreplay.gdb.gdbsx import adapt_options
    from xreplay.lab.xen.gdbsx import install_own_gdbsx, start_gdbsx

    if domain != "domu":
        raise XReplayError("gdbsx attaches to the domU only; record dom0 through QEMU's "
                           "stub (--stub qemu)")
    facts = inspect_guest(start_gdbsx(lab), syms, None, vcpus, machine_addresses=False,
                          require_2level=False)
    own = install_own_gdbsx(lab)
    target = start_gdbsx(lab)  # the check's gdbsx exited when its gdb detached
    options = RecordOptions(output=Path(output), target=target, count=count,
                            duration=duration, hang_after=hang_after)
    apply(options, syms, vcpus, None, block=block, extra=extra, facts=facts)
    adapt_options(options, own_build=own)
    options.labels = port_labels(bindings, facts)
    options.notify = {p: b.vcpu for p, b in bindings.items()}
    kind = "PVH" if facts.domain_type == "hvm" else (facts.domain_type or "?").upper()
    which = "the project's" if own else "Debian's"
    options.description = (f"xreplay Xen 4.17 lab, domu (domid {lab.domid}, {kind} Linux "
                           f"{lab.state.kver if lab.state else ''}, vCPUs "
                           f"{', '.join(map(str, vcpus))}) via {which} gdbsx in dom0")
    return options, facts


def record_lab(lab: Lab, output: Path, *, domain: str = "domu",
               vcpus: Iterable[int] | None = None, block: bool = True,
               extra: Iterable[str] = LAB_EXTRA_PROBES,
               count: int | None = 300, duration: float | None = None,
               stub: str | None = None,
               ) -> tuple[RecordResult, GuestFacts]:
    """Record one of the lab's guests until ``count`` snapshots or ``duration`` seconds.

    Each snapshot's vCPU is the guest's own (Linux's per-cpu ``xen_vcpu_id``, read through
    ``$gs_base`` by the profile's ``vcpu_expr``), not QEMU's physical CPU; ``vcpus``
    defaults to all of the guest's.
    """
    options, facts = lab_record_options(lab, output, domain=domain, vcpus=vcpus, block=block,
                                        extra=extra, count=count, duration=duration,
                                        stub=stub)
    return Recorder(options).run(), facts


# ----------------------------------------------------------------------------- cross-check


@dataclass
class CrossCheck:
    """Xen's 'e' dump of the paused domU next to our reading of the same memory."""

    domid: int
    dump: DomainEvtchnDump  # Xen's view just before our read
    dump_after: DomainEvtchnDump  # ... and just after it
    snapshot: Snapshot  # ours, from machine memory, live vcpu_info
    ports: list[PortState]  # ours, for every port Xen lists and every pending one
    diffs: list[PortDiff]
    stable: bool  # the two dumps agree: the domain did not move during the read
    attempts: int
    xen_vcpus: dict[int, tuple[int, int]] = field(default_factory=dict)  # 'q' pend, mask
    vcpu_problems: list[str] = field(default_factory=list)
    binding_problems: list[str] = field(default_factory=list)
    stale_vcpu_info: dict[int, VcpuState] = field(default_factory=dict)
    facts: GuestFacts | None = None
    seconds: float = 0.0

    @property
    def agrees(self) -> bool:
        return (self.stable and not self.diffs and not self.vcpu_problems
                and not self.binding_problems)

    def report(self) -> str:
        """A human summary: both tables side by side and every disagreement."""
        lines = [f"domain {self.domid}: {len(self.ports)} ports compared, "
                 f"{'AGREE' if self.agrees else 'DISAGREE'} (attempt {self.attempts}, "
                 f"{'stable' if self.stable else 'moved during the read'})"]
        ours = {p.port: p for p in self.ports}
        for x in self.dump.ports:
            o = ours.get(x.port)
            lines.append(f"  port {x.port:4d}  xen {x.pms}  ours {o.pms if o else '-':7}"
                         f"  {o.label or '' if o else ''}")
        for v, st in self.snapshot.vcpus.items():
            q = self.xen_vcpus.get(v)
            lines.append(f"  vcpu {v}: ours upcall_pending={st.evtchn_upcall_pending} "
                         f"upcall_mask={st.evtchn_upcall_mask} pending_sel="
                         f"{st.evtchn_pending_sel:#x}"
                         + (f"; xen 'q' upcall_pend={q[0]} upcall_mask={q[1]}" if q else ""))
            stale = self.stale_vcpu_info.get(v)
            if stale is not None:
                lines.append(f"          shared_info->vcpu_info[{v}] (stale copy): "
                             f"upcall_pending={stale.evtchn_upcall_pending} "
                             f"pending_sel={stale.evtchn_pending_sel:#x}")
        if self.snapshot.fifo is not None:
            for v, cb in sorted(self.snapshot.fifo.control_blocks.items()):
                heads = " ".join(f"head[{q}]={h}" for q, h in enumerate(cb.head) if h)
                lines.append(f"  vcpu {v}: ours control_block ready={cb.ready:#x} "
                             f"{heads or 'heads=0'}")
        lines += [f"  DIFF {d.describe()}" for d in self.diffs]
        lines += [f"  DIFF {p}" for p in self.vcpu_problems + self.binding_problems]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "domid": self.domid, "agrees": self.agrees, "stable": self.stable,
            "attempts": self.attempts, "seconds": round(self.seconds, 2),
            "dump": self.dump.to_json(), "ports": [p.to_json() for p in self.ports],
            "diffs": [d.to_json() for d in self.diffs],
            "vcpus": {v: s.to_json() for v, s in self.snapshot.vcpus.items()},
            "xen_vcpus": {v: {"upcall_pend": p, "upcall_mask": m}
                          for v, (p, m) in self.xen_vcpus.items()},
            "vcpu_problems": self.vcpu_problems, "binding_problems": self.binding_problems,
            "facts": self.facts.to_json() if self.facts else None,
        }


def _e_dump(lab: Lab, domid: int) -> DomainEvtchnDump:
    text = lab.dom0("xl debug-keys e && xl dmesg", timeout=60)
    dumps = latest(parse(text, "xl dmesg"))
    if domid not in dumps:
        raise XReplayError(f"Xen's 'e' dump has no section for domain {domid}")
    return dumps[domid]


def _settle(lab: Lab, domid: int, timer_ports: set[int], seconds: float) -> DomainEvtchnDump:
    """The 'e' dump once the paused domain's timer ports are pending, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        dump = _e_dump(lab, domid)
        waiting = [p for p in dump.ports if p.port in timer_ports and not p.pending]
        if not waiting or time.monotonic() >= deadline:
            return dump
        time.sleep(0.2)


def _moved(a: DomainEvtchnDump, b: DomainEvtchnDump | None, *, ignore: set[int] | None = None,
           pending_only: bool = False) -> list[str]:
    """Ports whose state differs between two dumps of one domain (``port [..]->[..]``).

    ``pending_only`` compares p and m but not s: raising one port flips the s column of
    every port sharing its selector word.
    """
    if b is None:
        return ["no 'e' section for the domain"]
    ignore = ignore or set()
    theirs = {p.port: p for p in b.ports}
    out = []
    for p in a.ports:
        q = theirs.get(p.port)
        if p.port in ignore:
            continue
        if q is None:
            out.append(f"{p.port} gone")
        elif (pending_only and (p.pending, p.masked) != (q.pending, q.masked)) or (
                not pending_only and (p.pms, p.notify_vcpu) != (q.pms, q.notify_vcpu)):
            out.append(f"{p.port} {p.pms}->{q.pms}")
    out += [f"{port} new" for port in sorted(theirs.keys() - {p.port for p in a.ports})]
    return out


def cross_check(lab: Lab, *, vcpus: Iterable[int] | None = None,
                facts: GuestFacts | None = None,
                attempts: int = 3, settle: float = 3.0, output: Path | None = None,
                progress: Progress = quiet, stub: str | None = None) -> CrossCheck:
    """Pause the lab's domU, compare Xen's 'e' dump with its memory, unpause it.

    ``vcpus`` defaults to all of the domU's; ``facts`` (machine addresses) are taken with
    :func:`inspect_guest` when not given.
    A paused vCPU's one-shot timer still fires once, so the first dump waits up to
    ``settle`` seconds for every VIRQ_TIMER port to be pending (after that nothing in the
    lab raises events for the paused domU); the dumps around the read confirm it.
    ``output`` also writes the paused state as a one-snapshot ``.xrr`` with Xen's dump in
    a note. The domU is unpaused whatever happens.

    ``stub`` (default: the lab's) ``gdbsx`` reads the paused domU through a gdbsx started
    for the read, by guest virtual address: gdbsx reads only its own domain, so the
    dom0-aliasing that forces machine addresses on QEMU's stub does not arise (and PVH
    memory, which QEMU's stub cannot read, is readable).
    """
    t0 = time.monotonic()
    domid = lab.domid
    if domid is None:
        raise XReplayError("the lab has no domU (booted with domu='none')")
    cpus = sorted(set(lab_vcpus(lab) if vcpus is None else vcpus))
    syms = LinuxSymbols.load(lab.symbol_map)
    via_gdbsx = lab_stub(lab, stub) == "gdbsx"
    if via_gdbsx:
        from xreplay.lab.xen.gdbsx import start_gdbsx
    if facts is None:
        facts = (inspect_guest(start_gdbsx(lab), syms, None, cpus, machine_addresses=False,
                               require_2level=False)
                 if via_gdbsx else inspect_guest(lab.gdb_address, syms, "domu", cpus,
                                                 require_2level=False))
    if via_gdbsx:
        if any(c not in facts.vcpu_info_va for c in cpus):
            raise XReplayError("no virtual addresses for the domU's vcpu_info: "
                               "inspect_guest(..., vcpus) must list every vCPU")
    elif facts.shared_info_ma is None or any(c not in facts.vcpu_info_ma for c in cpus):
        raise XReplayError("no machine addresses for the domU's shared_info / vcpu_info: "
                           "inspect_guest(..., machine_addresses=True) is needed")
    fifo = facts.abi == "fifo"
    fifo_pages, fifo_blocks = ((facts.event_page_va, facts.control_block_va) if via_gdbsx
                               else (facts.event_page_ma, facts.control_block_ma))
    if fifo and (not fifo_pages or any(c not in fifo_blocks for c in cpus)):
        raise XReplayError("the domU uses FIFO event channels but its event-array pages or "
                           "control blocks were not located (inspect_guest on a kernel with "
                           "events_fifo.c; machine_addresses=True for QEMU's stub)")
    bindings = parse_lsevtchn(lab.dom0(f"lsevtchn {domid}", timeout=30))
    debug_ports = {p for p, b in bindings.items() if b.virq == VIRQ_DEBUG}
    timer_ports = {p for p, b in bindings.items() if b.virq == VIRQ_TIMER}
    decoder = SnapshotDecoder(ARCH)
    if via_gdbsx:
        # a PV vCPU paused in user mode runs on its user page table, where gdbsx (which
        # walks vCPU 0's current one) finds no kernel mapping: pause again
        attempts = max(attempts, 6)
    for attempt in range(1, attempts + 1):
        lab.dom0(f"xl pause {domid}", timeout=30)
        progress(f"domain {domid} paused")
        unreadable: XReplayError | None = None
        try:
            before = _settle(lab, domid, timer_ports, settle)
            if via_gdbsx:
                try:
                    with StubPeek(start_gdbsx(lab)) as peek:
                        shared, live, fifo_raw = _read_state(
                            peek, decoder, cpus, facts.shared_info_va, facts.vcpu_info_va,
                            (facts.event_page_va, facts.control_block_va) if fifo else None)
                except XReplayError as exc:
                    if attempt == attempts:
                        raise
                    unreadable = exc
            else:
                with StubPeek(lab.gdb_address) as peek, peek.physical():
                    shared, live, fifo_raw = _read_state(
                        peek, decoder, cpus, facts.shared_info_ma, facts.vcpu_info_ma,
                        (facts.event_page_ma, facts.control_block_ma) if fifo else None)
            if unreadable is None:
                after = _e_dump(lab, domid)
                # 'q' prints upcall_pend/upcall_mask, then raises VIRQ_DEBUG in every guest;
                # the 'e' dump after it must differ from `after` in the VIRQ_DEBUG port only.
                q_text = lab.dom0("xl debug-keys q && xl debug-keys e && xl dmesg",
                                  timeout=60)
        finally:
            lab.dom0(f"xl unpause {domid}", timeout=30)
            progress(f"domain {domid} unpaused")
        if unreadable is not None:
            progress(f"domain {domid} not readable through gdbsx while paused ({unreadable}):"
                     " paused in user mode? trying again")
            time.sleep(0.5)
            continue
        post_q = latest(parse(q_text, "xl dmesg")).get(domid)
        moved = _moved(before, after)
        moved_q = _moved(after, post_q, ignore=debug_ports, pending_only=True)
        if not (moved or moved_q) or attempt == attempts:
            break
        progress(f"domain {domid} moved while paused ({', '.join(moved + moved_q)}): "
                 "trying again")
    check = _compare(domid, before, after, shared, live, decoder, bindings, facts, fifo_raw)
    check.attempts = attempt
    check.xen_vcpus = parse_q_vcpus(q_text, domid)
    if moved_q:
        check.vcpu_problems.append(f"domain moved before Xen's 'q' dump: {', '.join(moved_q)}")
    for v, st in check.snapshot.vcpus.items():
        q = check.xen_vcpus.get(v)
        if q is None:
            check.vcpu_problems.append(f"vcpu {v}: Xen's 'q' dump does not list it")
        elif (st.evtchn_upcall_pending, st.evtchn_upcall_mask) != q:
            check.vcpu_problems.append(
                f"vcpu {v}: upcall_pending/mask xen={q[0]}/{q[1]} "
                f"ours={st.evtchn_upcall_pending}/{st.evtchn_upcall_mask}")
    check.seconds = time.monotonic() - t0
    if output is not None:
        _write_paused(Path(output), check, shared, live, lab, fifo_raw)
    return check


#: a FIFO domU's raw regions: event-array pages by index, control blocks by vCPU
FifoRaw = tuple[dict[int, bytes], dict[int, bytes]]


def _read_state(peek: StubPeek, decoder: SnapshotDecoder, cpus: list[int], shared_at: int,
                vcpu_info_at: dict[int, int],
                fifo_at: tuple[list[int], dict[int, int]] | None,
                ) -> tuple[bytes, dict[int, bytes], FifoRaw | None]:
    """The paused domU's shared_info, each vCPU's vcpu_info and, for a FIFO domU
    (``fifo_at``: event-array page and control-block addresses), its FIFO regions, at the
    addresses given (virtual through gdbsx, machine through QEMU's stub)."""
    shared = peek.read(shared_at, decoder.shared_info_size)
    live = {c: peek.read(vcpu_info_at[c], decoder.vcpu_info_size) for c in cpus}
    if fifo_at is None:
        return shared, live, None
    pages, blocks = fifo_at
    return shared, live, ({i: peek.read(a, fifo_abi.PAGE_SIZE) for i, a in enumerate(pages)},
                          {c: peek.read(blocks[c], fifo_abi.CONTROL_BLOCK_SIZE) for c in cpus})


def _compare(domid: int, before: DomainEvtchnDump, after: DomainEvtchnDump, shared: bytes,
             live: dict[int, bytes], decoder: SnapshotDecoder, bindings: dict[int, Binding],
             facts: GuestFacts, fifo_raw: FifoRaw | None = None,
             ) -> CrossCheck:
    fifo = None if fifo_raw is None else FifoState.from_regions(*fifo_raw)
    pending, mask = decoder.bitmaps(shared) if fifo is None else fifo.bitmaps()
    vcpus = {c: decoder.vcpu_state(c, raw, "registered") for c, raw in live.items()}
    stale = {}
    for c in live:
        raw = decoder.embedded_vcpu_info(shared, c)
        if raw is not None:
            stale[c] = decoder.vcpu_state(c, raw, "shared_info")
    notify = {p: b.vcpu for p, b in bindings.items()}
    snap = Snapshot(arch=ARCH, index=0, t_ns=0, probe="paused", vcpu=0, pc=0, flags=None,
                    evtchn_pending=pending, evtchn_mask=mask, vcpus=vcpus,
                    labels=port_labels(bindings, facts), notify=notify, fifo=fifo)
    listed = {p.port for p in before.ports}
    ports = sorted(listed | {p for p in range(1, snap.nr_ports) if snap.is_pending(p)})
    ours = [snap.port_state(p) for p in ports]
    binding_problems = []
    for x in before.ports:
        b = bindings.get(x.port)
        if b is None:
            binding_problems.append(f"port {x.port}: in Xen's dump, not in lsevtchn")
        elif b.vcpu != x.notify_vcpu:
            binding_problems.append(f"port {x.port}: notify vCPU n={x.notify_vcpu} in the dump,"
                                    f" VCPU {b.vcpu} in lsevtchn")
    return CrossCheck(domid=domid, dump=before, dump_after=after, snapshot=snap, ports=ours,
                      diffs=compare(before, ours), stable=not _moved(before, after),
                      attempts=1, binding_problems=binding_problems, stale_vcpu_info=stale,
                      facts=facts)


def _write_paused(path: Path, check: CrossCheck, shared: bytes, live: dict[int, bytes],
                  lab: Lab, fifo_raw: FifoRaw | None = None,
                  ) -> None:
    """The paused state as a one-snapshot recording (``xreplay show`` renders it)."""
    facts = check.facts
    assert facts is not None
    if facts.shared_info_ma is not None and all(c in facts.vcpu_info_ma for c in live):
        how, si = "machine address", facts.shared_info_ma
        vi = facts.vcpu_info_ma
        pages, cbs = facts.event_page_ma, facts.control_block_ma
    else:  # read through gdbsx, by guest virtual address
        how, si, vi = "gdbsx, virtual address", facts.shared_info_va, facts.vcpu_info_va
        pages, cbs = facts.event_page_va, facts.control_block_va
    header = RecordingHeader.for_arch(
        ARCH, [ProbeSpec("paused", f"xl pause {check.domid} (read by {how})")],
        vcpus=sorted(live), shared_info_expr=f"{how} {si:#x}",
        vcpu_info_exprs={c: f"{how} {vi[c]:#x}" for c in live},
        fifo_pages=len(fifo_raw[0]) if fifo_raw else 0,
        fifo_exprs={**{f"control_block.{c}": f"{how} {a:#x}" for c, a in cbs.items()},
                    **{f"event_array.{i}": f"{how} {a:#x}" for i, a in enumerate(pages)}},
        labels=check.snapshot.labels, notify=check.snapshot.notify,
        target={"kind": "xen-lab", "address": lab.gdb_address,
                "description": f"xreplay Xen 4.17 lab, domU {check.domid} paused"})
    with XrrWriter(path, header) as w:
        fifo_regions: list[bytes] = []
        if fifo_raw:
            pages, blocks = fifo_raw
            fifo_regions = [*(blocks[c] for c in sorted(live)),
                            *(pages[i] for i in sorted(pages))]
        w.append(probe=0, vcpu=0, pc=0,
                 regions=[shared, *(live[c] for c in sorted(live)), *fifo_regions])
        w.note("xen-e-dump", domid=check.domid, text=check.dump.render(),
               agrees=check.agrees, diffs=[d.describe() for d in check.diffs])
