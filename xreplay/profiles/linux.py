"""Record a Linux Xen guest from its symbol map alone (no debug info, no vmlinux).

Why: distribution kernels ship without debug info, but their ``System.map`` (or the
guest's ``/proc/kallsyms``) names every address xreplay needs. From it this module builds
the :class:`~xreplay.record.RecordOptions` fields for a Linux guest on the 2-level ABI
(``drivers/xen/events/events_2l.c``):

* probes at the upcall worker (``__xen_evtchn_do_upcall`` before Linux 6.6, else
  ``xen_evtchn_do_upcall``; ``xen_hvm_evtchn_do_upcall`` as the last resort), the bottom
  half ``evtchn_2l_handle_events`` and, if present, the PV idle ``xen_safe_halt``, as
  ``*0xADDR`` locations;
* ``shared_info`` through the pointer variable ``HYPERVISOR_shared_info``;
* each vCPU's *live* vcpu_info through the per-cpu pointer ``xen_vcpu``
  (``per_cpu(xen_vcpu, cpu)``): Linux registers its own copy with
  ``VCPUOP_register_vcpu_info`` during boot, after which Xen updates only that copy and
  ``shared_info->vcpu_info[cpu]`` goes stale, so the pointer is re-read at every hit;
* with a whole-machine stub (QEMU), a ``filter`` that keeps only hits in dom0 or in a
  domU, told apart by ``xen_start_flags & SIF_INITDOMAIN``.

A map cannot say which event-channel ABI the running guest chose: Linux uses FIFO unless
booted with ``xen.fifo_events=0``, and then the 2-level bitmaps are never touched.
:func:`inspect_guest` stops once in the guest and reads ``evtchn_ops`` to tell.  A FIFO
guest (``drivers/xen/events/events_fifo.c``) is recorded through the same map: the bottom
half is ``evtchn_fifo_handle_events``, each vCPU's control block is the page the per-cpu
pointer ``cpu_control_block`` names, and the event array is the ``event_array[]`` page
pointers, of which only the first ``event_array_pages`` (read at every hit) are read.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xreplay.abi.fifo import MAX_EVENT_ARRAY_PAGES
from xreplay.errors import XReplayError
from xreplay.xrr import ProbeSpec

#: The upcall worker, best first. Before the "simplify evtchn_do_upcall() call maze" patch
#: (Linux 6.6, backported to stable) ``__xen_evtchn_do_upcall`` did the work for both the
#: PV entry ``xen_evtchn_do_upcall`` and HVM's ``xen_hvm_evtchn_do_upcall``; afterwards
#: ``xen_evtchn_do_upcall`` is the worker every entry calls.
UPCALL_SYMBOLS = ("__xen_evtchn_do_upcall", "xen_evtchn_do_upcall", "xen_hvm_evtchn_do_upcall")
BOTTOM_HALF_SYMBOL = "evtchn_2l_handle_events"
FIFO_BOTTOM_HALF_SYMBOL = "evtchn_fifo_handle_events"
#: events_fifo.c's statics: the page pointers, how many are in use, the per-cpu block
FIFO_SYMBOLS = ("event_array", "event_array_pages", "cpu_control_block",
                FIFO_BOTTOM_HALF_SYMBOL)
#: PV Linux idles through xen_safe_halt -> SCHEDOP_block: the "about to block" point.
BLOCK_SYMBOL = "xen_safe_halt"
#: PVH/HVM Linux keeps the native irq pv-ops, so it idles through default_idle ->
#: pv_ops.irq.safe_halt = native_safe_halt (``sti; hlt``; Xen blocks the vCPU on the HLT
#: exit). Best first: native_safe_halt is the instruction itself, default_idle its caller.
HVM_BLOCK_SYMBOLS = ("native_safe_halt", "default_idle")
#: HYPERVISOR_CALLBACK_VECTOR (arch/x86/include/asm/irq_vectors.h): the vector Xen raises
#: in a PVH/HVM Linux guest, whose handler is sysvec_xen_hvm_callback.
HVM_CALLBACK_VECTOR = 0xF3
SIF_INITDOMAIN = 0x2  # xen/include/public/xen.h, start_info.flags
DOMAINS = ("dom0", "domu")
#: Linux's ``enum xen_domain_type`` (include/xen/xen.h).
DOMAIN_TYPES = {0: "native", 1: "pv", 2: "hvm"}
#: ``struct start_info`` offsets on x86_64 (xen/include/public/xen.h).
START_INFO_SHARED_INFO = 0x28
START_INFO_STORE_EVTCHN = 0x40
START_INFO_CONSOLE_EVTCHN = 0x50
QEMU_GDB_ARCH = "i386:x86-64"

_STUB_HINT = ("Debian's /boot/System.map is a stub (the real one is in the -dbg package); "
              "the guest's /proc/kallsyms, read as root, works too")


# ----------------------------------------------------------------------------- symbols


def read_system_map(path: str | Path) -> dict[str, int]:
    """``name -> address`` from a ``System.map`` or ``/proc/kallsyms`` file.

    The first address wins for duplicate names (static functions of the same name); module
    symbols (a fourth ``[module]`` column in kallsyms) are skipped because modules load
    at different addresses in each guest.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise XReplayError(f"{path}: cannot read the symbol map ({e.strerror})") from None
    syms: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or (len(parts) > 3 and parts[3].startswith("[")):
            continue
        try:
            syms.setdefault(parts[2], int(parts[0], 16))
        except ValueError:
            continue
    return syms


