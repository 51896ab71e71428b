"""The ``xreplay`` command: a thin click shell over the library.

Exit codes, as scripts expect (ruff's convention): 0 fine, 1 findings (replay/diff),
2 bad input or environment, reported as one line on stderr (``record`` adds its end
reasons, 130 is Ctrl-C).  A bug in xreplay (an exception that is not an
:class:`XReplayError`) is also exit 2, with one line asking for a report, so that a crash
is never mistaken for findings.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from xreplay import __version__
from xreplay.errors import RecordingFormatError, XReplayError
from xreplay.output import emit_json
from xreplay.profiles.presets import PROFILE_NAMES

BUG_REPORT_HINT = ("this is a bug in xreplay: please report it with the command line and "
                   "the input file (XREPLAY_DEBUG=1 prints the traceback)")


class XReplayGroup(click.Group):
    """Turns :class:`XReplayError` into one line on stderr and exit status 2; so too any
    other exception (a bug), with a request to report it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except XReplayError as e:
            click.echo(f"xreplay: error: {e}", err=True)
            ctx.exit(2)
        except BrokenPipeError:
            ctx.exit(0)
        except KeyboardInterrupt:
            click.echo("xreplay: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the last guard: exit 2, never a traceback
            if os.environ.get("XREPLAY_DEBUG"):
                raise
            text = str(e).splitlines()[0][:200] if str(e) else ""
            click.echo(f"xreplay: internal error: {type(e).__name__}"
                       f"{': ' + text if text else ''}; {BUG_REPORT_HINT}", err=True)
            ctx.exit(2)


@click.group(cls=XReplayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xreplay")
def main() -> None:
    """Record and replay Xen event-channel state; find the missed clear."""


@main.command()
@click.option("--arch", "arch", required=True, help="x86_64, x86_32, arm64 or arm32.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def layout(arch: str, as_json: bool) -> None:
    """Print shared_info / vcpu_info field offsets and sizes for a guest ABI."""
    from xreplay.abi import layout as get_layout

    desc = get_layout(arch).describe()
    if as_json:
        emit_json(desc)
        return
    click.echo(f"arch {desc['arch']}: {desc['bits_per_word']}-bit selector words, "
               f"{desc['nr_ports']} ports, {desc['legacy_max_vcpus']} legacy vcpu_info slots")
    for name, st in desc["structs"].items():
        click.echo(f"\nstruct {name}  (size {st['size']})")
        for field, fo in st["fields"].items():
            click.echo(f"  {fo['offset']:6d}  {fo['size']:5d}  {field}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--at", "at", type=int, default=None, help="Show snapshot number N (-1: the "
              "last, -2 the one before ...).")
@click.option("--changes", "changes_range", default=None, metavar="FROM..TO",
              help="List the bits that changed between consecutive snapshots in the range.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(file: Path, at: int | None, changes_range: str | None, as_json: bool) -> None:
    """Summarise a recording, or show one snapshot, or the changes across a range."""
    from xreplay import inspect
    from xreplay.xrr import XrrReader

    if at is not None and changes_range is not None:
        raise XReplayError("--at and --changes are two views: give one of them")
    with XrrReader(file) as reader:
        stopped = None
        if at is not None:
            snap = inspect.snapshot_at(reader, at)
            # taken on a replay (record --from-rr): the guest position too
            icount = reader.guest_times().get(at) if reader.header.replay else None
            if as_json:
                emit_json({**snap.to_json(), **({"icount": icount} if icount is not None
                                                 else {})})
            else:
                click.echo(snap.render())
                if icount is not None:
                    click.echo(f"  guest position: icount {icount} (replay of "
                               f"{reader.header.replay.get('run')})")
        elif changes_range is not None:
            lo, hi = inspect.parse_range(changes_range)
            rows: list[dict[str, Any]] = []
            try:
                for row in inspect.iter_changes(reader, lo, hi):
                    if as_json:
                        rows.append(row)
                        continue
                    head = f"#{row['from']} -> #{row['to']} ({row['probe']}, vcpu {row['vcpu']})"
                    body = "; ".join(row["text"]) or "no event-channel bit changed"
                    watch = "".join(f"; {k}: {n} bytes" for k, n in row["watch"].items())
                    click.echo(f"{head}: {body}{watch}")
            except RecordingFormatError as e:
                stopped = e
            if as_json:
                emit_json({"file": str(file), "changes": rows,
                           **({"stopped": {"offset": stopped.offset, "message": str(stopped)}}
                              if stopped else {})})
        else:
            s = inspect.summary(reader)
            first, last, stopped = s.pop("_first"), s.pop("_last"), s.pop("_stopped")
            if as_json:
                emit_json(s)
            else:
                _print_summary(s, first, last)
        for problem in reader.problems:
            click.echo(f"xreplay: warning: {problem}", err=True)
        if stopped is not None:
            raise stopped  # after what was read: the error line, exit 2


def _print_summary(s: dict[str, Any], first: Any, last: Any) -> None:
    target = s["target"].get("description") or s["target"].get("address") or "-"
    click.echo(f"{s['file']}: {s['arch']} recording of {target}")
    click.echo(f"  created {s['created']} by {s['tool']}; "
               f"{'closed cleanly' if s['closed_cleanly'] else 'NOT closed cleanly'}")
    click.echo(f"  {s['snapshots']} snapshots over {s['duration_s']:.3f} s"
               + (f", {s['hang_snapshots']} taken at a hang" if s["hang_snapshots"] else ""))
    if s.get("stopped"):
        click.echo(f"  READ STOPPED at byte {s['stopped']['offset']}: damage; the summary "
                   "covers the snapshots before it")
    for p in s["probes"]:
        click.echo(f"  probe {p['name']:<12} {p['role']:<12} {p['hits']:>8} hits  "
                   f"at {p['location']}")
    if s["labels"]:
        click.echo("  labels " + ", ".join(f"{k}={v}" for k, v in s["labels"].items()))
    for name, u in s["unreadable"].items():
        listed = ", ".join(f"#{i}" for i in u["first"])
        more = ", ..." if u["snapshots"] > len(u["first"]) else ""
        click.echo(f"  UNREADABLE {name} in {u['snapshots']} of {s['snapshots']} snapshots: "
                   f"{listed}{more}")
    for note in s["notes"]:
        click.echo(f"  note after #{note.get('after')}: {note.get('event')}")
    if first is not None:
        click.echo("\nfirst snapshot:")
        click.echo(first.render())
    if last is not None and last is not first:
        click.echo("\nlast snapshot:")
        click.echo(last.render())


def _parse_kv(values: tuple[str, ...], what: str, key_int: bool = True) -> dict:
    out: dict = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key or not value:
            raise XReplayError(f"bad {what} {text!r}: write KEY=VALUE")
        if key_int:
            try:
                out[int(key, 0)] = value
            except ValueError:
                raise XReplayError(f"bad {what} {text!r}: {key!r} is not a number") from None
        else:
            out[key] = value
    return out


def _parse_int_map(values: tuple[str, ...], what: str) -> dict[int, int]:
    out = {}
    for key, value in _parse_kv(values, what).items():
        try:
            out[key] = int(value, 0)
        except ValueError:
            raise XReplayError(f"bad {what} {key}={value!r}: {value!r} is not a number") from None
    return out


def _record_epilog() -> str:
    from xreplay.record import EXIT_HELP

    return EXIT_HELP


@main.command(epilog=_record_epilog())
@click.option("--target", help="HOST:PORT of a gdbstub (gdbserver, QEMU -gdb, gdbsx).")
@click.option("--launch", help="Command that starts the target's gdbstub (then --target "
              "attaches to it); its output goes to FILE.launch.log; stopped by its PID at "
              "the end unless --detach.")
@click.option("--elf", type=click.Path(dir_okay=False, path_type=Path),
              help="Guest image with symbols.")
@click.option("--arch", default=None, help="Guest ABI of shared_info: x86_64, x86_32, arm64, "
              "arm32 [default: from --elf, else from the stub].")
@click.option("--profile", type=click.Choice(PROFILE_NAMES), help="Probes, shared_info and "
              "shadow of a kind of guest (solo5, mirage, minios, linux with --symbols, "
              "xreplay-lab); each option below overrides its part.")
@click.option("--upcall", "upcall", help="Location of the upcall (interrupt top half).")
@click.option("--bottom-half", "bottom_half", help="Location of the bottom half (demux).")
@click.option("--block", "block", help="Location where the vCPU blocks (hlt / SCHEDOP_block).")
@click.option("--probe", "extra_probes", multiple=True, metavar="NAME=LOCATION",
              help="Another probe (repeatable).")
@click.option("--shared-info", "shared_info", default=None, help="Address or gdb expression "
              "of shared_info: a pointer variable (followed at every hit), the object or "
              "page itself, or a run-time address [default: HYPERVISOR_shared_info].")
@click.option("--vcpu-info", "vcpu_info", multiple=True, metavar="[VCPU=]EXPR",
              help="Where a vCPU's registered vcpu_info lives (repeatable).")
@click.option("--fifo-control-block", "fifo_control_block", multiple=True,
              metavar="[VCPU=]EXPR", help="FIFO ABI guest: where a vCPU's "
              "evtchn_fifo_control_block lives (repeatable; with --fifo-event-page).")
@click.option("--fifo-event-page", "fifo_event_page", multiple=True, metavar="EXPR",
              help="FIFO ABI guest: one event-array page in use, in page order "
              "(repeatable; only the pages the guest gave Xen, or, with "
              "--fifo-page-count, every page the run may follow).")
@click.option("--fifo-page-count", "fifo_page_count", default=None, metavar="EXPR",
              help="FIFO ABI guest: address of the guest's count of event-array pages in "
              "use (an unsigned int, Linux's event_array_pages), read at every hit: each "
              "--fifo-event-page is read from the hit where the count covers it.")
@click.option("--watch", multiple=True, metavar="NAME=EXPR[:LEN]",
              help="Extra guest memory stored with each snapshot (repeatable; quote it: "
              "'shadow=&evtchn_callback_ml').")
@click.option("--label", multiple=True, metavar="PORT=NAME", help="Name a port (repeatable).")
@click.option("--bind", multiple=True, metavar="PORT=VCPU", help="A port's notify vCPU "
              "(Xen's n=, see lsevtchn; default 0; repeatable).")
@click.option("--vcpus", default=None, help="vCPUs to decode, e.g. 0,1 [default: 0].")
@click.option("--count", type=click.IntRange(1), help="Stop after N snapshots.")
@click.option("--duration", type=click.FloatRange(0, min_open=True), help="Stop after S s.")
@click.option("--hang-after", "hang_after", type=click.FloatRange(0, min_open=True),
              help="No probe hit for S s: interrupt, take a hang snapshot, stop.")
@click.option("--kill/--detach", "kill_target", default=None,
              help="At the end, kill the target or detach and let it run on (default: kill "
              "what --launch started, detach from anything else).")
@click.option("--dedupe/--no-dedupe", default=None,
              help="Drop exact repeated hits (default: on for QEMU's stub).")
@click.option("--qemu", "is_qemu", is_flag=True, help="Treat the stub as QEMU's even if it "
              "does not say so (QEMU is recognised by itself).")
@click.option("--filter", "filter_expr", help="gdb expression: record a hit only where it is "
              "true (whole-machine stubs); other hits are resumed and counted.")
@click.option("--vcpu-expr", "vcpu_expr", help="gdb expression giving the guest's vCPU id at a "
              "hit (default: gdb's thread, i.e. QEMU's physical CPU).")
@click.option("--symbols", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="System.map or /proc/kallsyms of a Linux guest: probes, shared_info and "
              "each vCPU's live vcpu_info from it (no debug info needed).")
@click.option("--domain", type=click.Choice(["dom0", "domu"]), help="With --symbols on a "
              "whole-machine stub (QEMU): record only this domain's hits.")
@click.option("--no-guest-check", "no_guest_check", is_flag=True, help="With --symbols: do "
              "not stop once in the guest first (ABI and domain-type check, port labels).")
@click.option("--gdb", default="gdb", show_default=True, help="gdb executable.")
@click.option("--hit-loop", "hit_loop",
              type=click.Choice(["auto", "agent", "direct", "trace"]),
              default="auto", show_default=True, help="Who snapshots each hit: auto (the "
              "recorder speaks the remote protocol itself once gdb has resolved every address, "
              "on gdbserver and on QEMU with regions at fixed addresses, unless --filter, "
              "--vcpu-expr or a re-evaluated region need gdb at each hit; else the in-gdb "
              "agent, and the output says why), agent, direct (refuse otherwise), or trace "
              "(gdbserver's tracepoints collect each hit inside gdbserver, fetched in batches; "
              "one thread, regions at fixed addresses; hangs judged per batch).")
@click.option("--from-rr", "from_rr", type=click.Path(file_okay=False, path_type=Path),
              help="Take the snapshots on a replay of this 'xreplay rr record' run instead "
              "of a live target (its QEMU gdbstub; --elf defaults to its -kernel ELF).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True,
                                                path_type=Path),
              required=True, help="Recording file to write (created once set-up succeeded).")
def record(target: str | None, launch: str | None, elf: Path | None, arch: str | None,
           profile: str | None, upcall: str | None, bottom_half: str | None,
           block: str | None, extra_probes: tuple[str, ...], shared_info: str | None,
           vcpu_info: tuple[str, ...], fifo_control_block: tuple[str, ...],
           fifo_event_page: tuple[str, ...], fifo_page_count: str | None,
           watch: tuple[str, ...], label: tuple[str, ...],
           bind: tuple[str, ...], vcpus: str | None, count: int | None,
           duration: float | None, hang_after: float | None, kill_target: bool | None,
           dedupe: bool | None, is_qemu: bool, filter_expr: str | None, vcpu_expr: str | None,
           symbols: Path | None, domain: str | None, no_guest_check: bool, gdb: str,
           hit_loop: str, from_rr: Path | None, output: Path) -> None:
    """Record a live guest's event-channel state at its upcall, bottom half and block."""
    from xreplay.paths import check_output
    from xreplay.record.build import RecordChoices, build_options

    check_output(output)
    choices = RecordChoices(
        output=output, target=target, launch=launch, elf=elf, arch=arch, profile=profile,
        upcall=upcall, bottom_half=bottom_half, block=block,
        probes=_parse_kv(extra_probes, "--probe", key_int=False), shared_info=shared_info,
        vcpu_info=list(vcpu_info), fifo_control_block=list(fifo_control_block),
        fifo_event_pages=list(fifo_event_page), fifo_page_count=fifo_page_count,
        watch=list(watch),
        labels=_parse_kv(label, "--label"),
        notify=_parse_int_map(bind, "--bind"), vcpus=vcpus, count=count, duration=duration,
        hang_after=hang_after, kill_target=kill_target, dedupe=dedupe, qemu=is_qemu,
        filter=filter_expr, vcpu_expr=vcpu_expr, symbols=symbols, domain=domain,
        guest_check=not no_guest_check, gdb=gdb, hit_loop=hit_loop)
    if from_rr is not None:
        from xreplay.rr.launcher import record_from_rr

        result = record_from_rr(from_rr, build_options(choices), run_recorder)
    else:
        result = run_recorder(build_options(choices))
    _print_record_result(result)
    click.get_current_context().exit(result.exit_code)


def run_recorder(options: Any) -> Any:
    """Run a :class:`~xreplay.record.Recorder` with Ctrl-C/SIGTERM handling and progress."""
    from xreplay.record import Recorder
    from xreplay.signals import stop_on_signals

    live = sys.stderr.isatty()

    def progress(p: Any) -> None:
        rate = p.snapshots / p.elapsed if p.elapsed else 0.0
        click.echo(f"\r{p.snapshots} snapshots  {rate:7.0f}/s  last {p.last_probe or '-':<12}"
                   f"  {p.elapsed:6.1f} s", nl=False, err=True)

    rec = Recorder(options, on_progress=progress if live else None)
    try:
        with stop_on_signals(rec.request_stop):
            result = rec.run()
    finally:
        if live:
            click.echo("", err=True)
    return result


def _print_record_result(r: Any) -> None:
    extra = ""
    if r.duplicates:
        extra += f", {r.duplicates} duplicate hits dropped"
    if r.foreign:
        extra += f", {r.foreign} hits of other domains skipped"
    if r.signal:
        extra += f" ({r.signal})"
    how = "direct RSP loop" if r.hit_loop.startswith("direct") else "gdb agent"
    if "tracepoints" in r.hit_loop:
        how = "gdbserver tracepoint loop"
    if r.hit_loop_why and not r.hit_loop.startswith("direct"):
        how += f": {r.hit_loop_why}"
    stub = f" through {r.stub} ({how})" if r.stub else ""
    click.echo(f"{r.output}: {r.snapshots} snapshots in {r.elapsed:.2f} s "
               f"({r.rate:.0f}/s){stub}, {r.arch or '?'} ABI, ended by {r.reason}{extra}")
    if r.message:
        click.echo(f"xreplay: error: {r.message}", err=True)
    for region, n in sorted(r.unreadable.items()):
        click.echo(f"xreplay: warning: {region} could not be read in {n} of {r.snapshots} "
                   "snapshots (xreplay show lists them)", err=True)
    if r.snapshots and not r.readable_shared_info:
        click.echo("xreplay: error: no snapshot could read shared_info: check --shared-info "
                   "(a pointer that is never set, a wrong address, another domain's page)",
                   err=True)
    if r.filter_errors:
        click.echo(f"xreplay: warning: gdb could not evaluate --filter at {r.filter_errors} "
                   "hits (counted as other domains')", err=True)
    if r.unstable_reads:
        click.echo(f"xreplay: warning: at {r.unstable_reads} hits the regions kept changing "
                   "between read passes (Xen delivering events while gdbsx held the domain): "
                   "those snapshots may mix two moments; a finding there wants a second "
                   "recording", err=True)
    if r.hang_snapshot is not None:
        click.echo(f"hang snapshot: #{r.hang_snapshot} (xreplay show {r.output} --at "
                   f"{r.hang_snapshot})")
    if r.launch_log is not None:
        click.echo(f"launched target's output: {r.launch_log}")


@main.command()
@click.argument("source", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--strict", is_flag=True, help="A malformed port line is an error.")
def debugkeys(source: str, as_json: bool, strict: bool) -> None:
    """Parse Xen's 'e' debug-key output (xl debug-keys e; xl dmesg) from FILE or -."""
    from xreplay import debugkeys as dk

    if source == "-":
        dumps = dk.parse(sys.stdin.read(), "<stdin>", strict=strict)
    else:
        try:
            dumps = dk.parse_file(source, strict=strict)
        except OSError as e:
            raise XReplayError(f"{source}: cannot read ({e.strerror})") from None
    if as_json:
        emit_json(dk.to_json(dumps))
        return
    for d in dumps:
        click.echo(d.render(prefix=""))
        stuck = d.pending_unmasked()
        if stuck:
            click.echo(f"  -> domain {d.domid}: pending and unmasked: "
                       + ", ".join(f"{p.port} {p.pms}" for p in stuck))
        for w in d.warnings:
            click.echo(f"xreplay: warning: {source}: {w}", err=True)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["vcd", "chrome"]), default="vcd",
              show_default=True, help="vcd: waveform viewers (GTKWave, Surfer); chrome: "
              "Perfetto / chrome://tracing.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
              default="-", show_default=True, help="Output file.")
def export(file: Path, fmt: str, output: str) -> None:
    """Export a recording for a viewer."""
    from xreplay.export import FORMATS
    from xreplay.xrr import XrrReader

    with XrrReader(file):  # validate before creating the output
        pass
    if output != "-":
        from xreplay.paths import check_output

        check_output(output)
    if output == "-":
        n = FORMATS[fmt](file, sys.stdout)
        return
    n = _export_atomically(FORMATS[fmt], file, Path(output))
    click.echo(f"{output}: {n} snapshots as {fmt}", err=True)


def _export_atomically(exporter: Any, file: Path, output: Path) -> int:
    """Export into a temporary file beside ``output`` and rename it into place: a failure
    (damage in the recording, a full disk) leaves no output rather than a cut one."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp",
                                   dir=output.parent if str(output.parent) else ".")
    except OSError as e:
        raise XReplayError(f"{output}: cannot create the output ({e.strerror})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        with os.fdopen(fd, "w") as f:
            n = exporter(file, f)
        os.replace(tmp, output)
    except OSError as e:
        _unlink(tmp)
        raise XReplayError(f"{output}: cannot write the output ({e.strerror}); nothing "
                           "was left behind") from None
    except BaseException:
        _unlink(tmp)
        raise
    return n


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("xreplay-demo"), show_default=True, help="Where the recordings go.")
@click.option("--variant", type=click.Choice(["correct", "lost-upcall", "unmask-no-reraise",
                                              "ffs-off-by-one", "fifo", "fifo-lost-link"]),
              default="lost-upcall", show_default=True, help="Which lab guest bug to record.")
@click.option("--target", "kinds", multiple=True, type=click.Choice(["process", "baremetal"]),
              help="gdbserver (process) and/or QEMU (baremetal); default: both if QEMU exists.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--events", type=click.IntRange(1), default=2000, show_default=True,
              help="Events the guest's schedule raises.")
def demo(out_dir: Path, variant: str, kinds: tuple[str, ...], seed: int, events: int) -> None:
    """Record the bundled lab guest until it hangs, then show and replay the recording."""
    from xreplay import inspect
    from xreplay.demo import run_demo
    from xreplay.replay import replay as replay_recording
    from xreplay.xrr import XrrReader

    for run in run_demo(out_dir, list(kinds) or None, variant, seed, events, say=click.echo):
        _print_record_result(run.result)
        with XrrReader(run.output) as reader:
            s = inspect.summary(reader)
            first, last, _ = s.pop("_first"), s.pop("_last"), s.pop("_stopped")
            _print_summary(s, first, last)
        result = replay_recording(run.output)
        click.echo(f"\n== verdict (xreplay replay {run.output})")
        serious = [f for f in result.findings if f.severity != "info"]
        if not serious:
            why = result.incomplete()
            click.echo(f"no verdict: {why}" if why else "no lost event delivery found")
        for f in serious:
            click.echo(f"{f.kind} at #{f.snapshot}: {f.message}")
        click.echo("")


def _register_subsystems() -> None:
    """Command groups that live beside their library (lab, replay) join the main CLI."""
    from xreplay.lab.xen.commands import lab
    from xreplay.replay.commands import diff_command, replay_command
    from xreplay.rr.commands import rr

    main.add_command(rr)
    main.add_command(lab)
    main.add_command(replay_command)
    main.add_command(diff_command)


_register_subsystems()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
