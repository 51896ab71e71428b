"""The ``xreplay rr`` commands: ``record`` (no debugger) and ``last-write``."""

from __future__ import annotations

from pathlib import Path

import click

from xreplay.output import emit_json


@click.group("rr")
def rr() -> None:
    """QEMU deterministic record/replay: record without a debugger, snapshot on replays."""


@rr.command("record", context_settings={"ignore_unknown_options": True})
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Run directory to write (RUN.rr).")
@click.option("--duration", type=click.FloatRange(0, min_open=True),
              help="Stop after S seconds.")
@click.option("--until", "until", metavar="TEXT", help="Stop once the guest's serial output "
              "(a -serial file: or QEMU's stdout) shows TEXT, e.g. a hang marker.")
@click.option("--linger", type=click.FloatRange(0), default=1.0, show_default=True,
              help="With --until: keep recording S seconds after TEXT (a hang replayed "
              "needs that long without probe hits for --hang-after).")
@click.option("--shift", default=None, help="icount shift (default: the line's -icount "
              "shift, else 4); the replay uses the same.")
@click.argument("qemu", nargs=-1, required=True, type=click.UNPROCESSED)
def record_command(output: Path, duration: float | None, until: str | None, linger: float,
                   shift: str | None, qemu: tuple[str, ...]) -> None:
    """Run QEMU_COMMAND_LINE under QEMU's rr=record, no debugger (write it after --)."""
    from xreplay.rr.capture import Capture
    from xreplay.signals import stop_on_signals

    cap = Capture(list(qemu), output, duration=duration, until=until, linger=linger,
                  shift=shift)
    with stop_on_signals(cap.request_stop):
        r = cap.run()
    seen = f", {until!r} after {r.until_after_s:.3f} s" if r.until_after_s is not None else ""
    icount = f", log ends at icount {r.end_icount}" if r.end_icount is not None else ""
    click.echo(f"{r.run}: {r.duration_s:.3f} s recorded, {r.log_bytes} bytes of log, "
               f"ended by {r.ended_by}{seen}{icount}")
    if until and r.until_after_s is None:
        click.echo(f"xreplay: warning: {until!r} never appeared in the guest's output", err=True)


@rr.command("last-write")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("expr")
@click.option("--elf", type=click.Path(dir_okay=False, path_type=Path),
              help="Guest image with symbols (default: the run's -kernel ELF).")
@click.option("--before", type=int, metavar="SNAPSHOT", help="Last change before this "
              "snapshot of the recording taken from the run (default: before the log's end).")
@click.option("--xrr", "recording", type=click.Path(dir_okay=False, path_type=Path),
              help="Recording taken from the run (default: the newest record --from-rr).")
@click.option("--all", "every", is_flag=True, help="List every change, not only the last.")
@click.option("--timeout", type=click.FloatRange(1), default=300, show_default=True,
              help="Seconds a replay may take.")
@click.option("--gdb", default="gdb", show_default=True, help="gdb executable.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def last_write_command(run: Path, expr: str, elf: Path | None, before: int | None,
                       recording: Path | None, every: bool, timeout: float, gdb: str,
                       as_json: bool) -> None:
    """The instruction that last changed EXPR on the replay of RUN (two forward passes)."""
    from xreplay.rr.lastwrite import last_write

    res = last_write(run, expr, elf=elf, before=before, recording=recording, every=every,
                     gdb=gdb, timeout=timeout)
    if as_json:
        emit_json(res.to_json())
        return
    until = f"before snapshot #{before}" if before is not None else "before the log's end"
    if not res.writes:
        click.echo(f"{expr}: never changed {until} (value {res.initial} throughout)")
        return
    for w in res.writes:
        pc = f"{w.writer_pc:#x}" if w.writer_pc is not None else f"before {w.pc:#x}"
        when = f" ~{w.seconds:.3f} s into the recording" if w.seconds is not None else ""
        between = f", {w.between()}" if w.between() else ""
        click.echo(f"#{w.number}: {w.old} -> {w.new} at {pc} {w.where}, icount {w.icount}"
                   f"{when}{between}")
    if not every:
        for line in res.last.backtrace if res.last else []:
            click.echo(f"    {line}")
    click.echo(f"({len(res.writes)} shown; {res.seconds:.1f} s)", err=True)