@dataclass(frozen=True)
class LinuxSymbols:
    """The addresses of one Linux kernel build that recording it needs.

    ``xen_vcpu`` is a per-cpu *offset* (added to ``__per_cpu_offset[cpu]``), not an address.
    The optional ones only enable checks (ABI, domain type, start_info) and labels.
    """

    upcall_name: str
    upcall: int
    bottom_half: int
    shared_info_ptr: int  # &HYPERVISOR_shared_info
    per_cpu_offset: int  # &__per_cpu_offset[0]
    xen_vcpu: int
    start_flags: int | None = None  # &xen_start_flags (u32)
    block: int | None = None
    start_info_ptr: int | None = None  # &xen_start_info
    domain_type: int | None = None  # &xen_domain_type (enum, u32)
    evtchn_ops: int | None = None  # &evtchn_ops (a pointer)
    evtchn_ops_2l: int | None = None
    evtchn_ops_fifo: int | None = None
    fifo_bottom_half: int | None = None  # evtchn_fifo_handle_events
    event_array: int | None = None  # &event_array[0] (event_word_t *[MAX_EVENT_ARRAY_PAGES])
    event_array_pages: int | None = None  # &event_array_pages (unsigned int)
    cpu_control_block: int | None = None  # per-cpu offset of the control-block pointer
    source: str = ""
    extra: Mapping[str, int] = field(default_factory=dict, repr=False)  # the whole map

    @classmethod
    def from_map(cls, syms: Mapping[str, int], source: str = "symbol map") -> LinuxSymbols:
        """Pick the addresses out of ``syms``; a missing required one is an XReplayError."""
        if len(syms) < 100:
            raise XReplayError(f"{source}: only {len(syms)} symbols: {_STUB_HINT}")
        upcall_name = next((n for n in UPCALL_SYMBOLS if n in syms), None)
        required = (BOTTOM_HALF_SYMBOL, "HYPERVISOR_shared_info", "__per_cpu_offset",
                    "xen_vcpu")
        missing = [n for n in required if n not in syms]
        if upcall_name is None:
            missing.insert(0, " or ".join(UPCALL_SYMBOLS))
        if missing:
            why = ("not a Xen-enabled Linux kernel, or a FIFO-only build"
                   if BOTTOM_HALF_SYMBOL in missing else "not a Xen-enabled x86 Linux kernel?")
            raise XReplayError(f"{source} lacks {', '.join(missing)} ({why})")
        if syms[upcall_name] <= 0xFFFF_FFFF:
            raise XReplayError(f"{source}: {upcall_name} at {syms[upcall_name]:#x} is a 32-bit "
                               "address; only x86_64 Linux guests are supported")
        return cls(
            upcall_name=upcall_name, upcall=syms[upcall_name],
            bottom_half=syms[BOTTOM_HALF_SYMBOL],
            shared_info_ptr=syms["HYPERVISOR_shared_info"],
            per_cpu_offset=syms["__per_cpu_offset"], xen_vcpu=syms["xen_vcpu"],
            start_flags=syms.get("xen_start_flags"), block=syms.get(BLOCK_SYMBOL),
            start_info_ptr=syms.get("xen_start_info"),
            domain_type=syms.get("xen_domain_type"), evtchn_ops=syms.get("evtchn_ops"),
            evtchn_ops_2l=syms.get("evtchn_ops_2l"),
            evtchn_ops_fifo=syms.get("evtchn_ops_fifo"),
            fifo_bottom_half=syms.get(FIFO_BOTTOM_HALF_SYMBOL),
            event_array=syms.get("event_array"),
            event_array_pages=syms.get("event_array_pages"),
            cpu_control_block=syms.get("cpu_control_block"), source=source, extra=dict(syms))

    @property
    def has_fifo(self) -> bool:
        return None not in (self.fifo_bottom_half, self.event_array, self.event_array_pages,
                            self.cpu_control_block)

    def control_block_expr(self, cpu: int, safe: bool = False) -> str:
        """``per_cpu(cpu_control_block, cpu)``: the vCPU's FIFO control block."""
        assert self.cpu_control_block is not None
        base = self.per_cpu_base_expr(cpu, safe)
        if safe:
            return f"$xr_u64({base} + {self.cpu_control_block:#x})"
        return f"*(unsigned long *)({base} + {self.cpu_control_block:#x})"

    def event_page_expr(self, page: int, safe: bool = False) -> str:
        """``event_array[page]``: one page of event words."""
        assert self.event_array is not None
        return _deref(self.event_array + 8 * page, safe)

    @property
    def hvm_block(self) -> int | None:
        """The PVH/HVM idle point (:data:`HVM_BLOCK_SYMBOLS`), if the map has one."""
        name = self.hvm_block_name
        return self.extra[name] if name else None

    @property
    def hvm_block_name(self) -> str | None:
        return next((n for n in HVM_BLOCK_SYMBOLS if n in self.extra), None)

    @classmethod
    def load(cls, path: str | Path) -> LinuxSymbols:
        return cls.from_map(read_system_map(path), str(path))

    # -- expressions (numeric only: gdb needs no symbols) ---------------------------------

    @property
    def shared_info_expr(self) -> str:
        return f"*(unsigned long *){self.shared_info_ptr:#x}"

    def per_cpu_base_expr(self, cpu: int, safe: bool = False) -> str:
        return _deref(self.per_cpu_offset + 8 * cpu, safe)

    def vcpu_info_expr(self, cpu: int, safe: bool = False) -> str:
        """``per_cpu(xen_vcpu, cpu)``: the address of the vcpu_info Xen updates.

        ``safe`` uses ``$xr_u64`` (:data:`GDB_HELPERS`), which gives 0 instead of an error
        where the guest's memory is not mapped (attaching to a whole-machine stub).
        """
        base = self.per_cpu_base_expr(cpu, safe)
        if safe:
            return f"$xr_u64({base} + {self.xen_vcpu:#x})"
        return f"*(unsigned long *)({base} + {self.xen_vcpu:#x})"

    def domain_filter(self, domain: str, shared_info_ma: int | None = None) -> str:
        """gdb expression true only at hits in ``domain`` (``dom0`` or ``domu``).

        ``shared_info_ma`` pins one domain by its shared_info machine address (from
        ``start_info``), for machines with several domUs.
        """
        if domain not in DOMAINS:
            raise XReplayError(f"unknown domain {domain!r}: use dom0 or domu")
        if self.start_flags is None:
            raise XReplayError(f"{self.source} lacks xen_start_flags: cannot tell dom0 from "
                               "a domU on a whole-machine stub")
        op = "!=" if domain == "dom0" else "=="
        expr = f"(*(unsigned int *){self.start_flags:#x} & {SIF_INITDOMAIN}) {op} 0"
        if shared_info_ma is not None:
            if self.start_info_ptr is None:
                raise XReplayError(f"{self.source} lacks xen_start_info: cannot pin a domain "
                                   "by its shared_info machine address")
            expr += (f" && *(unsigned long *)(*(unsigned long *){self.start_info_ptr:#x} + "
                     f"{START_INFO_SHARED_INFO:#x}) == {shared_info_ma:#x}")
        return expr

    def probes(self, block: bool = True, extra: Mapping[str, int] | None = None,
               hvm: bool = False, abi: str = "2l") -> list[ProbeSpec]:
        """Upcall, bottom half (the ``abi``'s), block (if wanted and present), then
        ``extra`` (name -> address, role ``other``). ``hvm``: a PVH/HVM guest, which blocks
        in :data:`HVM_BLOCK_SYMBOLS` instead of xen_safe_halt."""
        bh = self.bottom_half
        if abi == "fifo":
            assert self.fifo_bottom_half is not None
            bh = self.fifo_bottom_half
        out = [ProbeSpec("upcall", f"*{self.upcall:#x}", "upcall"),
               ProbeSpec("bottom-half", f"*{bh:#x}", "bottom-half")]
        where = self.hvm_block if hvm else self.block
        if block and where is not None:
            out.append(ProbeSpec("block", f"*{where:#x}", "block"))
        out += [ProbeSpec(name, f"*{addr:#x}", "other") for name, addr in (extra or {}).items()]
        return out


