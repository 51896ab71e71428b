"""``python -m benchmarks [NAME ...] [--hits N] [--runs R] [--only NAME] [--cpus LIST]``.

With no name, every default benchmark runs (all but ``fuzz``, which ``make fuzz`` runs).
Exit status 1 if any stored result failed verification, so a CI job can run this without
reading the table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from benchmarks import BENCHMARKS, MODULES, BenchArgs


def main(argv: list[str] | None = None) -> int:
    for mod in MODULES:
        importlib.import_module(mod)
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="benchmarks to run: " + ", ".join(
                       f"{b.name} ({b.help})" for b in BENCHMARKS.values()))
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this benchmark (repeatable; same as naming it)")
    p.add_argument("--hits", type=int, default=None, metavar="N",
                   help="hits per run for the fast methods (slow ones get fewer)")
    p.add_argument("--runs", type=int, default=3, metavar="R",
                   help="runs per method, interleaved; the table shows medians (default 3)")
    p.add_argument("--cpus", default=None, metavar="LIST",
                   help="pin this process and every process it starts to these CPUs, e.g. 0 "
                   "(a stub and its client on one CPU skip the cross-CPU wake-up, which on a "
                   "small VM can halve a ping-pong rate; unpinned, the scheduler decides)")
    a = p.parse_args(argv)
    if a.cpus is not None:
        try:
            cpus = {int(c) for c in a.cpus.split(",") if c.strip()}
            os.sched_setaffinity(0, cpus)  # inherited by gdb, gdbserver and the target
        except (ValueError, OSError) as e:
            p.error(f"--cpus {a.cpus}: {e}")
    names = [*a.names, *a.only] or [n for n, b in BENCHMARKS.items() if b.default]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if a.hits is not None and a.hits < 1 or a.runs < 1:
        p.error("--hits and --runs must be at least 1")
    ok = True
    for name in names:
        ok = BENCHMARKS[name].run(BenchArgs(hits=a.hits, runs=a.runs)) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
