"""``python -m benchmarks rr``: what QEMU record/replay costs and buys, on the lab guest.

In one run, interleaved, on the bare-metal ``lost-upcall`` lab guest (QEMU TCG):

* **perturbation**: wall time from QEMU's start to the guest's ``LAB-HUNG`` plain (no
  debugger, no icount) and under ``xreplay rr record``; the ratio rr/plain is what recording
  costs the guest (1.0 = nothing).
* **snapshots/s**: ``record --from-rr`` on that run vs a live recording of the same guest
  (breakpoints in the running guest); both verified against the guest's own counters.
* **last-write**: seconds for ``rr last-write`` of ``evtchn_upcall_pending`` before the hang
  (two replays).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks import BenchArgs, register

VARIANT = "lost-upcall"
UPCALL_PENDING = "HYPERVISOR_shared_info.vcpu_info[0].evtchn_upcall_pending"


def _plain_to_hang() -> float:
    from xreplay.lab.guests import start_guest

    with start_guest("baremetal", VARIANT, debugger=False) as g:
        t0 = time.monotonic()
        g.wait_for_output("LAB-HUNG", timeout=60)
        return time.monotonic() - t0


def _rr_record(tmp: Path, i: int) -> tuple[Path, float, str]:
    from xreplay.lab.guests import build_guest, guest_args, qemu_command
    from xreplay.rr.capture import Capture

    elf = build_guest("baremetal")
    argv = qemu_command(elf, guest_args(VARIANT), tmp / f"s{i}.log", None)
    run = tmp / f"run{i}.rr"
    r = Capture(argv, run, until="LAB-HUNG", linger=0.6, duration=60).run()
    assert r.until_after_s is not None
    return run, r.until_after_s, (run / "serial0.log").read_text()


def _verified(out: Path, serial: str) -> bool:
    from xreplay.lab.guests import parse_summary
    from xreplay.xrr import XrrReader

    s = parse_summary(serial) or {}
    with XrrReader(out) as r:
        names = [p.name for p in r.header.probes]
        hits = Counter(names[x.probe] for x in r.records())
    return (hits["upcall"], hits["bottom-half"], hits["block"]) == (
        int(s.get("upcalls", -1)), int(s.get("bottom_halves", -1)), int(s.get("blocks", -1)))


def _rate(out: Path) -> float:
    """Probe snapshots per second of the run's own clock (t_ns of the last one): the same
    measure for both, without the live recording's wait for --hang-after."""
    from xreplay.xrr import XrrReader

    with XrrReader(out) as r:
        recs = [x for x in r.records() if not x.hang]
    return len(recs) / (recs[-1].t_ns / 1e9) if recs and recs[-1].t_ns else 0.0


def _from_rr(run: Path, out: Path) -> float:
    from xreplay.demo import SHADOW
    from xreplay.lab.guests import LAB_PROBES
    from xreplay.record import RecordOptions, WatchSpec
    from xreplay.rr.launcher import record_from_rr
    from xreplay.xrr import ProbeSpec

    opts = RecordOptions(output=out, arch="x86_32",
                         probes=[ProbeSpec(r, s, r) for r, s in LAB_PROBES.items()],
                         watch=[WatchSpec(SHADOW, f"&{SHADOW}", 64)], dedupe=True,
                         hang_after=0.5)
    record_from_rr(run, opts)
    return _rate(out)


def _live(out: Path) -> float:
    from xreplay.demo import record_lab_guest

    record_lab_guest("baremetal", VARIANT, out, hang_after=1.0)
    return _rate(out)


@register("rr", "QEMU record/replay: perturbation, replay vs live snapshots/s, last-write")
def run(args: BenchArgs) -> bool:
    from xreplay.lab.guests import parse_summary
    from xreplay.rr.lastwrite import last_write

    rows: dict[str, list[float]] = {k: [] for k in (
        "plain s to hang", "rr record s to hang", "replay snapshots/s", "live snapshots/s",
        "last-write s")}
    ok = True
    with tempfile.TemporaryDirectory(prefix="xreplay-bench-rr-") as tmpdir:
        tmp = Path(tmpdir)
        for i in range(args.runs):
            rows["plain s to hang"].append(_plain_to_hang())
            run_dir, to_hang, serial = _rr_record(tmp, i)
            rows["rr record s to hang"].append(to_hang)
            out = tmp / f"replay{i}.xrr"
            rows["replay snapshots/s"].append(_from_rr(run_dir, out))
            ok = _verified(out, serial) and ok
            live = tmp / f"live{i}.xrr"
            rows["live snapshots/s"].append(_live(live))
            ok = _verified(live, serial) and ok  # the same guest, the same schedule
            t0 = time.monotonic()
            w = last_write(run_dir, UPCALL_PENDING).last
            rows["last-write s"].append(time.monotonic() - t0)
            ok = ok and w is not None and w.function == "vcpu_mark_events_pending"
            print(f"run {i + 1}/{args.runs}: " + ", ".join(
                f"{k} {v[-1]:.3f}" for k, v in rows.items()), flush=True)
            assert parse_summary(serial) is not None
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\n| measure ({VARIANT} lab guest, QEMU TCG) | median of {args.runs} |")
    print("|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| perturbation: rr record / plain (time to hang) | "
          f"{med['rr record s to hang'] / med['plain s to hang']:.2f} |")
    print(f"| replay / live snapshots/s | "
          f"{med['replay snapshots/s'] / med['live snapshots/s']:.2f} |")
    print(f"verified (hit counts = the guest's counters, last writer named): {ok}")
    return ok
