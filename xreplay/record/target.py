"""The target process a recording launched (``--launch``): its log, its PID, its end.

Whatever the launched command prints goes to a log file beside the recording, so a stub
that fails to start can be explained with its own last lines, and the user's terminal
stays the recorder's.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

from xreplay.errors import XReplayError


def launch_log_path(output: Path) -> Path:
    return output.with_name(output.name + ".launch.log")


class LaunchedTarget:
    """A command started in its own session, stopped by its PID."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        try:
            with open(log, "wb") as out:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT,
                                             start_new_session=True)
        except OSError as e:
            raise XReplayError(f"cannot launch {shlex.join(argv)}: {e.strerror}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status, waiting up to ``timeout`` s (None if it still runs)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 5) -> str:
        """The launched command's last lines, one string (for an error message)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def explain(self) -> str:
        """What to add to an error when the launched stub is the likely cause."""
        if self.alive():
            return ""
        said = self.tail()
        return (f"; the launched command exited with status {self.proc.returncode}"
                + (f": {said}" if said else "") + f" (log: {self.log})")

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 5 s."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