#: Event-array pages a FIFO recording declares beyond those in use at the guest check:
#: Linux adds one page per 1024 ports it binds (``evtchn_fifo_setup`` -> ``expand_array``),
#: and only the pages ``event_array_pages`` counts are read at a hit, so a declared page
#: costs nothing until the guest gives it to Xen.
FIFO_SPARE_PAGES = 3


def fifo_declared_pages(in_use: int) -> int:
    """How many event-array pages a recording follows when ``in_use`` are in use now."""
    return min(MAX_EVENT_ARRAY_PAGES, max(in_use, 1) + FIFO_SPARE_PAGES)


def _deref(address: int, safe: bool) -> str:
    return f"$xr_u64({address:#x})" if safe else f"*(unsigned long *){address:#x}"


# ----------------------------------------------------------------------------- profile

#: Sourced into gdb before attaching: defines ``$xr_u64``/``$xr_u32`` (read or 0).
GDB_HELPERS = Path(__file__).with_name("gdb_linux.py")


def _symbols(symbols: str | Path | LinuxSymbols) -> LinuxSymbols:
    return symbols if isinstance(symbols, LinuxSymbols) else LinuxSymbols.load(symbols)


def linux_profile(symbols: str | Path | LinuxSymbols, vcpus: Iterable[int] = (0,),
                  domain: str | None = None, *, block: bool = True,
                  extra: Iterable[str] = (), shared_info_ma: int | None = None,
                  shared_info_va: int | None = None, hvm: bool = False, abi: str = "2l",
                  fifo_pages: int = 1) -> dict[str, Any]:
    """RecordOptions keyword arguments for a Linux guest, from its symbol map.

    ``domain`` (``dom0``/``domu``) is for whole-machine stubs such as QEMU's: hits in other
    domains are resumed at once and counted as foreign. ``None`` records every hit (a
    per-guest stub). ``extra`` names more kernel functions to probe, e.g.
    ``xen_timer_interrupt``: Linux has acked (cleared) VIRQ_TIMER's pending bit when it
    runs, so the guest's side of each timer event shows up between two upcalls.

    The vcpu_info pointers are read with ``$xr_u64`` (gdb commands in
    ``extra_gdb_commands`` define it), so attaching where the guest is not mapped does not
    fail. The recorder resolves shared_info once, at attach: ``shared_info_va`` (read in the
    guest by :func:`inspect_guest`) makes that a plain number, right in any context;
    without it the pointer is dereferenced wherever the machine is stopped, which fails
    if that is not a guest running this kernel (for PV Linux any such domain gives the
    same fixmap address).

    ``abi="fifo"`` records a FIFO guest: the FIFO bottom half, each vCPU's control block
    and the event-array pages, all re-read at every hit like the vcpu_info. Linux's
    ``event_array_pages`` is read at every hit too, and only the pages it counts are read:
    the header declares the ``fifo_pages`` in use at the check plus
    :data:`FIFO_SPARE_PAGES`, so pages the guest adds while it is recorded are read from
    the hit where they appear (a region-moved note says which); pages past those are
    reported as not recorded, never taken for absent ports.
    """
    s = _symbols(symbols)
    if abi not in ("2l", "fifo"):
        raise XReplayError(f"unknown event-channel ABI {abi!r}: use 2l or fifo")
    if abi == "fifo" and not s.has_fifo:
        lacking = ", ".join(n for n in FIFO_SYMBOLS if n not in s.extra)
        raise XReplayError(f"{s.source} lacks {lacking} (not a kernel with events_fifo.c): "
                           "cannot record a FIFO guest")
    if abi == "fifo" and not 1 <= fifo_pages <= MAX_EVENT_ARRAY_PAGES:
        raise XReplayError(f"event_array_pages={fifo_pages}: expected 1-{MAX_EVENT_ARRAY_PAGES}"
                           " (the guest has not set up FIFO yet, or the read was wrong)")
    extra_addrs = {}
    for name in extra:
        if name not in s.extra:
            raise XReplayError(f"{s.source} lacks {name} (asked for as an extra probe)")
        extra_addrs[name] = s.extra[name]
    cpus = sorted(set(vcpus)) or [0]
    if any(c < 0 for c in cpus):
        raise XReplayError(f"bad vCPU list {cpus}")
    where = f" ({domain})" if domain else ""
    fifo: dict[str, Any] = {}
    if abi == "fifo":
        assert s.event_array_pages is not None
        fifo = {"fifo_control_block": {c: s.control_block_expr(c, safe=True) for c in cpus},
                "fifo_event_pages": [s.event_page_expr(i, safe=True)
                                     for i in range(fifo_declared_pages(fifo_pages))],
                "fifo_page_count": f"{s.event_array_pages:#x}"}
    bh_name = FIFO_BOTTOM_HALF_SYMBOL if abi == "fifo" else BOTTOM_HALF_SYMBOL
    return {
        **fifo,
        "arch": "x86_64",
        "probes": s.probes(block, extra_addrs, hvm=hvm, abi=abi),
        "shared_info": (s.shared_info_expr if shared_info_va is None
                        else f"{shared_info_va:#x}"),
        "vcpu_info": {c: s.vcpu_info_expr(c, safe=True) for c in cpus},
        "extra_gdb_commands": [f"source {GDB_HELPERS}"],
        "reeval_vcpu_info": True,
        "vcpus": cpus,
        "filter": s.domain_filter(domain, shared_info_ma) if domain else None,
        "gdb_arch": QEMU_GDB_ARCH,
        "dedupe": True,
        # The guest's own vCPU id (per-cpu xen_vcpu_id at $gs_base), not QEMU's physical
        # CPU, which is what gdb's thread number would give on a whole-machine stub.
        "vcpu_expr": (f"*(unsigned int *)((unsigned long)$gs_base + {s.extra['xen_vcpu_id']:#x})"
                      if "xen_vcpu_id" in s.extra else None),
        "description": f"Linux guest{where} via {s.upcall_name} / {bh_name}"
                       f"{' (FIFO ABI)' if abi == 'fifo' else ''}, symbols from {s.source}",
    }


