"""``xreplay demo``: the whole story on the bundled lab guest, in about a minute.

Builds the lab guest, runs its ``lost-upcall`` variant (the xen-devel thread's race) under
gdbserver, and under QEMU when it is installed, records until the guest hangs, then shows
the summary, the last snapshots and the replay verdict.  :func:`lab_record_options` is also
what the tests and ``recordings/`` use to record lab guests.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xreplay.abi import layout
from xreplay.lab.guests import (
    FIFO_PAGES,
    FIFO_REGIONS,
    FIFO_VARIANTS,
    LAB_PROBES,
    PORT_LABELS,
    UPCALL_VECTOR,
    LabGuest,
    start_guest,
)
from xreplay.record import Recorder, RecordOptions, RecordResult, WatchSpec
from xreplay.record.build import command_line
from xreplay.xrr import ProbeSpec

SHADOW = "evtchn_callback_ml"
SHADOW_PORTS = 64  # the lab binds ports 1-4; the shadow's first 64 bytes cover them


def lab_record_options(guest: LabGuest, output: Path, **overrides) -> RecordOptions:
    """RecordOptions for a lab guest started with ``start_guest(..., debugger=True)``."""
    if guest.address is None:
        raise ValueError("the lab guest was started without a gdbstub")
    baremetal = guest.kind == "baremetal"
    nr = min(SHADOW_PORTS, layout(guest.arch).nr_ports)
    opts = RecordOptions(
        output=output, arch=guest.arch, target=guest.address, elf=guest.elf,
        probes=[ProbeSpec(role, symbol, role) for role, symbol in LAB_PROBES.items()],
        shared_info="HYPERVISOR_shared_info",
        watch=[WatchSpec(SHADOW, f"&{SHADOW}", nr)],
        labels=dict(PORT_LABELS), kill_target=True,
        gdb_arch=guest.gdb_arch, dedupe=baremetal,
        target_kind="qemu" if baremetal else "gdbserver",
        description=(f"xreplay lab guest, {guest.kind} build, variant={guest.variant} "
                     f"seed={guest.seed} events={guest.events}"),
        delivery={"mechanism": "lapic-vector" if baremetal else "model",
                  "vector": UPCALL_VECTOR})
    if guest.variant in FIFO_VARIANTS:  # the FIFO ABI's memory, not shared_info's bitmaps
        opts.fifo_control_block = {0: FIFO_REGIONS["control_block"]}
        opts.fifo_event_pages = list(FIFO_PAGES)  # read while lab_event_array_pages says
        opts.fifo_page_count = FIFO_REGIONS["page_count"]
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


@dataclass
class DemoRun:
    kind: str
    output: Path
    result: RecordResult


def record_lab_guest(kind: str, variant: str, output: Path, *, seed: int = 1,
                     events: int = 2000, hang_after: float = 2.0,
                     progress: Callable | None = None,
                     say: Callable[[str], None] | None = None, **overrides) -> RecordResult:
    """Start a lab guest, record it until it hangs or exits, stop it by PID; ``say`` gets
    the target's command and the equivalent ``xreplay record`` command first."""
    with start_guest(kind, variant, seed=seed, events=events) as guest:  # type: ignore[arg-type]
        opts = lab_record_options(guest, output, hang_after=hang_after, **overrides)
        if say is not None:
            say(f"$ {shlex.join(guest.argv)} &")
            say(f"$ {command_line(opts)}")
        return Recorder(opts, on_progress=progress).run()


def available_kinds() -> list[str]:
    return ["process"] + (["baremetal"] if shutil.which("qemu-system-x86_64") else [])


def run_demo(out_dir: Path, kinds: list[str] | None = None, variant: str = "lost-upcall",
             seed: int = 1, events: int = 2000,
             say: Callable[[str], None] = print) -> list[DemoRun]:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for kind in kinds or available_kinds():
        target = "gdbserver" if kind == "process" else "QEMU (TCG, bare-metal 32-bit guest)"
        out = out_dir / f"{variant}-{kind}.xrr"
        say(f"== recording the {variant} lab guest under {target} until it hangs -> {out}")
        result = record_lab_guest(kind, variant, out, seed=seed, events=events, say=say)
        runs.append(DemoRun(kind, out, result))
    return runs
