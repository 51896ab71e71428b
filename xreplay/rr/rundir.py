"""The run directory of a QEMU record/replay recording and its manifest.

``RUN.rr/`` holds ``rr.bin`` (QEMU's non-determinism log), ``manifest.json`` (the exact
command line as given and as run, the icount shift, the working directory, the SHA-256 of
every guest image the command line names, how the run ended and at which instruction
count), and QEMU's own output (``qemu.log``, ``console.log``, copies of serial files).
A replay is only deterministic on the same command line and the same images: the manifest
is what :mod:`xreplay.rr.launcher` checks before replaying.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xreplay.errors import XReplayError

MANIFEST = "manifest.json"
LOG = "rr.bin"
FORMAT = "xreplay-qemu-rr/1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Image:
    """A file the guest boots from (``-kernel``, ``-initrd`` module, ``-bios``)."""

    option: str
    path: str  # absolute
    sha256: str


@dataclass
class Manifest:
    qemu: list[str]
    """The user's command line, exactly as given (argv[0] first)."""
    record_argv: list[str]
    """What ran: the user's line plus ``-icount ...,rr=record`` and xreplay's QMP socket."""
    icount_shift: str
    cwd: str
    images: list[Image] = field(default_factory=list)
    serial_files: list[str] = field(default_factory=list)
    """``-serial file:PATH`` targets of the user's line (absolute), in order."""
    qemu_version: str = ""
    started: str = ""
    duration_s: float = 0.0
    ended_by: str = ""  # duration | until | interrupted | guest-exit | qemu-failed
    end_icount: int | None = None
    """Instructions executed when the recording stopped (QMP query-replay); None when the
    guest ended it (QEMU exited: its replay ends the same way)."""
    until: str | None = None
    until_icount: int | None = None
    log_sha256: str = ""
    time_map: list[list[float | int]] = field(default_factory=list)
    """[seconds since start, icount] sampled every 20 ms during the recording (flat
    stretches, where the guest idled, keep their two ends): maps a replay position back to
    the recording's time."""
    recordings: list[str] = field(default_factory=list)
    """``.xrr`` files taken from this run (``record --from-rr``), newest last."""
    format: str = FORMAT

    def seconds_at(self, icount: int) -> float | None:
        """When (seconds after the start, within one sample) the recording's guest had
        executed ``icount`` instructions; None without samples."""
        for t, n in self.time_map:
            if n >= icount:
                return float(t)
        return float(self.time_map[-1][0]) if self.time_map else None

    def idle_after(self, icount: int | None) -> float | None:
        """Seconds of the recording after the guest passed ``icount`` (a hang's length)."""
        if icount is None:
            return None
        at = self.seconds_at(icount)
        return None if at is None else max(0.0, self.duration_s - at)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, source: str) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise XReplayError(f"{source}: not an xreplay QEMU record/replay manifest "
                               f"(format {d.get('format') if isinstance(d, dict) else None!r})")
        try:
            images = [Image(str(i["option"]), str(i["path"]), str(i["sha256"]))
                      for i in d.get("images", [])]
            kw = {k: d[k] for k in ("qemu", "record_argv", "icount_shift", "cwd")}
            opt = {k: d[k] for k in ("serial_files", "qemu_version", "started", "duration_s",
                                     "ended_by", "end_icount", "until", "until_icount",
                                     "log_sha256", "recordings", "time_map") if k in d}
        except (KeyError, TypeError) as e:
            raise XReplayError(f"{source}: manifest is malformed ({e})") from None
        m = cls(images=images, **kw, **opt)
        if not (isinstance(m.qemu, list) and all(isinstance(a, str) for a in m.qemu)
                and m.qemu):
            raise XReplayError(f"{source}: manifest has no QEMU command line")
        return m


class RunDir:
    """A ``RUN.rr`` directory: paths, the manifest, and its checks."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()

    @property
    def log(self) -> Path:
        return self.path / LOG

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def create(self) -> None:
        """Make the directory; an existing *run* is replaced, anything else is refused."""
        if self.path.exists():
            if not self.path.is_dir():
                raise XReplayError(f"{self.path}: exists and is not a directory; choose "
                                   "another -o")
            ours = (self.manifest_path.is_file() or self.log.is_file())
            if any(self.path.iterdir()) and not ours:
                raise XReplayError(f"{self.path}: a non-empty directory that is not an rr run; "
                                   "choose another -o")
            for f in self.path.iterdir():
                if f.is_file():
                    f.unlink()  # a run's own files only (checked above)
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, m: Manifest) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(m.to_json(), indent=1) + "\n")
        os.replace(tmp, self.manifest_path)

    def read(self) -> Manifest:
        """The manifest, with the log present and unchanged."""
        if not self.manifest_path.is_file():
            raise XReplayError(f"{self.path}: no {MANIFEST}: not a run made by "
                               "'xreplay rr record' (or it was interrupted before it started)")
        try:
            doc = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise XReplayError(f"{self.manifest_path}: unreadable ({e})") from None
        m = Manifest.from_json(doc, str(self.manifest_path))
        if not self.log.is_file():
            raise XReplayError(f"{self.log}: the record/replay log is missing")
        if m.log_sha256 and sha256_file(self.log) != m.log_sha256:
            raise XReplayError(f"{self.log}: changed since the recording (SHA-256 differs "
                               "from the manifest): record the run again")
        return m

    def check_images(self, m: Manifest) -> None:
        """Every image still has the recorded content: a replay on another image diverges."""
        for img in m.images:
            p = Path(img.path)
            if not p.is_file():
                raise XReplayError(f"{p}: guest image ({img.option}) of {self.path} is gone; "
                                   "the replay needs the very same file")
            if sha256_file(p) != img.sha256:
                raise XReplayError(f"{p}: guest image ({img.option}) changed since {self.path} "
                                   "was recorded (SHA-256 differs): the replay would diverge; "
                                   "rebuild the old image or record again")

    def add_recording(self, xrr: Path) -> None:
        """Remember an ``.xrr`` taken from this run (last-write uses the newest by default)."""
        m = self.read()
        name = str(Path(xrr).absolute())
        m.recordings = [r for r in m.recordings if r != name] + [name]
        self.write(m)