def apply(options: Any, symbols: str | Path | LinuxSymbols, vcpus: Iterable[int] | None = None,
          domain: str | None = None, *, block: bool = True, extra: Iterable[str] = (),
          facts: GuestFacts | None = None) -> Any:
    """Fill a :class:`~xreplay.record.RecordOptions` for a Linux guest (returns it).

    ``vcpus`` defaults to ``options.vcpus``. Labels the user gave win over the profile's;
    ``facts`` (from :func:`inspect_guest`) adds the xenstore/console labels and the upcall
    delivery mechanism, and picks the ABI: a FIFO guest gets the FIFO regions and bottom
    half.  Without facts the guest is taken to be 2-level.
    """
    fifo = facts is not None and facts.abi == "fifo"
    kw = linux_profile(symbols, options.vcpus if vcpus is None else vcpus, domain, block=block,
                       extra=extra, shared_info_va=facts.shared_info_va if facts else None,
                       hvm=facts is not None and facts.domain_type == "hvm",
                       abi="fifo" if fifo else "2l",
                       fifo_pages=(facts.fifo_pages or 0) if fifo and facts else 1)
    for key, value in kw.items():
        if key == "extra_gdb_commands":
            value = [*options.extra_gdb_commands,
                     *(c for c in value if c not in options.extra_gdb_commands)]
        setattr(options, key, value)
    if facts is not None:
        options.labels = {**facts.labels(), **options.labels}
        options.delivery = {**facts.delivery(), **options.delivery}
    return options


