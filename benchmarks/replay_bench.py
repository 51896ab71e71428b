"""Replay speed and memory: replaying a recording vs only reading and decoding it.

A synthetic lab-like recording (block -> upcall -> bottom half episodes on a few ports,
x86_64, with a shadow watch region) is written once per size, outside the timed span.  Each
method then runs in a fresh Python process, so its peak RSS is its own:

* ``read``   — frames, checksums and region deltas, each snapshot's regions rebuilt as
  bytes (``XrrReader.records``);
* ``decode`` — the above plus decoding every snapshot (``XrrReader.snapshots``);
* ``replay`` — the deltas straight into the 2-level model and every detector
  (``xreplay.replay``: fields decoded only where a delta wrote).

Rates are per CPU second of each child (``time.process_time``: on a shared machine wall
time mostly measures the neighbours; wall seconds are shown too).  Ratios are against
``read`` measured in the same run (issue 13: replay >= 0.5x read); the
peak RSS of ``replay`` at the full size and at a tenth of it shows whether memory stays
constant.  Then bytes per snapshot: the synthetic recording in the current format and in
1.0, and every recording in ``recordings/`` as stored (1.0) and rewritten in the current
format (the lab workload; issue 13's goal is <= 32).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import BenchArgs, Measurement, Method, register, run_interleaved, table

DEFAULT_SNAPSHOTS = 200_000
_CACHE = Path(tempfile.gettempdir()) / "xreplay-bench"
_RECORDINGS = Path(__file__).parent.parent / "recordings"

_CHILD = r"""
import json, resource, sys, time
from xreplay.xrr import XrrReader
from xreplay.replay import replay
path, method = sys.argv[1], sys.argv[2]
t, c = time.perf_counter(), time.process_time()
if method == "read":
    with XrrReader(path) as r:
        n = sum(1 for _ in r.records())
elif method == "decode":
    with XrrReader(path) as r:
        n = sum(1 for _ in r.snapshots())
else:
    res = replay(path)
    n = res.stats.get("snapshots", 0) if isinstance(res.stats, dict) else 0
    bad = [f.kind for f in res.findings if f.severity != "info"]
    if bad:
        print(json.dumps({"error": "unexpected findings: " + ",".join(sorted(set(bad)))}))
        sys.exit(1)
dt, dc = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"n": n, "seconds": dt, "cpu_seconds": dc,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def make_recording(n: int, version: tuple[int, int] | None = None) -> Path:
    """A recording of ``n`` snapshots of a guest that handles every event correctly."""
    from xreplay.abi import layout
    from xreplay.xrr import ProbeSpec, RecordingHeader, RegionSpec, XrrWriter
    from xreplay.xrr import format as fmt

    version = version or (fmt.VERSION_MAJOR, fmt.VERSION_MINOR)
    path = _CACHE / f"synthetic-v{version[0]}.{version[1]}-{n}.xrr"
    if path.exists():
        return path
    _CACHE.mkdir(parents=True, exist_ok=True)
    s = layout("x86_64")
    f = s.fields("shared_info")
    pend, mask = f["evtchn_pending"][0], f["evtchn_mask"][0]
    sel = s.fields("vcpu_info")["evtchn_pending_sel"][0]
    probes = [ProbeSpec("upcall", "evtchn_upcall_handler", "upcall"),
              ProbeSpec("bottom-half", "evtchn_demux_pending", "bottom-half"),
              ProbeSpec("block", "evtchn_block_domain", "block")]
    header = RecordingHeader.for_arch(
        "x86_64", probes, labels={1: "xenstore", 3: "timer", 4: "netfront"},
        watch=[RegionSpec("evtchn_callback_ml", "watch", 64, "&evtchn_callback_ml")])
    page = bytearray(s.shared_info.sizeof())
    page[mask:mask + 512] = b"\xff" * 512
    page[mask] = 0xFF & ~0b11010  # ports 1, 3, 4 unmasked; every other port masked
    shadow = bytearray(64)
    tmp = path.with_suffix(".tmp")
    with XrrWriter(tmp, header, version=version) as w:
        i = 0
        t_ns = 0
        while w.count < n:
            port = (1, 3, 4)[i % 3]
            t_ns += 1000
            w.append(probe="block", vcpu=0, pc=0x401300, regions=[bytes(page), bytes(shadow)],
                     regflags=0x202, t_ns=t_ns)
            page[pend] |= 1 << port  # Xen: set_pending, selector, upcall_pending
            page[sel] |= 1
            page[0] = 1
            if w.count < n:
                w.append(probe="upcall", vcpu=0, pc=0x401100,
                         regions=[bytes(page), bytes(shadow)], regflags=0x2, t_ns=t_ns + 100)
            if w.count < n:
                w.append(probe="bottom-half", vcpu=0, pc=0x401200,
                         regions=[bytes(page), bytes(shadow)], regflags=0x202, t_ns=t_ns + 200)
            page[0] = 0  # the bottom half: clear upcall_pending, take the selector, demux
            page[sel] = 0
            page[pend] &= ~(1 << port) & 0xFF
            shadow[port] = 0  # handled at once (mark, run, unmask all between two hits)
            i += 1
    tmp.rename(path)
    return path


def _child(path: Path, method: str, pure: bool = False) -> Measurement:
    """One method in a fresh process; ``pure``: with the Python snapshot decoder (the
    compiled one's reference) instead of the compiled one."""
    import os

    env = dict(os.environ, XREPLAY_PURE_PYTHON="1" if pure else "0")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), method],
                          capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return Measurement(0, 0.0, False, wall, note=proc.stderr.strip()[-200:])
    if "error" in out:
        return Measurement(0, 0.0, False, wall, note=out["error"])
    # The rate is per CPU second of the child: on a shared machine its wall time mostly
    # measures the neighbours (wall seconds are still shown).
    m = Measurement(out["n"], out["cpu_seconds"], True, wall)
    m.note = ""
    m.maxrss_kb = out["maxrss_kb"]  # type: ignore[attr-defined]
    return m


