"""``xreplay replay`` and ``xreplay diff``: thin click layers over :mod:`xreplay.replay`.

Exit status (ruff's convention): 0 nothing found, 1 findings (replay: a non-info finding
or a port where the guest and Xen's 'e' key disagree; diff: a divergence or a
difference), 2 bad input, reported as one line on stderr.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from xreplay.errors import XReplayError
from xreplay.output import emit_json
from xreplay.replay.walk import Finding, ReplayOptions, ReplayResult
from xreplay.snapshot import Snapshot

_WRAP = 96
_TIMED = 50  # findings whose key snapshot is fetched to print its time


def _wrap(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, _WRAP, initial_indent=indent, subsequent_indent=indent)


def render_snapshot(snap: Snapshot, ports: list[int] | None = None, indent: str = "    ") -> str:
    """:meth:`Snapshot.render` with extra ports (a finding's) added to the 'e' table."""
    head = snap.render().split("\n    port [p/m/s]")[0]
    table = sorted(set(snap.interesting_ports()) | set(ports or []))
    lines = head.split("\n") + ["    port [p/m/s]"] + [p.render() for p in snap.port_table(table)]
    return "\n".join(indent + line for line in lines)


@contextlib.contextmanager
def stdin_file(path: Path, suffix: str) -> Iterator[Path]:
    """``path``, or for ``-`` standard input copied to a temporary file (a recording is
    read more than once)."""
    if str(path) != "-":
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="xreplay-stdin-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(sys.stdin.buffer, out)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


# --------------------------------------------------------------------------- replay


@click.command("replay")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--debugkeys", "dump", type=click.Path(dir_okay=False, allow_dash=True,
                                                    path_type=Path),
              help="Xen 'e' key output (xl debug-keys e; xl dmesg) to compare with the last "
              "snapshot, port by port.")
@click.option("--domain", type=int, help="Domain of the 'e' dump to use (default: the only "
              "one, or the only domU).")
@click.option("--shadow", metavar="REGION", help="Watch region with the guest's shadow of "
              "pending ports (default: one named like evtchn_callback_ml or shadow).")
@click.option("--no-shadow", is_flag=True, help="Ignore any shadow region.")
@click.option("--stall", type=click.FloatRange(0, min_open=True), default=1.0,
              show_default=True, help="Seconds a blocked vCPU may stay put while others run "
              "before it counts as hung.")
@click.option("--explain", "explain_range", metavar="FROM..TO", help="Also explain every bit "
              "change between snapshots FROM and TO: who may make it, and whether it is legal.")
@click.option("--tables", type=click.IntRange(0), default=5, show_default=True,
              help="Print the [p/m/s] table for the first N findings.")
@click.option("--no-info", is_flag=True, help="Leave out informational findings.")
@click.option("--no-last-writer", is_flag=True, help="On a recording taken on a replay "
              "(record --from-rr): do not replay the run again to name the last writer of "
              "each field the first error findings name.")
@click.option("--rr", "rr_run", type=click.Path(file_okay=False, path_type=Path),
              help="The run the recording was taken on, if it moved.")
