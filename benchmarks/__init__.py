"""xreplay's benchmarks: ``python -m benchmarks [NAME ...]``.

A benchmark registers itself with :func:`register` under a name; ``__main__`` imports the
modules in :data:`MODULES` and runs the selected ones.  The helpers here (interleaved runs,
medians, the ratio table) are shared so every benchmark reports the same way: methods
compared in one run against the same target, each ratio against a baseline measured in
that same run, because absolute rates on a shared VM drift from one minute to the next.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MODULES = ("benchmarks.record_bench", "benchmarks.replay_bench", "benchmarks.gdbsx_bench",
           "benchmarks.fuzz", "benchmarks.rr_bench")


@dataclass
class BenchArgs:
    """What the command line gives every benchmark (``hits`` None = the benchmark's default)."""

    hits: int | None = None
    runs: int = 3
    verbose: bool = False


@dataclass
class Benchmark:
    name: str
    help: str
    run: Callable[[BenchArgs], bool]  # returns True when every stored result verified
    default: bool = True  # part of a run that names no benchmark


BENCHMARKS: dict[str, Benchmark] = {}


def register(name: str, help: str, *, default: bool = True
             ) -> Callable[[Callable[[BenchArgs], bool]], Callable[[BenchArgs], bool]]:
    """Decorator: make ``fn(args) -> ok`` runnable as ``python -m benchmarks NAME``
    (and, with ``default``, by a bare ``python -m benchmarks``)."""

    def deco(fn: Callable[[BenchArgs], bool]) -> Callable[[BenchArgs], bool]:
        BENCHMARKS[name] = Benchmark(name, help, fn, default)
        return fn

    return deco


@dataclass
class Measurement:
    """One run of one method: ``hits`` snapshots stored in ``seconds`` (timed span only)."""

    hits: int
    seconds: float
    verified: bool
    wall: float = 0.0  # the whole run including start-up (spawning gdb, connecting, ...)
    note: str = ""
    packets: float | None = None  # remote-protocol packets sent per hit, when counted

    @property
    def rate(self) -> float:
        return self.hits / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Method:
    """A named way of doing the benchmarked job; ``run(hits)`` does one timed run."""

    name: str
    short: str  # used in ratio labels, e.g. "xreplay/raw"
    hits: int
    run: Callable[[int], Measurement]
    results: list[Measurement] = field(default_factory=list)

    #: packets per hit measured apart (gdb's, through a counting relay), when not per run
    packets: float | None = None

    def packets_per_hit(self) -> float | None:
        counted = [x.packets for x in self.results if x.packets is not None]
        return statistics.median(counted) if counted else self.packets

    def median_rate(self) -> float:
        ok = [m.rate for m in self.results if m.verified and m.hits]
        return statistics.median(ok) if ok else 0.0


def run_interleaved(methods: Sequence[Method], runs: int,
                    log: Callable[[str], None] = print) -> None:
    """Run 1 of every method, then run 2 of every method, ...: host noise hits all alike.

    A run that raises is recorded as an unverified zero so one flaky method does not end
    the comparison.
    """
    for r in range(runs):
        for m in methods:
            try:
                res = m.run(m.hits)
            except Exception as e:  # noqa: BLE001 - reported in the table, run goes on
                res = Measurement(0, 0.0, False, note=f"{type(e).__name__}: {e}")
            m.results.append(res)
            state = "verified" if res.verified else f"NOT verified {res.note}".rstrip()
            log(f"  run {r + 1}/{runs} {m.name:<22} {res.hits:>6} hits "
                f"{res.rate:9.1f}/s  wall {res.wall:5.2f} s  {state}")


def table(methods: Sequence[Method], baseline: str, title: str = "") -> str:
    """Markdown table: median/min/max snapshots/s and ratios against ``baseline``'s median."""
    base = next((m for m in methods if m.name == baseline), None)
    base_rate = base.median_rate() if base else 0.0
    head = ("| method | hits/run | runs verified | median /s | min /s | max /s "
            "| median wall s | packets/hit | ratio (same run) |")
    lines = [title] if title else []
    lines += [head, "|" + "---|" * 9]
    for m in methods:
        ok = [x for x in m.results if x.verified and x.hits]
        rates = [x.rate for x in ok]
        med = m.median_rate()
        walls = [x.wall for x in m.results if x.wall]
        ratio = (f"{m.short}/{base.short} = {med / base_rate:.3g}"
                 if base and base_rate and med else "-")
        pk = m.packets_per_hit()
        lines.append(
            f"| {m.name} | {m.hits} | {len(ok)}/{len(m.results)} | {med:.1f} "
            f"| {min(rates, default=0):.1f} | {max(rates, default=0):.1f} "
            f"| {statistics.median(walls) if walls else 0:.2f} "
            f"| {'-' if pk is None else f'{pk:.2f}'} | {ratio} |")
    notes = sorted({x.note for m in methods for x in m.results if x.note})
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)
