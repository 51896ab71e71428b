"""``xreplay rr last-write``: the instruction that last changed an expression.

Forward two-pass watchpoint replay (``../shared/qemu-rr.md``; gdb's ``reverse-continue``
deadlocks QEMU 7.2 intermittently and is not used): pass 1 replays the run with a
watchpoint that logs every value change (icount, pc, old/new) and never stops; pass 2, a
fresh replay, stops on the last change by gdb's ignore count, which yields the writer's
backtrace and proves the replay deterministic (same icount and pc as pass 1, or the
answer is refused).  Positions are icounts of this run; with a recording taken on it
(``record --from-rr``) each change is placed between two snapshots.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xreplay.errors import XReplayError
from xreplay.rr.launcher import GDB_ARCH_X86, ReplayQemu, default_elf
from xreplay.rr.rundir import RunDir

SCRIPT = Path(__file__).with_name("gdbwatch.py")


@dataclass
class Write:
    """One value change of the watched expression."""

    number: int  # 1-based, in replay order
    icount: int
    pc: int  # where QEMU reported the watchpoint: the instruction after the writer
    old: int | None
    new: int | None
    writer_pc: int | None = None
    function: str | None = None  # innermost, an inlined function included
    symbol: str | None = None  # the out-of-line function holding it ...
    offset: int | None = None  # ... and the writer's offset in it
    file: str | None = None
    line: int | None = None
    seconds: float | None = None  # in the recording's time (within 20 ms)
    after_snapshot: int | None = None
    before_snapshot: int | None = None
    backtrace: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        loc = f"{self.symbol}+{self.offset}" if self.symbol else "??"
        if self.function and self.function != self.symbol:
            loc = f"{self.function} (inlined in {loc})"
        src = f" ({self.file}:{self.line})" if self.file and self.line else ""
        return f"{loc}{src}"

    def between(self) -> str:
        a, b = self.after_snapshot, self.before_snapshot
        if a is None and b is None:
            return ""
        return (f"after snapshot #{a}" if b is None else
                f"before snapshot #{b}" if a is None else f"between snapshots #{a} and #{b}")


@dataclass
class LastWriteResult:
    run: str
    expr: str
    before_icount: int | None
    writes: list[Write]
    initial: int | None
    recording: str | None
    seconds: float

    @property
    def last(self) -> Write | None:
        return self.writes[-1] if self.writes else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["last"] = asdict(self.last) if self.last else None
        return d


def _pass(run: RunDir, elf: Path, exprs: list[str], gdb: str, *, break_icount: int | None,
          stop_at: list[int] | None, timeout: float, skip_to: int | None = None
          ) -> list[dict[str, Any]]:
    """One replay with a watchpoint per expression; their ``watches`` results in order.
    ``skip_to``: replay to that icount first, without watchpoints (QEMU's own speed)."""
    with tempfile.TemporaryDirectory(prefix="xreplay-lw-") as tmp, ReplayQemu(run, "lw") as q:
        cfg = Path(tmp) / "cfg.json"
        out = Path(tmp) / "out.json"
        cfg.write_text(json.dumps({"exprs": exprs, "break_icount": break_icount,
                                   "stop_at": stop_at, "skip_to": skip_to,
                                   "out": str(out)}))
        argv = [gdb, "-q", "-nx", "-batch", "-ex", f"set architecture {GDB_ARCH_X86}",
                "-ex", f"target remote {q.address}", "-x", str(SCRIPT), str(elf)]
        env = {**os.environ, "XREPLAY_WATCH_CONFIG": str(cfg)}
        try:
            res = subprocess.run(argv, env=env, capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            q.stop()
            raise XReplayError(f"the watchpoint replay of {run.path} did not finish within "
                               f"{timeout:.0f} s (QEMU stuck?): give --timeout") from None
        finally:
            q.stop()
            q.cleanup()
        if not out.is_file():
            err = (res.stderr or res.stdout).strip().splitlines()
            raise XReplayError(f"gdb could not watch {', '.join(exprs)} on the replay: "
                               f"{err[-1] if err else 'no message'}")
        data = json.loads(out.read_text())
    watches = data.get("watches") or []
    if len(watches) != len(exprs):
        raise XReplayError(f"gdb could not watch {', '.join(exprs)}: "
                           f"{data.get('error') or 'no watchpoint set'}")
    return watches


def _symbolize(elf: Path, pcs: list[int], gdb: str) -> dict[int, dict[str, Any]]:
    """Writer pc, function+offset and source line of each reported pc, from the ELF."""
    if not pcs:
        return {}
    with tempfile.TemporaryDirectory(prefix="xreplay-lw-") as tmp:
        cfg, out = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg.write_text(json.dumps({"symbolize": sorted(set(pcs)), "out": str(out)}))
        res = subprocess.run([gdb, "-q", "-nx", "-batch", "-x", str(SCRIPT), str(elf)],
                             env={**os.environ, "XREPLAY_WATCH_CONFIG": str(cfg)},
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL, check=False)
        if not out.is_file():
            err = (res.stderr or res.stdout).strip().splitlines()
            raise XReplayError(f"{elf}: gdb could not read its symbols: "
                               f"{err[-1] if err else 'no message'}")
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


def _write(number: int, c: dict[str, Any]) -> Write:
    keys = Write.__dataclass_fields__
    return Write(number=number, **{k: v for k, v in c.items() if k in keys and k != "number"})


def last_write(run_path: str | os.PathLike, expr: str, **kw: Any) -> LastWriteResult:
    """:func:`last_writes` for one expression."""
    return last_writes(run_path, [expr], **kw)[0]


def last_writes(run_path: str | os.PathLike, exprs: list[str], *, elf: Path | None = None,
                before: int | None = None, recording: Path | None = None,
                every: bool = False, gdb: str = "gdb", timeout: float = 300.0
                ) -> list[LastWriteResult]:
    """The last change of each expression before snapshot ``before`` of ``recording`` (or
    before the log's end); ``every``: all changes. All expressions share the two replays.
    Snapshot placement needs ``recording`` (default: the newest one taken from the run)."""
    t0 = time.monotonic()
    run = RunDir(run_path)
    m = run.read()
    if elf is None:
        elf = default_elf(run, m)
        if elf is None:
            raise XReplayError(f"{run.path}: the -kernel image is not an ELF: give --elf")
    if not Path(elf).is_file():
        raise XReplayError(f"{elf}: no such ELF file (--elf)")
    if recording is None:
        recording = next((Path(r) for r in reversed(m.recordings) if Path(r).is_file()), None)
    times: dict[int, int] = {}
    if recording is not None:
        times = _guest_times(recording, m.log_sha256)
    if before is not None:
        if recording is None:
            raise XReplayError("--before needs a recording taken from this run (record "
                               "--from-rr, or give --xrr F.xrr)")
        if before not in times:
            raise XReplayError(f"{recording}: no snapshot #{before} with a guest position")
    limit = times[before] if before is not None else m.end_icount
    p1 = _pass(run, Path(elf), exprs, gdb, break_icount=limit, stop_at=None, timeout=timeout)
    found: list[list[Write]] = []
    for w1 in p1:
        changes = [c for c in w1["changes"] if c.get("icount") is not None
                   and (limit is None or c["icount"] <= limit)]
        found.append([_write(i + 1, c) for i, c in enumerate(changes)])
    confirm = [i for i, ws in enumerate(found) if ws and not every]
    if confirm:
        # pass 2 replays without watchpoints up to the change before the earliest last one
        # (QEMU's replay breakpoint), then stops on each expression's remaining changes
        skip = min((found[i][-2].icount if len(found[i]) > 1 else 0) for i in confirm)
        p2 = _pass(run, Path(elf), [exprs[i] for i in confirm], gdb, break_icount=limit,
                   stop_at=[sum(1 for w in found[i] if w.icount > skip) for i in confirm],
                   timeout=timeout, skip_to=skip or None)
        for i, w2 in zip(confirm, p2, strict=True):
            last, st = found[i][-1], w2.get("stopped") or {}
            if st.get("icount") != last.icount or st.get("pc") != last.pc:
                raise XReplayError(
                    f"the two replays of {run.path} disagree on change #{last.number} of "
                    f"{exprs[i]!r} (icount {last.icount} pc {last.pc:#x} vs icount "
                    f"{st.get('icount')} pc {st.get('pc')}): the replay is not deterministic "
                    "here, no answer given")
            last.backtrace = st.get("backtrace", [])
            found[i] = [last]
    everything = [w for ws in found for w in ws]
    symbols = _symbolize(Path(elf), [w.pc for w in everything], gdb)
    seqs = sorted(times)
    icounts = [times[s] for s in seqs]
    for w in everything:
        for k, v in symbols.get(w.pc, {}).items():
            if hasattr(w, k):
                setattr(w, k, v)
        w.seconds = m.seconds_at(w.icount)
        if seqs:
            i = bisect.bisect_left(icounts, w.icount)  # first snapshot with icount >= write
            w.after_snapshot = seqs[i - 1] if i > 0 else None
            w.before_snapshot = seqs[i] if i < len(seqs) else None
    took = round(time.monotonic() - t0, 3)
    return [LastWriteResult(run=str(run.path), expr=e, before_icount=limit, writes=ws,
                            initial=w1.get("initial"),
                            recording=str(recording) if recording else None, seconds=took)
            for e, ws, w1 in zip(exprs, found, p1, strict=True)]


def _guest_times(recording: Path, log_sha256: str) -> dict[int, int]:
    from xreplay.xrr import XrrReader

    with XrrReader(recording) as r:
        origin = r.header.replay
        if not origin:
            raise XReplayError(f"{recording}: a live recording, not one taken on a replay "
                               "(record --from-rr)")
        if log_sha256 and origin.get("log_sha256") != log_sha256:
            raise XReplayError(f"{recording}: taken on another run (its replay log differs)")
        with contextlib.suppress(XReplayError):
            return r.guest_times()
    return {}