def apply_cli(options: Any, symbols: str | Path, *, domain: str | None = None,
              check: bool = True, shared_info_given: bool = False,
              dedupe: bool | None = None, timeout: float = 30.0,
              session: Any = None) -> GuestFacts | None:
    """What ``xreplay record --symbols MAP [--domain dom0|domu] [--no-guest-check]`` does.

    Call it on the RecordOptions the CLI built from its other options. The profile gives
    the probes, shared_info and a live vcpu_info for each of ``options.vcpus``; what the
    user gave explicitly wins: ``--upcall``/``--bottom-half``/``--block`` replace the
    profile's probe of that role, ``--probe`` adds one, ``--vcpu-info`` replaces that
    vCPU's expression, ``--label`` a label, ``--shared-info`` (``shared_info_given``) the
    pointer, ``--dedupe/--no-dedupe`` (``dedupe``) the profile's de-duplication.

    Unless ``check`` is False (or ``--launch`` starts the target, so it is not running
    yet), the guest is stopped once first (:func:`inspect_guest`): its ABI (2-level or
    FIFO) picks the regions and bottom half, and the xenstore/console labels and the
    delivery mechanism are filled in.  Unchecked, the guest is taken to be 2-level.
    ``session`` runs that check through an attached gdb (see :func:`check_on_attach`).
    """
    user_probes = list(options.probes)
    user_vinfo = dict(options.vcpu_info)
    user_shared = options.shared_info
    syms = LinuxSymbols.load(symbols)
    facts = None
    if check and options.target and not options.launch:
        facts = inspect_guest(options.target, syms, domain, options.vcpus, timeout=timeout,
                              gdb=options.gdb, machine_addresses=False, session=session,
                              require_2level=False)
    apply(options, syms, options.vcpus, domain, facts=facts)
    roles = {p.role for p in user_probes if p.role != "other"}
    options.probes = [p for p in options.probes if p.role not in roles] + user_probes
    options.vcpu_info.update(user_vinfo)
    options.vcpus = sorted(set(options.vcpus) | set(options.vcpu_info))
    if shared_info_given:
        options.shared_info = user_shared
    if dedupe is not None:
        options.dedupe = dedupe
    return facts


