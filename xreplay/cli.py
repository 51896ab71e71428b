"""The ``xreplay`` command: a thin click shell over the library.

Exit codes, as scripts expect (ruff's convention): 0 fine, 1 findings (replay/diff),
2 bad input or environment, reported as one line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from xreplay import __version__
from xreplay.errors import XReplayError


class XReplayGroup(click.Group):
    """Turns :class:`XReplayError` into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except XReplayError as e:
            click.echo(f"xreplay: error: {e}", err=True)
            ctx.exit(2)
        except BrokenPipeError:
            ctx.exit(0)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


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
@click.option("--at", "at", type=int, default=None, help="Show snapshot number N.")
@click.option("--changes", "changes_range", default=None, metavar="FROM..TO",
              help="List the bits that changed between consecutive snapshots in the range.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(file: Path, at: int | None, changes_range: str | None, as_json: bool) -> None:
    """Summarise a recording, or show one snapshot, or the changes across a range."""
    from xreplay import inspect
    from xreplay.xrr import XrrReader

    with XrrReader(file) as reader:
        if at is not None:
            snap = reader.snapshot(at)
            if as_json:
                emit_json(snap.to_json())
            else:
                click.echo(snap.render())
        elif changes_range is not None:
            lo, hi = inspect.parse_range(changes_range)
            rows = inspect.changes(reader, lo, hi)
            if as_json:
                emit_json({"file": str(file), "changes": rows})
            else:
                for row in rows:
                    head = f"#{row['from']} -> #{row['to']} ({row['probe']}, vcpu {row['vcpu']})"
                    body = "; ".join(row["text"]) or "no event-channel bit changed"
                    watch = "".join(f"; {k}: {n} bytes" for k, n in row["watch"].items())
                    click.echo(f"{head}: {body}{watch}")
        else:
            s = inspect.summary(reader)
            first, last = s.pop("_first"), s.pop("_last")
            if as_json:
                emit_json(s)
            else:
                _print_summary(s, first, last)
        for problem in reader.problems:
            click.echo(f"xreplay: warning: {problem}", err=True)


def _print_summary(s: dict[str, Any], first: Any, last: Any) -> None:
    target = s["target"].get("description") or s["target"].get("address") or "-"
    click.echo(f"{s['file']}: {s['arch']} recording of {target}")
    click.echo(f"  created {s['created']} by {s['tool']}; "
               f"{'closed cleanly' if s['closed_cleanly'] else 'NOT closed cleanly'}")
    click.echo(f"  {s['snapshots']} snapshots over {s['duration_s']:.3f} s"
               + (f", {s['hang_snapshots']} taken at a hang" if s["hang_snapshots"] else ""))
    for p in s["probes"]:
        click.echo(f"  probe {p['name']:<12} {p['role']:<12} {p['hits']:>8} hits  "
                   f"at {p['location']}")
    if s["labels"]:
        click.echo("  labels " + ", ".join(f"{k}={v}" for k, v in s["labels"].items()))
    for note in s["notes"]:
        click.echo(f"  note after #{note.get('after')}: {note.get('event')}")
    if first is not None:
        click.echo("\nfirst snapshot:")
        click.echo(first.render())
    if last is not None and last is not first:
        click.echo("\nlast snapshot:")
        click.echo(last.render())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
