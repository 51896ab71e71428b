"""Replays of a run: QEMU with ``rr=replay`` frozen behind its gdbstub, and
``record --from-rr`` (the live recorder pointed at that stub).

A replay is deterministic on the recording's command line and images (checked against the
manifest first).  It must never run past its log: the recording's final instruction count
becomes a QEMU replay breakpoint (``monitor replay_break N``, which stops the replay there
and reports SIGINT to gdb); a run the guest ended itself ends the same way on replay.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from xreplay.errors import XReplayError
from xreplay.gdb.stub import QEMU_X86_GDB_ARCH
from xreplay.lab.guests import _listening, free_port
from xreplay.rr import cmdline
from xreplay.rr.rundir import Manifest, RunDir

_BENIGN = ("Terminated via GDBstub", "terminating on signal")
GDB_ARCH_X86 = QEMU_X86_GDB_ARCH  # 64-bit registers even in 32-bit code


class ReplayQemu:
    """A replaying QEMU; ``with ReplayQemu(run) as q: q.address`` (stopped by its PID)."""

    def __init__(self, run: str | os.PathLike | RunDir, tag: str = "replay") -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.manifest: Manifest = self.run.read()
        self.run.check_images(self.manifest)
        if not Path(self.manifest.cwd).is_dir():
            raise XReplayError(f"{self.manifest.cwd}: the recording's working directory is "
                               "gone (the command line's relative paths start there)")
        self.tag = f"{tag}-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.log_path = self.run.path / f"{self.tag}-qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address: str | None = None
        self.argv: list[str] = []

    def start(self, timeout: float = 15.0) -> str:
        m = self.manifest
        for attempt in range(3):
            port = free_port()
            self.argv = cmdline.replay_argv(m.qemu, self.run.log, m.icount_shift, port,
                                            self.run.path, self.tag)
            with open(self.log_path, "wb") as err:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=err,
                                             stderr=err, cwd=m.cwd, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _listening(port):
                    self.address = f"127.0.0.1:{port}"
                    return self.address
                time.sleep(0.01)
            log = self.log()
            self.stop()
            if "Address already in use" not in log or attempt == 2:
                raise XReplayError(f"the replaying QEMU did not come up: "
                                   f"{log.strip()[-300:] or 'no message'}")
        raise AssertionError("unreachable")

    @property
    def end_icount(self) -> int | None:
        return self.manifest.end_icount

    def end_commands(self) -> list[str]:
        """gdb commands that stop the replay where its log ends (none if the guest ended it)."""
        n = self.manifest.end_icount
        return [] if n is None else [f"monitor replay_break {n}"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def problems(self) -> list[str]:
        """What QEMU said on stderr beyond its usual exit lines (divergence, bad log)."""
        return [ln.strip() for ln in self.log().splitlines()
                if ln.strip() and not any(b in ln for b in _BENIGN)]

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                # QEMU 7.2 can deadlock in replay and ignore SIGTERM (shared/qemu-rr.md)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                p.wait()

    def cleanup(self) -> None:
        """Remove this replay's own output files (QEMU log, redirected serial files)."""
        for f in self.run.path.glob(f"{self.tag}-*"):
            with contextlib.suppress(OSError):
                f.unlink()

    def __enter__(self) -> ReplayQemu:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def replay_origin(q: ReplayQemu) -> dict[str, Any]:
    """The ``replay`` key of a recording's header."""
    m = q.manifest
    return {"kind": "qemu-rr", "run": str(q.run.path), "log_sha256": m.log_sha256,
            "icount_shift": m.icount_shift, "end_icount": m.end_icount,
            "ended_by": m.ended_by, "qemu": shlex.join(m.qemu),
            "images": [{"option": i.option, "path": i.path, "sha256": i.sha256}
                       for i in m.images]}


def default_elf(run: RunDir, m: Manifest) -> Path | None:
    return cmdline.elf_kernel(cmdline.parse(m.qemu), Path(m.cwd))


def record_from_rr(run: str | os.PathLike, options: Any,
                   runner: Callable[[Any], Any] | None = None) -> Any:
    """Record snapshots on a replay of ``run`` exactly as a live recording does.

    ``options`` is a :class:`~xreplay.record.RecordOptions` without a target: the replaying
    QEMU's stub becomes the target, the replay origin goes into the header, each snapshot
    gets its icount, and the end-of-log break stops the replay (reason ``replay-end``, or
    ``hang`` with ``hang_after`` when the guest made no probe hit for that long before it).
    ``runner`` runs the recorder (the CLI's adds Ctrl-C handling); the default runs it plain.
    """
    from xreplay.record import Recorder

    if options.target or options.launch:
        raise XReplayError("--from-rr replays the run behind its own gdbstub: drop --target "
                           "and --launch")
    q = ReplayQemu(run)
    if options.elf is None:
        options.elf = default_elf(q.run, q.manifest)
        if options.elf is None:
            raise XReplayError(f"{run}: the -kernel image is not an ELF: give --elf with the "
                               "guest's symbols")
    q.start()
    try:
        options.target = q.address
        options.kill_target = True
        options.description = options.description or (
            f"QEMU record/replay run {q.run.path} (replayed)")
        options.replay = replay_origin(q)
        options.attach_commands = [*options.attach_commands, *q.end_commands()]
        options.spontaneous_stop = "replay-end"
        hang_after, options.hang_after = options.hang_after, None
        if hang_after is not None:
            m = q.manifest
            options.end_is_hang = lambda icount: (m.idle_after(icount) or 0.0) >= hang_after
        result = (runner or (lambda o: Recorder(o).run()))(options)
    finally:
        q.stop()
        problems = q.problems()
        q.cleanup()
    q.run.add_recording(options.output)
    if problems:
        raise XReplayError(f"{options.output}: the replay of {q.run.path} reported "
                           f"'{problems[0]}': snapshots may not match the recording; "
                           "record the run again")
    return result
