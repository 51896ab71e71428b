"""Decoded event-channel state at one instant, and its rendering as Xen's 'e' key prints it.

:class:`PortState` is the one port type of the project: a recorded snapshot renders to it
and :mod:`xreplay.debugkeys` parses Xen's dump into it, so the two can be compared field by
field.  Bitmaps are kept as Python ints (port *p* is bit *p*), which is both the fastest
decoding (one ``int.from_bytes`` per bitmap) and the natural 2-level arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from xreplay.abi import fifo as fifo_abi
from xreplay.abi import iter_bits, layout
from xreplay.abi.layouts import XenStructs

# Xen's ECS_* channel states (xen/include/xen/sched.h), the 's=' column of the 'e' key.
ECS_NAMES = {0: "free", 1: "reserved", 2: "unbound", 3: "interdomain", 4: "pirq", 5: "virq",
             6: "ipi"}

X86_EFLAGS_IF = 1 << 9  # interrupts enabled when set
ARM_PSTATE_I = 1 << 7  # IRQs masked when set (CPSR / PSTATE.DAIF)


def interrupts_enabled(arch: str, flags: int | None) -> bool | None:
    """x86 ``IF`` set, or arm's ``PSTATE.I`` clear, in a flags register (None: not read)."""
    if flags is None:
        return None
    if arch.startswith("x86"):
        return bool(flags & X86_EFLAGS_IF)
    return not flags & ARM_PSTATE_I


@dataclass(frozen=True, slots=True)
class PortState:
    """One event-channel port: the ``[p/m/s]`` bits plus what Xen's 'e' key adds.

    ``selector`` is the port's selector-word bit in the notify vCPU's
    ``evtchn_pending_sel`` (2-level ABI); ``fifo`` holds the FIFO ABI's text for that
    column instead (stripped: ``B 12``, ``-``, ``?``), and ``busy``/``linked``/``link`` the
    event word's BUSY, LINKED and LINK it prints (derived from ``fifo`` when not given).
    ``priority`` is the queue the event is LINKED on and ``queue_head`` that queue's
    ``head`` in the notify vCPU's control block: a snapshot knows them (it walks the
    queues), Xen's dump does not print them.  Fields Xen prints but a guest snapshot cannot
    know (``state``, ``remote_domain`` …) are None when unknown.
    """

    port: int
    pending: bool
    masked: bool
    selector: bool | None = None
    fifo: str | None = None
    state: int | None = None  # s=
    notify_vcpu: int | None = None  # n=
    xen_consumer: int | None = None  # x=
    remote_domain: int | None = None  # d=
    remote_port: int | None = None  # p= (interdomain)
    pirq: int | None = None  # p= (pirq)
    irq: int | None = None  # i=
    virq: int | None = None  # v=
    xsm_label: str | None = None  # Z=
    label: str | None = None  # ours: e.g. "xenstore"
    busy: bool | None = None  # FIFO: EVTCHN_FIFO_BUSY
    linked: bool | None = None  # FIFO: EVTCHN_FIFO_LINKED
    link: int | None = None  # FIFO: the LINK field (next port in the queue), when LINKED
    priority: int | None = None  # FIFO: the queue the event is LINKED on (ours)
    queue_head: int | None = None  # FIFO: control_block->head[priority] (ours)

    def __post_init__(self) -> None:
        if self.fifo is not None and self.linked is None:
            word, busy, link = fifo_abi.parse_state(self.fifo)
            if word:
                object.__setattr__(self, "busy", busy)
                object.__setattr__(self, "linked", link is not None)
                object.__setattr__(self, "link", link)

    @property
    def pms(self) -> str:
        """The ``[p/m/s]`` cell exactly as Xen prints it."""
        s = self.fifo if self.fifo is not None else (
            "?" if self.selector is None else str(int(self.selector)))
        return f"[{int(self.pending)}/{int(self.masked)}/{s}]"

    @property
    def fifo_word(self) -> int | None:
        """The event word as far as these fields tell (None: Xen had no word)."""
        if self.fifo is None or fifo_abi.parse_state(self.fifo)[0] is False:
            return None
        return fifo_abi.make_word(pending=self.pending, masked=self.masked,
                                  linked=bool(self.linked), busy=bool(self.busy),
                                  link=self.link or 0)

    @property
    def state_name(self) -> str | None:
        return None if self.state is None else ECS_NAMES.get(self.state, str(self.state))

    def render(self, xen_format: bool = False) -> str:
        """One line in the 'e' key's format (``    %4u [%d/%d/%d]: s=%d n=%d x=%d ...``);
        unless ``xen_format``, our port label follows in parentheses."""
        line = f"    {self.port:4d} {self.pms}"
        if self.fifo is not None:  # Xen's 6-character FIFO column
            line = (f"    {self.port:4d} [{int(self.pending)}/{int(self.masked)}/"
                    f"{fifo_abi.print_state(self.fifo_word)}]")
        if self.state is not None:
            line += f": s={self.state} n={self.notify_vcpu} x={self.xen_consumer}"
            for key, value in (("d", self.remote_domain), ("p", self.remote_port),
                               ("p", self.pirq), ("i", self.irq), ("v", self.virq),
                               ("Z", self.xsm_label)):
                if value is not None:
                    line += f" {key}={value}"
        if self.label and not xen_format:
            line += f"  ({self.label})"
        if self.priority is not None and not xen_format:
            line += f"  [queue {self.priority}, head {self.queue_head}]"
        return line

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PortState:
        return cls(**{k: d.get(k) for k in cls.__slots__ if k in d})


