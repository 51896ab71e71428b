"""What a recording run is asked to do, and how it ended.

:class:`RecordOptions` is the library's whole description of a run (the CLI and the
profiles only fill it in); :class:`EndReason` and :data:`EXIT_CODES` are the contract
scripts rely on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from xreplay.errors import XReplayError
from xreplay.xrr import ProbeSpec


@dataclass
class WatchSpec:
    """Extra guest memory stored with each snapshot (e.g. a guest's shadow of pending ports)."""

    name: str
    expr: str
    size: int

    @classmethod
    def parse(cls, text: str) -> WatchSpec:
        """``NAME=EXPR:LEN``, or ``NAME=EXPR`` for the size gdb's debug info gives EXPR's
        object (``size`` 0 until the agent resolves it)."""
        name, sep, rest = text.partition("=")
        expr, sep2, size = rest.rpartition(":")
        if sep and name and rest and not (sep2 and size.strip().isdigit()):
            expr, size = rest, "0"
        if not (sep and name and expr and size.strip().isdigit()):
            raise XReplayError(f"bad --watch {text!r}: write NAME=EXPR[:LEN], "
                               "e.g. 'shadow=&evtchn_callback_ml:4096'")
        return cls(name, expr, int(size))


@dataclass
class RecordOptions:
    output: Path
    arch: str | None = None  # guest ABI; None: from the ELF (or the stub's architecture)
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
    #: FIFO ABI guests: vCPU -> its control block's expression, and one expression per
    #: event-array page in use (re-read at every hit when ``reeval_vcpu_info``)
    fifo_control_block: dict[int, str] = field(default_factory=dict)
    fifo_event_pages: list[str] = field(default_factory=list)
    #: where the guest counts the event-array pages it has given Xen (Linux's
    #: ``event_array_pages``, an unsigned int): read at every hit, and then
    #: ``fifo_event_pages`` lists the pages the run may follow (each read only from the hit
    #: where the count covers it), not just those in use when it starts
    fifo_page_count: str | None = None
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
    gdb_arch: str | None = None  # None: what the stub needs (QEMU x86: i386:x86-64)
    dedupe: bool | None = None  # drop exact repeats; None: on where the stub needs it (QEMU)
    #: read every region until two passes agree: for stubs that pause only the domain
    #: (gdbsx), while Xen itself runs on and may deliver an event between two reads
    stable_reads: bool = False
    filter: str | None = None  # gdb expression: record only hits where it is true
    target_kind: str | None = None  # None: identified from the stub's answers
    description: str = ""
    connect_timeout: float = 10.0
    delivery: dict[str, Any] = field(default_factory=dict)
    extra_gdb_commands: list[str] = field(default_factory=list)
    #: with Ctrl-C (or SIGTERM) after this long without a probe hit, take a hang snapshot
    interrupt_hang_after: float = 1.0
    #: whole-machine stub without a filter: stop when hits of two domains show up
    single_domain: bool = True
    #: who takes the snapshots: "auto" (the direct remote-protocol loop where the stub and
    #: the options allow it, else the in-gdb agent), "agent", or "direct" (refuse to run
    #: when the direct loop cannot)
    hit_loop: str = "auto"
    # On a deterministic replay (xreplay.rr, record --from-rr): the header's "replay" origin
    # (also makes the agent store each snapshot's icount), gdb commands run once attached
    # (the end-of-log replay break), what an interrupt nobody asked for means, and, since a
    # replay skips idle time, the hang test made at the log's end with the last hit's icount.
    replay: dict[str, Any] = field(default_factory=dict)
    attach_commands: list[str] = field(default_factory=list)
    spontaneous_stop: str = "interrupted"
    end_is_hang: Callable[[int | None], bool] | None = None
    #: called with the attached GdbSession before the probes are set: a check that must
    #: use the recorder's own connection (gdbsx and ``gdbserver --once`` serve only one)
    on_attach: Callable[[Any], None] | None = field(default=None, repr=False)


class EndReason(StrEnum):
    """Why a recording ended (stored as the trailer's ``reason``)."""

    COUNT = "count"
    DURATION = "duration"
    HANG = "hang"
    INTERRUPTED = "interrupted"
    STOPPED = "stopped"  # the target stopped for a reason of its own
    TARGET_EXITED = "target-exited"
    TARGET_CRASHED = "target-crashed"
    TARGET_LOST = "target-lost"
    WRITE_ERROR = "write-error"
    MIXED_DOMAINS = "mixed-domains"
    REPLAY_END = "replay-end"  # a replay reached the end of its log (record --from-rr)


#: ``xreplay record``'s exit status by end reason (2 is every error before recording).
EXIT_CODES: dict[EndReason, int] = {
    EndReason.COUNT: 0, EndReason.DURATION: 0, EndReason.HANG: 0,
    EndReason.INTERRUPTED: 0, EndReason.STOPPED: 0, EndReason.TARGET_EXITED: 0,
    EndReason.TARGET_CRASHED: 3, EndReason.TARGET_LOST: 3,
    EndReason.WRITE_ERROR: 4, EndReason.MIXED_DOMAINS: 6, EndReason.REPLAY_END: 0,
}
#: exit status when the run ended normally but no snapshot holds readable shared_info
EXIT_NOTHING_READ = 5
EXIT_HELP = (
    "Exit status: 0 recorded (count, duration, hang, Ctrl-C, target exited); 2 set-up "
    "error, nothing recorded; 3 the target crashed or the stub went away (the file holds "
    "what came before); 4 the recording could not be written (disk full: the file holds "
    "every complete snapshot); 5 no snapshot could read shared_info; 6 hits of more than "
    "one domain (whole-machine stub without --domain/--filter).")


@dataclass
class RecordResult:
    output: Path
    snapshots: int
    reason: EndReason
    duplicates: int = 0
    foreign: int = 0
    elapsed: float = 0.0
    hang_snapshot: int | None = None
    signal: str | None = None  # for target-crashed
    #: region name -> snapshots in which it could not be read
    unreadable: dict[str, int] = field(default_factory=dict)
    readable_shared_info: int = 0  # snapshots whose shared_info was read
    message: str | None = None  # what went wrong, for write errors and mixed domains
    launch_log: Path | None = None
    stub: str | None = None
    arch: str | None = None
    filter_errors: int = 0
    #: hits whose regions still changed between passes after the retries (stable_reads)
    unstable_reads: int = 0
    hit_loop: str = "agent"  # who recorded: "agent" or a description of the direct loop
    hit_loop_why: str | None = None  # why the agent recorded when the direct loop was allowed
    packets: int | None = None  # remote-protocol packets sent during the run, when counted
    #: a stop that ended the run which no probe and no request explains: the signal gdb
    #: reported and where (e.g. a stray single-step trap through gdbsx), else None
    stopped_at: str | None = None

    @property
    def packets_per_hit(self) -> float | None:
        return self.packets / self.snapshots if self.packets is not None and self.snapshots \
            else None

    @property
    def rate(self) -> float:
        return self.snapshots / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def exit_code(self) -> int:
        code = EXIT_CODES.get(self.reason, 0)
        if code == 0 and self.readable_shared_info == 0:
            return EXIT_NOTHING_READ
        return code


@dataclass
class Progress:
    snapshots: int
    elapsed: float
    last_probe: str | None
