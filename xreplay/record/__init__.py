"""Record a live guest: gdb attached to a gdbstub, snapshots at probes, an ``.xrr`` file.

One module per part: :mod:`.options` (what a run is asked to do, how it ended, exit
codes), :mod:`.target` (a launched target process), :mod:`.channel` (the agent's socket),
:mod:`.sink` (the output file), :mod:`.recorder` (set-up, the run and its stop policy,
teardown), :mod:`.build` (CLI choices and a guest preset turned into options).
"""

from xreplay.record.options import (
    EXIT_CODES,
    EXIT_HELP,
    EXIT_NOTHING_READ,
    EndReason,
    Progress,
    RecordOptions,
    RecordResult,
    WatchSpec,
)
from xreplay.record.recorder import HANG_PROBE, Recorder, flags_register, resolve_arch

__all__ = ["EXIT_CODES", "EXIT_HELP", "EXIT_NOTHING_READ", "HANG_PROBE", "EndReason",
           "Progress", "RecordOptions", "RecordResult", "Recorder", "WatchSpec",
           "flags_register", "resolve_arch"]