@dataclass(frozen=True, slots=True)
class VcpuState:
    """The fields of one ``vcpu_info`` that event delivery depends on, plus its time."""

    vcpu: int
    evtchn_upcall_pending: int
    evtchn_upcall_mask: int | None  # ARM has no upcall mask (pad0)
    evtchn_pending_sel: int
    time: dict[str, int]
    source: str = "shared_info"  # or "registered" (VCPUOP_register_vcpu_info copy)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class FifoState:
    """A FIFO guest's event state at one hit: the event words of the pages in use (port *p*
    is ``words[p]``; ports past them have no word, which Xen treats as masked) and each
    read vCPU's control block."""

    words: list[int]
    control_blocks: dict[int, fifo_abi.ControlBlock]
    raw: bytes | None = None  # the pages' bytes, when decoded from them (fast bitmaps)

    @property
    def nr_ports(self) -> int:
        return len(self.words)

    def word(self, port: int) -> int | None:
        return self.words[port] if 0 <= port < len(self.words) else None

    def queues(self, ready_only: bool = False) -> dict[int, tuple[int, int, int]]:
        """port -> (vCPU, queue, head) for every event reachable from a queue's ``head``
        through LINKED words (a head whose event is no longer LINKED starts no walk: the
        guest consumed it and ``head`` is stale, as Xen leaves it).  ``ready_only`` walks
        only queues whose ``ready`` bit is set: the only heads the guest will read again
        (a clear bit's head may be stale yet LINKED again, behind another event)."""
        out: dict[int, tuple[int, int, int]] = {}
        n = len(self.words)
        for v, cb in self.control_blocks.items():
            for q, head in enumerate(cb.head):
                if ready_only and not cb.ready >> q & 1:
                    continue
                port, steps = head, 0
                while 0 < port < n and steps < n and port not in out:
                    w = self.words[port]
                    if not w >> fifo_abi.EVTCHN_FIFO_LINKED & 1:
                        break
                    out[port] = (v, q, head)
                    port = w & fifo_abi.EVTCHN_FIFO_LINK_MASK
                    steps += 1
        return out

    @classmethod
    def from_regions(cls, pages: dict[int, bytes], control_blocks: dict[int, bytes]
                     ) -> FifoState:
        """From the raw ``fifo_event_page`` (page index -> 4 KiB) and ``fifo_control_block``
        (vCPU -> bytes) regions read at a hit; the array stops at the first page not read."""
        read = []
        while len(read) in pages:
            read.append(pages[len(read)])
        raw = b"".join(read)
        return cls(fifo_abi.words(raw), {v: fifo_abi.ControlBlock.parse(block)
                                         for v, block in sorted(control_blocks.items())}, raw)

    def bitmaps(self) -> tuple[int, int]:
        """(PENDING, MASKED) of every port as 2-level-style bitmaps, port *p* = bit *p*."""
        if self.raw is not None and len(self.raw) == 4 * len(self.words):
            return (fifo_abi.ports_with(self.raw, fifo_abi.EVTCHN_FIFO_PENDING, True),
                    ((1 << len(self.words)) - 1)
                    & ~fifo_abi.ports_with(self.raw, fifo_abi.EVTCHN_FIFO_MASKED, False))
        pending = mask = 0
        for p, w in enumerate(self.words):
            if w >> fifo_abi.EVTCHN_FIFO_PENDING & 1:
                pending |= 1 << p
            if w >> fifo_abi.EVTCHN_FIFO_MASKED & 1:
                mask |= 1 << p
        return pending, mask