def replay_command(file: Path, as_json: bool, dump: Path | None, domain: int | None,
                   shadow: str | None, no_shadow: bool, stall: float,
                   explain_range: str | None, tables: int, no_info: bool,
                   no_last_writer: bool, rr_run: Path | None) -> None:
    """Replay a recording through Xen's rules (2-level or FIFO, as recorded) and report lost
    event deliveries."""
    from xreplay.replay.diff import check_debugkeys, fetch, pick_domain
    from xreplay.replay.replayer import replay
    from xreplay.xrr import XrrReader

    options = ReplayOptions(shadow=shadow, use_shadow=not no_shadow,
                            stall_ns=int(stall * 1e9), info=not no_info)
    if str(file) == "-" and dump is not None and str(dump) == "-":
        raise XReplayError("replay - --debugkeys -: only one of them can come from stdin")
    check = None
    with stdin_file(file, ".xrr") as file, XrrReader(file) as reader:
        result = replay(reader, options)
        last_index = result.stats["last_snapshot"]
        want = {f.snapshot for f in _shown(result)[:max(tables, _TIMED)]}
        if dump is not None and last_index is not None:
            want.add(last_index)
        snaps = fetch(reader, want) if not as_json or dump is not None else {}
        if dump is not None:
            from xreplay import debugkeys

            if last_index is None:
                raise XReplayError(f"{file}: the recording has no snapshot to compare")
            dumps = (debugkeys.parse(sys.stdin.read(), "<stdin>") if str(dump) == "-"
                     else debugkeys.parse_file(dump))
            section = pick_domain(dumps, domain, str(dump))
            check = check_debugkeys(snaps[last_index], section)
        explained = histories = None
        if explain_range:
            from xreplay.inspect import parse_range
            from xreplay.replay.explain import explain_range as explain_rows

            explained, histories = explain_rows(reader, *parse_range(explain_range),
                                                result.findings)
        writers = None
        if reader.header.replay and not no_last_writer and result.failed:
            from xreplay.rr.writers import finding_writers

            writers = finding_writers(Path(file), result.findings, run=rr_run)
    incomplete = result.incomplete()
    if as_json:
        data: dict[str, Any] = {"file": str(file), **result.to_json(), "incomplete": incomplete}
        if check is not None:
            data["debugkeys"] = check.to_json()
        if explained is not None:
            data["explain"] = explained
            data["history"] = [hs.to_json() for hs in histories or []]
        if writers is not None:
            data["last_writers"] = [w.to_json() for w in writers]
        emit_json(data)
    else:
        _print_replay(str(file), result, snaps, tables, check, explained, histories)
        if writers:
            click.echo("\nlast writers (on a replay of the run):")
            for w in writers:
                click.echo(f"  {w.kind} at #{w.snapshot}: {w.render()}")
        for problem in result.stats["problems"]:
            click.echo(f"xreplay: warning: {problem}", err=True)
    if result.failed or (check is not None and not check.agree):
        if incomplete and not as_json:
            click.echo(f"xreplay: warning: {file}: {incomplete}", err=True)
        click.get_current_context().exit(1)
    if incomplete:
        # never a clean bill on data that was not read
        raise XReplayError(f"{file}: no verdict: {incomplete}")


def _shown(result: ReplayResult) -> list[Finding]:
    return [f for f in result.findings if f.severity != "info"]


