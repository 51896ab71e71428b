"""GDB under pygdbmi, for control only: connect, load symbols, install the agent, stop.

Per-hit work never passes through here (see :mod:`xreplay.gdb.agent`); this module waits
for MI result records by token, so a command costs one round trip instead of pygdbmi's
default 0.2 s settle time.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pygdbmi.gdbcontroller import GdbController
from pygdbmi.IoManager import IoManager

from xreplay.errors import XReplayError

AGENT_PATH = Path(__file__).with_name("agent.py")


class _Controller(GdbController):
    """pygdbmi's controller, with gdb in its own session so a terminal Ctrl-C reaches only
    the recorder, which then stops the target cleanly."""

    def spawn_new_gdb_subprocess(self) -> int:
        self.gdb_process = subprocess.Popen(
            self.command, shell=False, stdout=subprocess.PIPE, stdin=subprocess.PIPE,
            stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        assert self.gdb_process.stdin is not None and self.gdb_process.stdout is not None
        self.io_manager = IoManager(self.gdb_process.stdin, self.gdb_process.stdout,
                                    self.gdb_process.stderr,
                                    self.time_to_check_for_additional_output_sec)
        return self.gdb_process.pid


class GdbSession:
    """One gdb process speaking MI3."""

    def __init__(self, gdb: str = "gdb") -> None:
        path = shutil.which(gdb)
        if path is None:
            raise XReplayError(f"{gdb!r} not found: install GDB (Debian: apt-get install gdb) "
                               "or pass --gdb PATH")
        self._token = 100
        self.console: list[str] = []  # console/log stream text seen so far
        self.pending: list[dict[str, Any]] = []  # async records not yet consumed
        try:
            self.ctl = _Controller([path, "--nx", "--quiet", "--interpreter=mi3"],
                                   time_to_check_for_additional_output_sec=0.001)
        except (OSError, ValueError) as e:
            raise XReplayError(f"cannot start {path}: {e}") from None
        self.pid = self.ctl.gdb_process.pid if self.ctl.gdb_process else None
        # mi-async: gdb keeps reading commands while the target runs, so -exec-interrupt works.
        for cmd in ("-gdb-set mi-async on", "-gdb-set pagination off", "-gdb-set confirm off",
                    "-gdb-set breakpoint pending off", "-gdb-set width 0",
                    "-gdb-set print pretty off",
                    # gdb re-sends QPassSignals around every resume; that is 2 of ~8 packets
                    # per hit. Without it the stub reports signals and gdb passes them on.
                    "-gdb-set remote pass-signals-packet off",
                    # a refused connection fails at once (the recorder retries a stub it
                    # launched itself) instead of gdb's silent 15 s of retries
                    "-gdb-set tcp auto-retry off"):
            self.mi(cmd)
        # gdb 13 can hit an internal error when a remote target vanishes mid-stop; quit
        # without asking and without dropping a core file into the user's directory.
        for cmd in ("maint set internal-error quit yes", "maint set internal-error corefile no"):
            self.console_command(cmd)

    # -- raw I/O -------------------------------------------------------------------

    def _poll(self, timeout: float) -> list[dict[str, Any]]:
        try:
            recs = self.ctl.get_gdb_response(timeout_sec=timeout, raise_error_on_timeout=False)
        except Exception as e:  # pygdbmi raises bare errors when gdb dies
            raise XReplayError(f"gdb stopped responding ({e}): see messages above") from None
        for r in recs:
            if r.get("type") in ("console", "log", "target") and isinstance(r.get("payload"),
                                                                            str):
                self.console.append(r["payload"])
                del self.console[:-200]
        return recs

    def alive(self) -> bool:
        return self.ctl.gdb_process is not None and self.ctl.gdb_process.poll() is None

    def mi(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        """Run one MI command and return its result record; ``^error`` raises."""
        self._token += 1
        tok = self._token
        try:
            self.ctl.write(f"{tok}{command}", read_response=False)
        except (OSError, ValueError) as e:  # gdb is gone (e.g. it exited with its target)
            raise XReplayError(f"gdb exited before {command!r} ({e.__class__.__name__})"
                               ) from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise XReplayError(f"gdb did not answer {command!r} within {timeout:.0f} s")
            if not self.alive():
                raise XReplayError(f"gdb exited while running {command!r}: "
                                   + " ".join(self.console[-3:]).strip())
            result = None
            for r in self._poll(min(left, 0.5)):
                if r.get("type") == "result" and r.get("token") == tok:
                    result = r
                elif r.get("type") == "notify":  # keep every async record of the batch
                    self.pending.append(r)
            if result is not None:
                if result.get("message") == "error":
                    raise GdbCommandError((result.get("payload") or {}).get("msg", "unknown"))
                return result

    def console_command(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        escaped = command.replace("\\", "\\\\").replace('"', '\\"')
        return self.mi(f'-interpreter-exec console "{escaped}"', timeout)

    def python(self, code: str, timeout: float = 10.0) -> dict[str, Any]:
        """Run Python inside gdb; an exception's own message replaces gdb's generic one."""
        seen = len(self.console)
        try:
            return self.console_command(f"python {code}", timeout)
        except GdbCommandError as e:
            said = [c.strip() for c in self.console[seen:] if c.strip()]
            said = [c for c in said if not c.startswith("Error while executing Python")]
            if said:
                raise GdbCommandError(said[-1]) from None
            raise e from None

    def wait_stopped(self, timeout: float) -> dict[str, Any] | None:
        """The next ``*stopped`` record's payload, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, r in enumerate(self.pending):
                if r.get("message") == "stopped":
                    del self.pending[i]
                    return r.get("payload") or {}
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive():
                return None
            for r in self._poll(min(left, 0.2)):
                if r.get("type") == "notify":
                    self.pending.append(r)

    def exit(self) -> None:
        if self.ctl.gdb_process is None:
            return
        try:
            self.ctl.write("-gdb-exit", read_response=False)
            self.ctl.gdb_process.wait(timeout=1.5)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            pass
        if self.ctl.gdb_process is not None and self.ctl.gdb_process.poll() is None:
            self.ctl.gdb_process.kill()
            self.ctl.gdb_process.wait()
        self.ctl.gdb_process = None


class GdbCommandError(XReplayError):
    """gdb answered ``^error``; the message is gdb's own."""
