"""``xreplay rr record``: run the user's QEMU line under ``rr=record``, no debugger.

The guest runs at its own TCG pace; xreplay only watches the serial output (for
``--until``) and the clock (``--duration``) from outside, and talks to QEMU over a QMP
socket at the very end: ``query-replay`` for the instruction count where the log ends, then
``quit``, a clean shutdown that flushes the log.  The run directory is written whatever
ends the run (duration, the text, Ctrl-C, the guest's own exit).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from xreplay.errors import XReplayError
from xreplay.rr import cmdline
from xreplay.rr.qmp import Qmp
from xreplay.rr.rundir import Image, Manifest, RunDir, sha256_file

CONSOLE = "console.log"  # QEMU's stdout (-serial stdio, -nographic)
QEMU_LOG = "qemu.log"  # QEMU's stderr
SAMPLE_INTERVAL = 0.02  # s between query-replay samples of the guest's instruction count


@dataclass
class CaptureResult:
    run: Path
    ended_by: str
    duration_s: float
    end_icount: int | None
    log_bytes: int
    until_after_s: float | None  # when --until's text appeared, seconds after the start


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace").strip()[-n:]
    except OSError:
        return ""


class Capture:
    """One recording run; ``Capture(...).run()``; :meth:`request_stop` from signal handlers."""

    def __init__(self, argv: list[str], out: Path, *, duration: float | None = None,
                 until: str | None = None, linger: float = 1.0, shift: str | None = None,
                 poll: float = 0.005) -> None:
        self.argv = list(argv)
        self.opts = cmdline.check(self.argv)  # refusals before anything is created
        self.run_dir = RunDir(out)
        self.duration, self.until, self.linger = duration, until, linger
        self.shift = shift
        self.poll = poll
        self._stop: str | None = None
        if shutil.which(self.argv[0]) is None and not Path(self.argv[0]).is_file():
            raise XReplayError(f"{self.argv[0]} not found: install the Debian package "
                               "qemu-system-x86 (or give the path)")

    def request_stop(self, reason: str = "interrupted") -> None:
        if self._stop is None:
            self._stop = reason

    def _watched(self, cwd: Path) -> list[Path]:
        return [*cmdline.serial_files(self.opts, cwd), self.run_dir.path / CONSOLE]

    def run(self) -> CaptureResult:
        cwd = Path.cwd()
        images = []
        for opt, path in cmdline.image_paths(self.opts, cwd):
            if not path.is_file():
                raise XReplayError(f"{path}: no such guest image ({opt})")
            images.append(Image(opt, str(path), sha256_file(path)))
        rd = self.run_dir
        rd.create()
        shift, _ = cmdline.icount_shift(self.opts)
        shift = self.shift or shift
        with tempfile.TemporaryDirectory(prefix="xreplay-rr-") as tmp:
            qmp_path = Path(tmp) / "qmp.sock"
            argv = cmdline.record_argv(self.argv, rd.log, qmp_path, shift)
            m = Manifest(qemu=self.argv, record_argv=argv, icount_shift=shift, cwd=str(cwd),
                         images=images,
                         serial_files=[str(p) for p in cmdline.serial_files(self.opts, cwd)],
                         started=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                         until=self.until)
            watched = self._watched(cwd)
            for p in watched[:-1]:
                with contextlib.suppress(OSError):
                    p.unlink()  # a stale serial file would satisfy --until at once
            with open(rd.path / CONSOLE, "wb") as out, open(rd.path / QEMU_LOG, "wb") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=cwd, start_new_session=True)
            t0 = time.monotonic()
            try:
                result = self._supervise(proc, qmp_path, m, watched, t0)
            finally:
                _stop_pid(proc)
        m.log_sha256 = sha256_file(rd.log) if rd.log.is_file() else ""
        for i, p in enumerate(watched[:-1]):
            with contextlib.suppress(OSError):
                shutil.copyfile(p, rd.path / f"serial{i}.log")
        rd.write(m)
        if m.ended_by == "qemu-failed":
            raise XReplayError(f"QEMU failed (exit {proc.returncode}): "
                               f"{_tail(rd.path / QEMU_LOG) or 'no message'}")
        result.log_bytes = rd.log.stat().st_size if rd.log.is_file() else 0
        return result

    def _supervise(self, proc: subprocess.Popen, qmp_path: Path, m: Manifest,
                   watched: list[Path], t0: float) -> CaptureResult:
        try:
            qmp = Qmp(qmp_path, alive=lambda: proc.poll() is None)
        except XReplayError:
            m.ended_by = "qemu-failed"
            return CaptureResult(self.run_dir.path, m.ended_by, 0.0, None, 0, None)
        m.qemu_version = "{major}.{minor}.{micro}".format(**qmp.version) if qmp.version else ""
        seen_at: float | None = None
        next_sample = t0
        offsets = [0] * len(watched)
        carry = [b""] * len(watched)
        reason = None
        try:
            while reason is None:
                time.sleep(self.poll)
                now = time.monotonic()
                if now >= next_sample and proc.poll() is None:
                    next_sample = now + SAMPLE_INTERVAL
                    with contextlib.suppress(XReplayError, OSError, KeyError, ValueError):
                        _add_sample(m, now - t0, int(qmp.command("query-replay")["icount"]))
                if proc.poll() is not None:
                    reason = "guest-exit"
                elif self._stop:
                    reason = self._stop
                elif self.duration is not None and now - t0 >= self.duration:
                    reason = "duration"
                elif seen_at is not None and now - seen_at >= self.linger:
                    reason = "until"
                elif self.until and seen_at is None and \
                        self._text_seen(watched, offsets, carry):
                    seen_at = now
                    with contextlib.suppress(XReplayError, OSError):
                        m.until_icount = int(qmp.command("query-replay")["icount"])
            m.duration_s = round(time.monotonic() - t0, 4)
            if reason != "guest-exit":
                with contextlib.suppress(XReplayError, OSError, KeyError, ValueError):
                    qmp.command("stop")
                    m.end_icount = int(qmp.command("query-replay")["icount"])
                    _add_sample(m, time.monotonic() - t0, m.end_icount)
                with contextlib.suppress(XReplayError, OSError):
                    qmp.command("quit")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        finally:
            with contextlib.suppress(OSError):
                qmp.close()
        m.ended_by = reason
        return CaptureResult(self.run_dir.path, reason, m.duration_s, m.end_icount, 0,
                             None if seen_at is None else round(seen_at - t0, 4))

    def _text_seen(self, watched: list[Path], offsets: list[int], carry: list[bytes]) -> bool:
        """Has ``--until``'s text appeared in any output file (read incrementally)?"""
        assert self.until
        needle = self.until.encode()
        for i, p in enumerate(watched):
            try:
                with open(p, "rb") as f:
                    f.seek(offsets[i])
                    data = f.read()
            except OSError:
                continue
            offsets[i] += len(data)
            buf = carry[i] + data
            if needle in buf:
                return True
            carry[i] = buf[-len(needle):]
        return False


def _add_sample(m: Manifest, t: float, icount: int) -> None:
    """Extend the (seconds, icount) map; a flat stretch (the guest idle) keeps its ends."""
    s = m.time_map
    if len(s) >= 2 and s[-1][1] == s[-2][1] == icount:
        s[-1] = [round(t, 4), icount]
    else:
        s.append([round(t, 4), icount])


def _stop_pid(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, QEMU's own process group (started with a new session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