def _print_replay(name: str, result: ReplayResult, snaps: dict[int, Snapshot], tables: int,
                  check: Any, explained: list[dict[str, Any]] | None,
                  histories: list[Any] | None = None) -> None:
    st = result.stats
    hits = ", ".join(f"{role} {n}" for role, n in sorted(st["hits"].items()))
    click.echo(f"{name}: {st['arch']} recording, {st['snapshots']} snapshots over "
               f"{st['duration_s']:.3f} s (vCPUs {', '.join(map(str, st['vcpus']))}); "
               f"probe hits: {hits or 'none'}"
               + (f"; shadow region {st['shadow']}" if st["shadow"] else ""))
    serious = _shown(result)
    for i, f in enumerate(serious):
        click.echo("")
        snap = snaps.get(f.snapshot)
        t0 = st.get("start_t_ns") or 0
        click.echo(_finding_head(f, None if snap is None else (snap.t_ns - t0) / 1e9))
        click.echo(_wrap(f.message))
        if i < tables and snap is not None:
            click.echo(f"  state at #{f.snapshot}:")
            click.echo(render_snapshot(snap, f.ports))
    notes = [f for f in result.findings if f.severity == "info"]
    if notes:
        click.echo("")
        for f in notes:
            click.echo(_wrap(f"note ({f.kind}): {f.message}", "").replace("\n", "\n  "))
    if explained is not None:
        click.echo("")
        for row in explained:
            click.echo(f"#{row['from']} -> #{row['to']} ({row['probe']}, vCPU {row['vcpu']}"
                       + (", quiet" if row["quiet"] else "") + "):")
            for text in row["text"] or ["no event-channel bit changed"]:
                click.echo(f"    {text}")
    for hs in histories or []:
        f = hs.finding
        click.echo("")
        click.echo(f"history of {f.kind} at #{f.snapshot} ({', '.join(hs.subjects)}):")
        if hs.earlier:
            click.echo(f"    ({hs.earlier} earlier change(s) in the range not shown)")
        rows = hs.rows
        for row in rows:
            click.echo(f"  #{row['from']} -> #{row['to']} ({row['probe']}"
                       + (", quiet" if row["quiet"] else "") + f"): {row['text']}")
        if not rows:
            click.echo("    none of its fields changed in the range")
    if check is not None:
        click.echo("")
        click.echo(f"Xen's 'e' key for domain {check.domain} vs the last snapshot "
                   f"(#{check.snapshot}):")
        for p in check.ports:
            label = f" ({p['label']})" if p["label"] else ""
            verdict = "agree" if p["agree"] else (
                "DISAGREE: " + (", ".join(p["fields"]) if p["fields"] else
                                f"only in the {p['only_in']}"))
            click.echo(f"  port {p['port']}{label}: guest {p['guest']}  Xen "
                       f"{p['xen'] or '-'}  {verdict}")
        click.echo("  the guest's view and Xen's agree" if check.agree else
                   "  the guest's view and Xen's DISAGREE (the recording may end before "
                   "the dump was taken, or the guest and Xen see different pages)")
    click.echo("")
    if serious:
        kinds = ", ".join(f"{k} x{n}" for k, n in _count(serious).items())
        dropped = sum(st["dropped"].values())
        click.echo(f"{len(serious)} finding(s): {kinds}"
                   + (f" ({dropped} more not stored)" if dropped else ""))
    elif result.incomplete():
        click.echo(f"no verdict: {result.incomplete()}")
    else:
        click.echo("no lost event delivery found")


