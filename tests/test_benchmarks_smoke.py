"""Smoke test of ``python -m benchmarks``: the machinery runs and every stored record verifies
(gdbserver table, and the QEMU table when qemu-system-x86_64 is installed).

Not a timing test: hit counts are tiny and rates on a shared VM vary several-fold, so only
sanity (positive, finite, every run verified, a ratio against raw-rsp) is checked.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package is not installed, it lives in the repo
    sys.path.insert(0, str(ROOT))

from benchmarks.rsp_client import decode_hex  # noqa: E402

NEEDED = ("gcc", "gdb", "gdbserver", "nm")


def test_rle_and_hex_decoding() -> None:
    # "X*c" repeats X ord(c) - 29 more times; gdbserver sends such replies to 'm'.
    assert decode_hex(b"0* ") == b"\x00\x00"
    assert decode_hex(b"ab0*\"12") == b"\xab\x00\x00\x00\x12"
    assert decode_hex(b"f**") == b"\xff" * 7  # the count character may itself be '*'
    assert decode_hex(b"0123") == b"\x01\x23"


def test_unknown_benchmark_is_a_usage_error() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown benchmark nope" in r.stderr and "record" in r.stderr


def _rows(text: str) -> dict[str, list[str]]:
    """The cells of each table row in ``text``, by method name."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"\d+", cells[1]):
            rows[cells[0]] = cells
    return rows


def _check_rows(rows: dict[str, list[str]], names: set[str], out: str) -> None:
    assert set(rows) == names, out
    for name, (_, hits, verified, median, lo, hi, _wall, packets, ratio) in rows.items():
        assert verified == "1/1", (name, out)
        rate = float(median)
        assert math.isfinite(rate) and rate > 0, (name, median)
        assert float(lo) <= rate <= float(hi)
        assert int(hits) >= 1
        assert re.fullmatch(r"\S+/raw = [0-9.e+-]+", ratio), (name, ratio)
        assert packets == "-" or float(packets) > 0, (name, packets)
    assert rows["raw-rsp"][8] == "raw/raw = 1"
    assert float(rows["raw-rsp"][7]) > 0 and float(rows["xreplay"][7]) > 0


@pytest.mark.gdbserver
@pytest.mark.qemu
@pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDED),
                    reason=f"needs {', '.join(NEEDED)}")
def test_record_benchmark_runs_and_verifies() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "record", "--hits", "4",
                        "--runs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    gdbserver_out, _, qemu_out = r.stdout.partition("\nrecord, QEMU")
    lab_out, _, solo5_out = gdbserver_out.partition("\nrecord, gdbserver target, Solo5")
    _check_rows(_rows(lab_out), {"xreplay", "xreplay-agent", "xreplay-trace", "raw-rsp",
                                 "raw-rsp-pipelined", "raw-trace", "pygdbmi-default",
                                 "pygdbmi-tuned"}, r.stdout)
    _check_rows(_rows(solo5_out), {"xreplay", "xreplay-trace", "raw-rsp", "raw-trace"},
                r.stdout)
    assert "HYPERVISOR_SHARED_INFO[4096]" in solo5_out
    assert "NOT verified" not in r.stderr
    if shutil.which("qemu-system-x86_64") is None:
        assert "qemu: skipped (" in r.stdout, r.stdout
        return
    qemu_lab, _, qemu_solo5 = qemu_out.partition("\nrecord, QEMU TCG target, Solo5")
    _check_rows(_rows(qemu_lab), {"xreplay", "xreplay-agent", "raw-rsp"}, r.stdout)
    assert re.search(r"duplicate stops dropped per run: xreplay \[\d+\]; xreplay-agent "
                     r"\[\d+\]; raw-rsp \[\d+\]", qemu_lab), r.stdout
    _check_rows(_rows(qemu_solo5), {"xreplay", "raw-rsp"}, r.stdout)


def test_replay_benchmark_machinery(tmp_path, monkeypatch) -> None:
    """The replay benchmark's recording is clean and every method counts every snapshot."""
    from benchmarks import replay_bench

    monkeypatch.setattr(replay_bench, "_CACHE", tmp_path)
    path = replay_bench.make_recording(300)
    for method in ("read", "decode", "replay"):
        m = replay_bench._child(path, method)
        assert m.verified and m.hits == 300, (method, m.note)
        assert m.maxrss_kb > 0