@register("replay", "snapshots/s replayed vs read+decode only, and peak memory")
def run(args: BenchArgs) -> bool:
    n = args.hits or DEFAULT_SNAPSHOTS
    print(f"replay: writing synthetic recordings of {n} and {n // 10} snapshots (cached in "
          f"{_CACHE}) ...", flush=True)
    big, small = make_recording(n), make_recording(max(1, n // 10))
    methods = [Method(name, name, n, lambda _h, m=name: _child(big, m))
               for name in ("read", "decode", "replay")]
    methods.append(Method("replay (1/10 size)", "replay-small", n // 10,
                          lambda _h: _child(small, "replay")))
    methods.append(Method("replay (Python decoder)", "replay-py", n,
                          lambda _h: _child(big, "replay", pure=True)))
    from xreplay.xrr.deltas import decoder_kind

    print(f"replay: snapshot decoder {decoder_kind} (replay-py: the Python reference, "
          "XREPLAY_PURE_PYTHON=1)", flush=True)
    run_interleaved(methods, args.runs)
    print()
    print(table(methods, "read", f"replay, {big.stat().st_size / 1e6:.1f} MB recording "
                                 "(snapshots per CPU second of the child process; ratios "
                                 "against read in the same run):"))
    for m in methods:
        rss = [getattr(x, "maxrss_kb", 0) for x in m.results if x.verified]
        if rss:
            print(f"  peak RSS {m.name:<20} {max(rss) / 1024:7.1f} MiB")
    print()
    print_sizes(n, big)
    return all(x.verified for m in methods for x in m.results)


def _data_bytes(path: Path) -> int:
    """Bytes after the file header (frames only: what a snapshot costs)."""
    from xreplay.xrr import XrrReader

    with XrrReader(path) as r:
        return path.stat().st_size - r._data_start


def print_sizes(n: int, big: Path) -> None:
    from xreplay.xrr import format as fmt
    from xreplay.xrr.writer import rewrite

    cur = f"{fmt.VERSION_MAJOR}.{fmt.VERSION_MINOR}"
    small = max(1, n // 10)
    old = make_recording(small, (1, 0))
    print(f"bytes per snapshot (frames only), format 1.0 vs {cur}:")
    print(f"  {'recording':<34} {'snapshots':>9} {'1.0':>7} {cur:>7}")
    print(f"  {'synthetic (benchmark)':<34} {n:>9} {'':>7} {_data_bytes(big) / n:7.1f}")
    print(f"  {'synthetic (benchmark, 1/10)':<34} {small:>9} {_data_bytes(old) / small:7.1f} "
          f"{_data_bytes(make_recording(small)) / small:7.1f}")
    tmp = _CACHE / "rewritten.xrr"
    for path in sorted(_RECORDINGS.glob("*.xrr")):
        k = rewrite(path, tmp)
        print(f"  {path.name:<34} {k:>9} {_data_bytes(path) / k:7.1f} "
              f"{_data_bytes(tmp) / k:7.1f}")
    tmp.unlink(missing_ok=True)


IR_SNAPSHOTS = 3_000
_IR_CHILD = r"""
import sys
from xreplay.xrr import XrrReader
from xreplay.replay import replay
path, method = sys.argv[1], sys.argv[2]
if method == "read":
    with XrrReader(path) as r:
        sum(1 for _ in r.records())
elif method == "raw":
    with XrrReader(path) as r:
        sum(1 for _ in r.raw_deltas())
elif method == "replay":
    replay(path)
else:  # start-up: imports and the header, subtracted from the others
    XrrReader(path).close()
"""


@register("replay-ir", "instructions a snapshot (callgrind) of read, raw_deltas and replay",
          default=False)
def run_ir(args: BenchArgs) -> bool:
    """Instructions per snapshot under ``valgrind --tool=callgrind``: deterministic where
    CPU seconds are not (a shared machine's load moves those by 10-20 %), so a change to
    the replay's inner loop can be judged by one run.  Start-up is measured on its own and
    subtracted; the hash seed is fixed so dict layouts are the same in every child."""
    import os
    import re
    import shutil

    if shutil.which("valgrind") is None:
        print("replay-ir: valgrind is not installed (make deps installs it)")
        return False
    n = args.hits or IR_SNAPSHOTS
    path = make_recording(n)
    env = dict(os.environ, PYTHONHASHSEED="0")

    def instructions(method: str) -> int:
        pure = method.endswith("-py")  # the Python snapshot decoder, the compiled one's reference
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             "-c", _IR_CHILD, str(path), method.removesuffix("-py")], capture_output=True,
            text=True, env=dict(env, XREPLAY_PURE_PYTHON="1" if pure else "0"))
        m = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode or m is None:
            raise SystemExit(f"replay-ir: {method} failed under valgrind: "
                             f"{proc.stderr.strip().splitlines()[-1:]}")
        return int(m.group(1))

    base = instructions("start")
    per = {m: (instructions(m) - base) / n
           for m in ("read", "raw", "replay", "raw-py", "replay-py")}
    print(f"replay-ir: {n} snapshots, instructions a snapshot (start-up subtracted)")
    for m, v in per.items():
        print(f"  {m:9s} {v:10,.0f}   {m}/read = {v / per['read']:.3f}")
    return True