def check_on_attach(options: Any, symbols: str | Path, **kw: Any) -> None:
    """``apply_cli`` with its guest check deferred into the recorder's own gdb session.

    Why: gdbsx (and ``gdbserver --once``) serve exactly one gdb connection and exit when
    it ends, so a check over a connection of its own would leave nothing to record. The
    profile is applied now without the check (so the recorder has its probes), and again
    with it from ``options.on_attach``, on a copy of the options as the user left them,
    whose result replaces them before the probes are set.
    """
    given = copy.deepcopy(options)
    apply_cli(options, symbols, check=False, **kw)

    def on_attach(session: Any) -> None:
        fresh = copy.deepcopy(given)
        apply_cli(fresh, symbols, check=True, session=session, **kw)
        for f in dataclasses.fields(options):
            if f.name != "on_attach":
                setattr(options, f.name, getattr(fresh, f.name))

    options.on_attach = on_attach


# ----------------------------------------------------------------------------- live check


@dataclass
class GuestFacts:
    """What one stop inside the guest showed (see :func:`inspect_guest`)."""

    abi: str | None  # "2l", "fifo", None when the map lacks evtchn_ops*
    domain_type: str | None  # pv, hvm (PVH is hvm here), native
    start_flags: int | None
    shared_info_va: int
    shared_info_ma: int | None
    store_evtchn: int | None
    console_evtchn: int | None
    vcpu_info_va: dict[int, int] = field(default_factory=dict)
    vcpu_info_ma: dict[int, int] = field(default_factory=dict)
    cr3: int | None = None
    thread: int | None = None
    fifo_pages: int | None = None  # FIFO: event_array_pages at the check
    event_page_va: list[int] = field(default_factory=list)  # FIFO: event_array[0..pages)
    control_block_va: dict[int, int] = field(default_factory=dict)  # FIFO: per vCPU
    event_page_ma: list[int] = field(default_factory=list)
    control_block_ma: dict[int, int] = field(default_factory=dict)

    @property
    def is_dom0(self) -> bool | None:
        return None if self.start_flags is None else bool(self.start_flags & SIF_INITDOMAIN)

    def labels(self) -> dict[int, str]:
        """xenstore and console ports of a PV domU (its start_info names them)."""
        out: dict[int, str] = {}
        if self.is_dom0 is False and self.domain_type == "pv":
            if self.store_evtchn:
                out[self.store_evtchn] = "xenstore"
            if self.console_evtchn:
                out[self.console_evtchn] = "console"
        return out

    def delivery(self) -> dict[str, Any]:
        """How events reach the guest. PV Linux idles in xen_safe_halt with
        evtchn_upcall_mask set, legitimately: SCHEDOP_block clears the mask as it blocks
        (Xen's vcpu_block_enable_events), hence ``block``."""
        if self.domain_type == "hvm":  # PVH/HVM: the callback vector, idle by HLT
            return {"mechanism": "callback-vector", "vector": HVM_CALLBACK_VECTOR,
                    "block": "hlt"}
        if self.domain_type != "pv":
            return {}
        return {"mechanism": "pv-callback", "block": "schedop_block"}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def inspect_guest(target: str, symbols: str | Path | LinuxSymbols, domain: str | None = None,
                  vcpus: Iterable[int] = (0,), *, timeout: float = 30.0, gdb: str = "gdb",
                  machine_addresses: bool = True, require_2level: bool = True,
                  session: Any = None) -> GuestFacts:
    """Stop once at the guest's upcall, read what the map cannot tell, detach.

    Raises :class:`XReplayError` when the guest uses the FIFO ABI and ``require_2level``
    (callers that can only read 2-level state) or does not take an upcall within
    ``timeout`` seconds; a FIFO guest's event-array pages and control blocks are located.
    ``machine_addresses`` also translates the vcpu_info (and FIFO) addresses through the
    guest's page tables (QEMU only).
    ``session`` borrows an attached gdb (the recorder's) instead of connecting: a stub that
    serves one connection (gdbsx, ``gdbserver --once``) is then not used up by the check.
    """
    from xreplay.profiles.peek import StubPeek

    s = _symbols(symbols)
    cond = s.domain_filter(domain) if domain else None
    with StubPeek(target, gdb=gdb, session=session) as peek:
        if not peek.run_to(f"*{s.upcall:#x}", cond, timeout):
            where = f" in {domain}" if domain else ""
            raise XReplayError(f"no upcall ({s.upcall_name}){where} within {timeout:.0f} s at "
                               f"{target}: is the guest running and bound to event channels?")
        flags = peek.u32(s.start_flags) if s.start_flags is not None else None
        dtype = (DOMAIN_TYPES.get(peek.u32(s.domain_type))
                 if s.domain_type is not None else None)
        abi = None
        if s.evtchn_ops is not None:
            ops = peek.u64(s.evtchn_ops)
            if ops and ops == s.evtchn_ops_fifo:
                abi = "fifo"
            elif ops and ops == s.evtchn_ops_2l:
                abi = "2l"
        shinfo_va = peek.u64(s.shared_info_ptr)
        shinfo_ma = store = console = None
        if s.start_info_ptr is not None and dtype == "pv":
            si = peek.u64(s.start_info_ptr)
            raw = peek.read(si, START_INFO_CONSOLE_EVTCHN + 4)
            shinfo_ma = int.from_bytes(raw[START_INFO_SHARED_INFO:START_INFO_SHARED_INFO + 8],
                                       "little")
            store = int.from_bytes(raw[START_INFO_STORE_EVTCHN:START_INFO_STORE_EVTCHN + 4],
                                   "little")
            console = int.from_bytes(
                raw[START_INFO_CONSOLE_EVTCHN:START_INFO_CONSOLE_EVTCHN + 4], "little")
        facts = GuestFacts(abi=abi, domain_type=dtype, start_flags=flags,
                           shared_info_va=shinfo_va, shared_info_ma=shinfo_ma,
                           store_evtchn=store, console_evtchn=console,
                           thread=peek.eval_int("$_thread"))
        for cpu in sorted(set(vcpus)):
            facts.vcpu_info_va[cpu] = peek.u64(peek.u64(s.per_cpu_offset + 8 * cpu)
                                               + s.xen_vcpu)
        if abi == "fifo" and s.has_fifo:
            assert s.event_array_pages is not None and s.event_array is not None
            assert s.cpu_control_block is not None
            facts.fifo_pages = peek.u32(s.event_array_pages)
            facts.event_page_va = [peek.u64(s.event_array + 8 * i)
                                   for i in range(min(facts.fifo_pages,
                                                      MAX_EVENT_ARRAY_PAGES))]
            for cpu in sorted(set(vcpus)):
                facts.control_block_va[cpu] = peek.u64(
                    peek.u64(s.per_cpu_offset + 8 * cpu) + s.cpu_control_block)
        if machine_addresses:
            facts.cr3 = peek.eval_int("(unsigned long)$cr3")
            for cpu, va in facts.vcpu_info_va.items():
                facts.vcpu_info_ma[cpu] = peek.translate(facts.cr3, va)
            facts.event_page_ma = [peek.translate(facts.cr3, va) for va in facts.event_page_va]
            for cpu, va in facts.control_block_va.items():
                facts.control_block_ma[cpu] = peek.translate(facts.cr3, va)
            if facts.shared_info_ma is None:
                facts.shared_info_ma = peek.translate(facts.cr3, shinfo_va)
    if require_2level and abi == "fifo":
        raise XReplayError(
            "the guest uses the FIFO event-channel ABI (evtchn_ops == &evtchn_ops_fifo) and "
            "this step reads only the 2-level bitmaps: record it with xreplay record "
            "--symbols (which records FIFO guests), or boot it with xen.fifo_events=0")
    return facts
