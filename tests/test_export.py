"""Exports: VCD and Chrome trace from a real (synthetic) recording."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from conftest import PageBuilder, write_recording

from xreplay.cli import main


def _rec(tmp_path: Path) -> Path:
    pb = PageBuilder("x86_64").mask_all().mask(3, False)
    steps = [("block", 0, pb.bytes(), 0x202, False)]
    pb.raise_port(3)
    steps.append(("upcall", 0, pb.bytes(), 0x2, False))
    pb.upcall_pending(0, 0).sel(0, 0, False).pending(3, False)
    steps.append(("bottom-half", 0, pb.bytes(), 0x202, False))
    return write_recording(tmp_path / "e.xrr", "x86_64", steps, labels={3: "timer"})


def test_vcd_has_the_upcall_edge(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(_rec(tmp_path)), "--format", "vcd"])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "$var wire 1 # evtchn_upcall_pending $end" in text
    assert "$scope module port3_timer $end" in text
    body = text.split("$enddefinitions $end\n", 1)[1]
    stamps = [line for line in body.splitlines() if line.startswith("#")]
    assert len(stamps) == 3
    # upcall_pending ('#') goes 0 -> 1 -> 0 across the three snapshots
    values = [line for line in body.splitlines() if line.endswith("#") and len(line) == 2]
    assert values == ["0#", "1#", "0#"]


def test_chrome_trace_is_valid_json(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    res = CliRunner().invoke(main, ["export", str(_rec(tmp_path)), "--format", "chrome",
                                    "-o", str(out)])
    assert res.exit_code == 0
    events = json.loads(out.read_text())
    instants = [e for e in events if e.get("ph") == "i"]
    assert [e["name"] for e in instants] == ["block", "upcall", "bottom-half"]
    assert instants[1]["args"]["evtchn_upcall_pending"] == 1
    assert instants[1]["args"]["pending_unmasked"] == ["3 (timer)"]


def test_export_of_bad_file_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xrr"
    bad.write_text("nope")
    res = CliRunner().invoke(main, ["export", str(bad), "-o", str(tmp_path / "o.vcd")])
    assert res.exit_code == 2 and "bad magic" in res.output
    assert not (tmp_path / "o.vcd").exists()
