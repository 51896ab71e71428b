"""What Xen's SVM holds for an HVM/PVH vCPU: its 'v' debug key (the VMCB), parsed.

Why: "the debugger leaves the guest as it found it" is a claim about the vCPU's hardware
state, and on AMD (the lab's Xen runs on QEMU TCG's emulated SVM) that state is the VMCB:
the intercepts Xen arms while a debugger is attached (#BP in ``exception_intercepts``, the
lab patch's INTn in ``general1_intercepts``), RFLAGS.TF of a single step, DR6/DR7, an
event still latched in ``event_inj``. ``xl getvcpucontext``-style tools (``xenctx``)
show Xen's saved copies (``v->arch.dr6``), not the VMCB, so this reads the VMCB itself:
``xl debug-keys v`` prints every HVM vCPU's VMCB (``xen/arch/x86/hvm/svm/vmcb.c``
``vmcb_dump``, ``svmdebug.c`` ``svm_vmcb_dump``)::

    >>> Domain 7 <<<
        VCPU 0
    Dumping guest's current state at key_handler...
    cr_intercepts = 0xfef3fef3 dr_intercepts = 0xffffffff exception_intercepts = 0x60082
    general1_intercepts = 0xbd44400f general2_intercepts = 0x6fff
    event_inj 0000000000000000, valid? 0, ec? 0, type 0, vector 0
    exitcode = 0x78 exit_int_info = 0
    RSP = 0x0000000000111f98  RIP = 0x00000000001000df
    RAX = 0x000000103b3d1dce  RFLAGS=0x0000000000000202
    DR6 = 0x0000000000004000, DR7 = 0x0000000000000000
      CS: 0018 0a9a ffffffff 0000000000000000
    IDTR: 0000 0000 00000fff 00000000001122d0

At a triple fault the same dump names the exit (``exitcode`` 0x7f, VMEXIT_SHUTDOWN) and
the event being delivered when it came (``exit_int_info``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xreplay.debugkeys import strip_console_prefix
from xreplay.errors import XReplayError

if TYPE_CHECKING:
    from xreplay.lab.xen.lab import Lab

#: SVM exception intercept bits and general1 intercepts named in :func:`left_behind`.
TRAP_DEBUG, TRAP_INT3 = 1, 3
GENERAL1_INTERCEPT_SWINT = 1 << 21
RFLAGS_TF = 1 << 8
DR6_BS = 1 << 14
"""DR6's single-step status bit: set by a #DB from RFLAGS.TF (Xen's ``DR_STEP``)."""
VMEXIT_SHUTDOWN = 0x7F
#: ``exitcode``s worth a name in a report (``xen/arch/x86/include/asm/hvm/svm/vmcb.h``).
EXIT_NAMES = {0x41: "EXCEPTION_DB", 0x43: "EXCEPTION_BP", 0x60: "INTR", 0x64: "VINTR",
              0x6E: "RDTSC", 0x75: "SWINT", 0x78: "HLT", 0x7F: "SHUTDOWN",
              0x81: "VMMCALL", 0x400: "NPF"}
EVENT_TYPES = {0: "interrupt", 2: "NMI", 3: "exception", 4: "software interrupt"}

_FIELD = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(0x[0-9a-fA-F]+|[0-9]+)\b")
_EVENT_INJ = re.compile(r"^event_inj ([0-9a-fA-F]+), valid\? (\d), ec\? (\d), "
                        r"type (\d+), vector (0x[0-9a-fA-F]+|\d+)")
_SEG = re.compile(r"^\s*(CS|DS|SS|ES|FS|GS|GDTR|LDTR|IDTR|TR): ([0-9a-f]{4}) ([0-9a-f]{4}) "
                  r"([0-9a-f]{8}) ([0-9a-f]{16})")
_DOMAIN = re.compile(r"^>>> Domain (\d+) <<<")
_VCPU = re.compile(r"^\s*VCPU (\d+)\s*$")
_BANNER = "VMCB Areas"


@dataclass
class Vmcb:
    """One vCPU's VMCB as the 'v' key printed it: numeric fields by Xen's names
    (``exception_intercepts``, ``RFLAGS``, ``DR6``, ...), segments as
    ``(selector, attr, limit, base)``."""

    domid: int
    vcpu: int
    fields: dict[str, int] = field(default_factory=dict)
    segments: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    event_inj: tuple[int, int, int] | None = None
    """``(valid, type, vector)`` of the event Xen latched for the next VMRUN."""

    def get(self, name: str) -> int | None:
        return self.fields.get(name)

    @property
    def exit_int_info(self) -> tuple[int, int, int] | None:
        """``(valid, type, vector)`` of the event whose delivery the last exit interrupted."""
        raw = self.fields.get("exit_int_info")
        if raw is None:
            return None
        return (raw >> 31) & 1, (raw >> 8) & 7, raw & 0xFF

    def summary(self) -> str:
        """One line: the exit, the event in flight, where, and the debug state."""
        f = self.fields
        code = f.get("exitcode")
        parts = [f"d{self.domid}v{self.vcpu} VMCB:"]
        if code is not None:
            parts.append(f"exitcode {code:#x}" + (f" ({EXIT_NAMES[code]})" if code in EXIT_NAMES
                                                 else ""))
        eii = self.exit_int_info
        if eii is not None and eii[0]:
            parts.append(f"exit_int_info {EVENT_TYPES.get(eii[1], eii[1])} vector {eii[2]:#x}")
        if self.event_inj is not None and self.event_inj[0]:
            parts.append(f"event_inj {EVENT_TYPES.get(self.event_inj[1], self.event_inj[1])} "
                         f"vector {self.event_inj[2]:#x}")
        cs = self.segments.get("CS")
        if "RIP" in f:
            parts.append(f"RIP {cs[0]:04x}:{f['RIP']:#x}" if cs else f"RIP {f['RIP']:#x}")
        for name in ("RFLAGS", "CR2", "DR6", "DR7", "exception_intercepts",
                     "general1_intercepts"):
            if name in f:
                parts.append(f"{name} {f[name]:#x}")
        idtr = self.segments.get("IDTR")
        if idtr is not None:
            parts.append(f"IDTR {idtr[3]:#x}/{idtr[2]:#x}")
        return " ".join(parts)


def parse(text: str) -> dict[tuple[int, int], Vmcb]:
    """Every VMCB in the *last* 'v' dump of ``text`` (``xl dmesg`` or a serial log),
    keyed by ``(domid, vcpu)``. Text without a dump raises :class:`XReplayError`."""
    raw = text.splitlines()
    if any("(XEN)" in ln for ln in raw):  # a serial log: guests' own lines are interleaved
        raw = [ln for ln in raw if "(XEN)" in ln]
    lines = [strip_console_prefix(ln) for ln in raw]
    starts = [i for i, ln in enumerate(lines) if _BANNER in ln]
    if not starts:
        raise XReplayError("no 'v' key dump (\"VMCB Areas\") in Xen's console text")
    out: dict[tuple[int, int], Vmcb] = {}
    domid: int | None = None
    cur: Vmcb | None = None
    for ln in lines[starts[-1] + 1:]:
        if ln.strip().startswith("****") or _BANNER in ln:
            break
        if m := _DOMAIN.match(ln.strip()):
            domid, cur = int(m.group(1)), None
            continue
        if (m := _VCPU.match(ln)) and domid is not None:
            cur = out.setdefault((domid, int(m.group(1))), Vmcb(domid, int(m.group(1))))
            continue
        if cur is None:
            continue
        if m := _EVENT_INJ.match(ln.strip()):
            cur.event_inj = (int(m.group(2)), int(m.group(4)), int(m.group(5), 0))
            continue
        if m := _SEG.match(ln):
            cur.segments[m.group(1)] = tuple(int(x, 16) for x in m.group(2, 3, 4, 5))  # type: ignore[assignment]
            continue
        for name, value in _FIELD.findall(ln):
            cur.fields[name] = int(value, 0)  # Xen prints these with %#x / 0x%016x
    return out


def read(lab: Lab, domid: int) -> list[Vmcb]:
    """The domain's VMCBs now (``xl debug-keys v`` in dom0, then its console ring)."""
    text = lab.dom0("xl debug-keys v && xl dmesg | tail -n 600", timeout=60)
    found = [v for (d, _), v in sorted(parse(text).items()) if d == domid]
    if not found:
        raise XReplayError(f"Xen's 'v' dump has no VMCB for domain {domid} (not HVM/PVH, "
                           "or not initialised yet)")
    return found


