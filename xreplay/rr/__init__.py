"""Zero-perturbation recording with QEMU's deterministic record/replay.

``xreplay rr record`` runs the user's own QEMU command line with
``-icount shift=N,rr=record`` and no debugger (the guest runs at its own TCG pace, so a race
of a few instructions stays as likely as without xreplay); the non-determinism log and what
a replay needs are kept in a run directory.  Snapshots are then taken on a replay
(``xreplay record --from-rr``), as often as wanted, and ``xreplay rr last-write`` finds the
instruction that last changed a word by a forward two-pass watchpoint replay (gdb's
``reverse-continue`` deadlocks QEMU 7.2, see ``../shared/qemu-rr.md``).

Modules: :mod:`~xreplay.rr.rundir` (the run directory and its manifest),
:mod:`~xreplay.rr.cmdline` (QEMU command-line rewriting and refusals),
:mod:`~xreplay.rr.capture` (the recording run), :mod:`~xreplay.rr.launcher` (a replaying
QEMU behind its gdbstub, and ``record --from-rr``), :mod:`~xreplay.rr.lastwrite` (the last
writer of an expression), :mod:`~xreplay.rr.writers` (last writers of the fields a replay
finding names), :mod:`~xreplay.rr.commands` (the ``xreplay rr`` click group).
"""