@dataclass(slots=True)
class Snapshot:
    """State of ``shared_info`` and each vCPU's ``vcpu_info`` at one probe hit."""

    arch: str
    index: int
    t_ns: int
    probe: str
    vcpu: int
    pc: int
    flags: int | None
    evtchn_pending: int
    evtchn_mask: int
    vcpus: dict[int, VcpuState]
    hang: bool = False
    watch: dict[str, bytes] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    notify: dict[int, int] = field(default_factory=dict)  # port -> notify vCPU
    #: regions that could not be read at this hit (their fields above are unknown, not 0)
    missing: tuple[str, ...] = ()
    #: the FIFO ABI's event words and control blocks (None: a 2-level snapshot)
    fifo: FifoState | None = None

    @property
    def abi(self) -> str:
        return "2l" if self.fifo is None else "fifo"

    @property
    def has_shared_info(self) -> bool:
        return "shared_info" not in self.missing

    @property
    def structs(self) -> XenStructs:
        return layout(self.arch)

    @property
    def bits_per_word(self) -> int:
        return self.structs.bits_per_word

    @property
    def nr_ports(self) -> int:
        return self.structs.nr_ports if self.fifo is None else self.fifo.nr_ports

    @property
    def interrupts_enabled(self) -> bool | None:
        """Whether the probed vCPU takes interrupts: x86 IF, or arm's PSTATE.I clear."""
        return interrupts_enabled(self.arch, self.flags)

    def is_pending(self, port: int) -> bool:
        return bool(self.evtchn_pending >> port & 1)

    def is_masked(self, port: int) -> bool:
        # Xen treats ports beyond the 2-level range as masked (evtchn_2l_is_masked).
        return port >= self.nr_ports or bool(self.evtchn_mask >> port & 1)

    def notify_vcpu(self, port: int) -> int:
        return self.notify.get(port, 0)

    def selector_bit(self, port: int, vcpu: int | None = None) -> bool | None:
        """Bit ``port / BPW`` of the notify vCPU's ``evtchn_pending_sel`` (None: not read)."""
        v = self.vcpus.get(self.notify_vcpu(port) if vcpu is None else vcpu)
        if v is None:
            return None
        return bool(v.evtchn_pending_sel >> (port // self.bits_per_word) & 1)

    def port_state(self, port: int) -> PortState:
        if self.fifo is not None:
            return self._fifo_port_state(port, self.fifo.queues())
        return PortState(port=port, pending=self.is_pending(port), masked=self.is_masked(port),
                         selector=self.selector_bit(port), notify_vcpu=self.notify.get(port),
                         label=self.labels.get(port))

    def _fifo_port_state(self, port: int, queues: dict[int, tuple[int, int, int]]
                         ) -> PortState:
        assert self.fifo is not None
        raw = self.fifo.word(port)
        where = queues.get(port)
        if raw is None:
            return PortState(port=port, pending=False, masked=True, fifo="?",
                             notify_vcpu=self.notify.get(port), label=self.labels.get(port))
        w = fifo_abi.EventWord(raw)
        return PortState(port=port, pending=w.pending, masked=w.masked,
                         fifo=fifo_abi.print_state(raw).strip(), busy=w.busy, linked=w.linked,
                         link=w.link if w.linked else None,
                         priority=None if where is None else where[1],
                         queue_head=None if where is None else where[2],
                         notify_vcpu=self.notify.get(port), label=self.labels.get(port))

    def interesting_ports(self, limit_unmasked: int = 64) -> list[int]:
        """Ports worth a line: pending, labelled, or unmasked (when few are unmasked).

        A guest masks every port at start and unmasks those it binds, so the unmasked set
        approximates the bound ports the 'e' key lists; a guest that never masks would
        unmask them all, in which case only pending and labelled ports are shown.
        """
        ports = set(iter_bits(self.evtchn_pending)) | set(self.labels)
        unmasked = ~self.evtchn_mask & ((1 << self.nr_ports) - 1)
        if unmasked.bit_count() <= limit_unmasked:
            ports |= set(iter_bits(unmasked))
        ports.discard(0)  # port 0 is never bound; Xen never prints it
        return sorted(p for p in ports if p < self.nr_ports)

    def port_table(self, ports: list[int] | None = None) -> list[PortState]:
        wanted = self.interesting_ports() if ports is None else ports
        if self.fifo is not None:
            queues = self.fifo.queues()
            return [self._fifo_port_state(p, queues) for p in wanted]
        return [self.port_state(p) for p in wanted]

    def pending_unmasked(self) -> int:
        return self.evtchn_pending & ~self.evtchn_mask

    def render(self) -> str:
        """A human view: where it was taken, each vCPU, then the 'e'-style port table."""
        where = f"#{self.index} probe={self.probe} vcpu={self.vcpu} pc={self.pc:#x}"
        if self.interrupts_enabled is not None:
            where += f" IF={int(self.interrupts_enabled)}"
        if self.hang:
            where += " HANG"
        lines = [where]
        for v in self.vcpus.values():
            mask = "-" if v.evtchn_upcall_mask is None else v.evtchn_upcall_mask
            lines.append(
                f"  vcpu {v.vcpu}: evtchn_upcall_pending={v.evtchn_upcall_pending} "
                f"evtchn_upcall_mask={mask} evtchn_pending_sel={v.evtchn_pending_sel:#x} "
                f"system_time={v.time.get('system_time', 0)} ({v.source})")
        if self.fifo is not None:
            for v, cb in sorted(self.fifo.control_blocks.items()):
                heads = " ".join(f"head[{q}]={h}" for q, h in enumerate(cb.head) if h)
                lines.append(f"  vcpu {v}: control_block ready={cb.ready:#x} {heads or 'heads=0'}")
            lines.append(f"  event array: {self.fifo.nr_ports // fifo_abi.EVENT_WORDS_PER_PAGE}"
                         f" page(s), {self.fifo.nr_ports} ports")
        for name in self.missing:
            lines.append(f"  {name}: NOT READ at this hit (its fields are unknown)")
        if not self.has_shared_info:
            return "\n".join(lines)
        lines.append("    port [p/m/s]")
        lines.extend(p.render() for p in self.port_table())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "t_ns": self.t_ns,
            "probe": self.probe,
            "vcpu": self.vcpu,
            "pc": self.pc,
            "flags": self.flags,
            "interrupts_enabled": self.interrupts_enabled,
            "hang": self.hang,
            "vcpus": [v.to_json() for v in self.vcpus.values()],
            "ports": [p.to_json() for p in self.port_table()],
            "evtchn_pending": [p for p in iter_bits(self.evtchn_pending)],
            "evtchn_mask_clear": [p for p in iter_bits(~self.evtchn_mask
                                                        & ((1 << self.nr_ports) - 1))],
            "watch": {k: v.hex() for k, v in self.watch.items()},
            "missing": list(self.missing),
            **({} if self.fifo is None else {"fifo": {
                "event_array_ports": self.fifo.nr_ports,
                "control_blocks": {str(v): {"ready": cb.ready, "head": list(cb.head)}
                                   for v, cb in sorted(self.fifo.control_blocks.items())}}}),
        }


@cache
def _compiled_vcpu_info(arch: str) -> Any:
    """construct's compiled ``vcpu_info`` parser of an arch (compiling costs milliseconds:
    once per process, not once per reader)."""
    return layout(arch).vcpu_info.compile()


class SnapshotDecoder:
    """Turns raw ``shared_info`` / ``vcpu_info`` bytes of one arch into :class:`VcpuState`s
    and bitmaps; built once per recording so offsets and compiled parsers are reused."""

    def __init__(self, arch: str) -> None:
        self.structs = layout(arch)
        fields = self.structs.fields("shared_info")
        self.pending_slice = slice(fields["evtchn_pending"][0], sum(fields["evtchn_pending"]))
        self.mask_slice = slice(fields["evtchn_mask"][0], sum(fields["evtchn_mask"]))
        self.vcpu_info_size = self.structs.vcpu_info.sizeof()
        self.shared_info_size = self.structs.shared_info.sizeof()
        self._vcpu_info = _compiled_vcpu_info(self.structs.arch)
        self._mask_field = ("evtchn_upcall_mask" if self.structs.spec.has_upcall_mask
                            else None)

    def bitmaps(self, shared_info: bytes) -> tuple[int, int]:
        """(evtchn_pending, evtchn_mask) as ints, port *p* = bit *p*."""
        return (int.from_bytes(shared_info[self.pending_slice], "little"),
                int.from_bytes(shared_info[self.mask_slice], "little"))

    def vcpu_state(self, vcpu: int, raw: bytes, source: str) -> VcpuState:
        c = self._vcpu_info.parse(raw[: self.vcpu_info_size])
        t = c.time
        return VcpuState(
            vcpu=vcpu,
            evtchn_upcall_pending=c.evtchn_upcall_pending,
            evtchn_upcall_mask=c[self._mask_field] if self._mask_field else None,
            evtchn_pending_sel=c.evtchn_pending_sel,
            time={"version": t.version, "tsc_timestamp": t.tsc_timestamp,
                  "system_time": t.system_time, "tsc_to_system_mul": t.tsc_to_system_mul,
                  "tsc_shift": t.tsc_shift, "flags": t.flags},
            source=source,
        )

    def embedded_vcpu_info(self, shared_info: bytes, vcpu: int) -> bytes | None:
        """``shared_info->vcpu_info[vcpu]``, or None past ``XEN_LEGACY_MAX_VCPUS``."""
        if vcpu >= self.structs.legacy_max_vcpus:
            return None
        start = vcpu * self.vcpu_info_size
        return shared_info[start: start + self.vcpu_info_size]