#: The bits of each field a debugger sets (Xen while one is attached, the lab's patches):
#: only these are compared. The rest move with the guest's own state: Xen arms the VINTR
#: intercept (general1 bit 4) while an interrupt waits for IF=1, #NM and the CR0 write
#: intercept with lazy FPU switching, the DR intercepts when the guest touches DRs
#: (measured: general1 0xbd44400f -> 0xbd44401f right after a callback-irq session, the
#: guest's upcall waiting for its sti).
_COMPARED = {"exception_intercepts": (1 << TRAP_DEBUG) | (1 << TRAP_INT3),
             "general1_intercepts": GENERAL1_INTERCEPT_SWINT,
             "DR7": ~0}


def left_behind(before: Iterable[Vmcb], after: Iterable[Vmcb]) -> list[str]:
    """What a debug session left in the vCPUs: a debugger's intercepts (#DB, #BP, INTn)
    that differ from before it attached, RFLAGS.TF, DR6.BS (a single step's status), DR7,
    an event still latched. Empty when the VMCBs are as they were in those (intercepts
    that follow the guest's own state are not compared: :data:`_COMPARED`)."""
    base = {v.vcpu: v for v in before}
    out: list[str] = []
    for v in after:
        b = base.get(v.vcpu)
        for name, mask in _COMPARED.items():
            now, was = v.get(name), b.get(name) if b else None
            if b is not None and now is not None and was is not None and (now ^ was) & mask:
                out.append(f"v{v.vcpu} {name} {was:#x} -> {now:#x}")
        exc = v.get("exception_intercepts") or 0
        if exc & (1 << TRAP_INT3):
            out.append(f"v{v.vcpu} #BP still intercepted")
        if (v.get("general1_intercepts") or 0) & GENERAL1_INTERCEPT_SWINT:
            out.append(f"v{v.vcpu} INTn (SWINT) still intercepted")
        if (v.get("RFLAGS") or 0) & RFLAGS_TF:
            out.append(f"v{v.vcpu} RFLAGS.TF set")
        if (v.get("DR6") or 0) & DR6_BS and not ((b and b.get("DR6") or 0) & DR6_BS):
            out.append(f"v{v.vcpu} DR6.BS set (a single step's status; DR6 {v.get('DR6'):#x})")
        if v.event_inj is not None and v.event_inj[0]:
            out.append(f"v{v.vcpu} event_inj pending: "
                       f"{EVENT_TYPES.get(v.event_inj[1], v.event_inj[1])} "
                       f"vector {v.event_inj[2]:#x}")
    return out