def _count(findings: list[Finding]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in findings:
        out[f.kind] = out.get(f.kind, 0) + 1
    return out


def _finding_head(f: Finding, t: float | None = None) -> str:
    bits = [f"{f.kind} ({f.severity}) at #{f.snapshot}"
            + ("" if t is None else f" (t={t:.6f} s)")]
    if f.vcpu is not None:
        bits.append(f"vCPU {f.vcpu}")
    if f.upcall_snapshot is not None:
        bits.append(f"upcall #{f.upcall_snapshot}")
    if f.block_snapshot is not None:
        bits.append(f"block #{f.block_snapshot}")
    if f.fields:
        bits.append("fields " + ", ".join(f.fields))
    if f.ports:
        bits.append("ports " + ", ".join(map(str, f.ports[:16]))
                    + (" ..." if len(f.ports) > 16 else ""))
    return "; ".join(bits)


# --------------------------------------------------------------------------- diff


@click.command("diff")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--at", "at", nargs=2, type=int, metavar="N M", default=None,
              help="Compare snapshot N with snapshot M (of FILE, or N of A with M of B).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff_command(files: tuple[Path, ...], at: tuple[int, int] | None, as_json: bool) -> None:
    """Where does B's event handling depart from A's?  (A B, or FILE --at N M.)"""
    from xreplay.replay.diff import diff_recordings, diff_snapshots

    if at is not None:
        if len(files) not in (1, 2):
            raise XReplayError("diff --at N M takes one recording (or two: N of A, M of B)")
        sd = diff_snapshots(files[0], at[0], at[1], files[1] if len(files) == 2 else None)
        if as_json:
            emit_json(sd.to_json())
        else:
            click.echo(f"{sd.file}: #{at[0]} ({sd.state.a_probe}) vs #{at[1]} "
                       f"({sd.state.b_probe})")
            _print_state(sd.state, "#" + str(at[0]), "#" + str(at[1]))
            for t in sd.text:
                click.echo(f"  {t}")
            for name, n in sd.watch.items():
                click.echo(f"  watch {name}: {n} bytes differ")
            if sd.identical:
                click.echo("  identical")
        if not sd.identical:
            click.get_current_context().exit(1)
        return
    if len(files) != 2:
        raise XReplayError("diff takes two recordings A B (or one with --at N M)")
    result = diff_recordings(files[0], files[1])
    if as_json:
        emit_json(result.to_json())
    else:
        _print_diff(result)
    incomplete = result.incomplete
    if result.diverged:
        if incomplete and not as_json:
            click.echo(f"xreplay: warning: {incomplete}", err=True)
        click.get_current_context().exit(1)
    if incomplete:  # the same pattern in what was read says nothing of what was not
        raise XReplayError(f"no verdict: {incomplete}")


def _print_state(sd: Any, a: str = "A", b: str = "B", indent: str = "  ") -> None:
    from xreplay.abi.fifo import ready_queues

    for p in sd.ports:
        label = f" ({p['label']})" if p["label"] else ""
        fifo = ""
        if p.get("fields"):  # FIFO: which event-word fields, and the queues reached from
            queues = (f"; queue {a} {_or_none(p['a_queue'])} {b} {_or_none(p['b_queue'])}"
                      if "queue" in p["fields"] else "")
            fifo = f"  ({', '.join(f for f in p['fields'] if f != 'queue')}{queues})"
        click.echo(f"{indent}port {p['port']}{label}: {a} {p['a']}  {b} {p['b']}{fifo}")
    show = {"evtchn_pending_sel": hex, "control_block.ready": ready_queues}
    for v in sd.vcpus:
        x, y = ((show[v["field"]](z) if isinstance(z, int) and v["field"] in show else z)
                for z in (v["a"], v["b"]))
        click.echo(f"{indent}vcpu {v['vcpu']} {v['field']}: {a} {x}  {b} {y}")


def _or_none(q: int | None) -> str:
    return "none" if q is None else str(q)


def _print_diff(r: Any) -> None:
    for side, name in (("a", r.a), ("b", r.b)):
        st, pat = r.stats[side], r.patterns[side]
        kinds = ", ".join(f"{k} x{n}" for k, n in st["findings"].items()) or "no findings"
        follow = ", ".join(f"{k} {n}" for k, n in pat.followups.most_common()) or "-"
        click.echo(f"{side.upper()}: {name} ({st['arch']}, {st['snapshots']} snapshots; "
                   f"{kinds}); upcalls {pat.upcalls}, followed by: {follow}")
    if not r.divergences:
        click.echo("no divergence: the two recordings handle events in the same pattern"
                   + (" as far as both were read (see below)" if r.incomplete else ""))
    from xreplay.replay.diff import context_text

    for i, d in enumerate(r.divergences):
        click.echo("")
        click.echo(_wrap(("first divergence: " if i == 0 else "also: ") + d.message, ""))
        me, them = d.side.upper(), "A" if d.side == "b" else "B"
        click.echo(f"  {me}: {context_text(d.seen)}")
        if d.match is not None:
            click.echo(f"  {them}: {context_text(d.match)}")
    for rest in r.rest:  # FIFO: what one holds at rest and the other never does
        click.echo("")
        click.echo(_wrap("FIFO state at rest: " + rest.message, ""))
    if r.aligned:
        click.echo("")
        click.echo("state at aligned points:")
    for sd in r.aligned:
        click.echo(f"  {sd.label}: A #{sd.a_snapshot} ({sd.a_probe}) vs B #{sd.b_snapshot} "
                   f"({sd.b_probe})" + (": same ports and vCPU fields" if sd.identical else ""))
        _print_state(sd, indent="    ")
