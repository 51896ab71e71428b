"""Snapshot decoding and rendering, and the offline ``xreplay show`` / ``layout`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PageBuilder, write_recording

from xreplay.cli import main
from xreplay.xrr import XrrReader


def _flags(arch: str, enabled: bool) -> int:
    if arch.startswith("x86"):
        return 0x202 if enabled else 0x2
    return 0x0 if enabled else 0x80  # PSTATE.I


def _hang_recording(tmp_path: Path, arch: str = "x86_64") -> Path:
    """upcall -> bottom half -> block, then a [1/0/1] hang, as in the xen-devel report."""
    pb = PageBuilder(arch).mask_all()
    for port in (1, 3, 4):
        pb.mask(port, False)
    pb.pending(2)  # console: masked and pending, [1/1/0]
    on, off = _flags(arch, True), _flags(arch, False)
    steps = [("block", 0, pb.bytes(), on, False)]
    pb.raise_port(3)
    steps.append(("upcall", 0, pb.bytes(), off, False))
    pb.upcall_pending(0, 0).sel(0, 0, False).pending(3, False)
    steps.append(("bottom-half", 0, pb.bytes(), on, False))
    pb.raise_port(1).raise_port(3)
    steps.append(("upcall", 0, pb.bytes(), off, False))
    steps.append(("block", 0, pb.bytes(), on, True))
    return write_recording(tmp_path / "hang.xrr", arch, steps,
                           labels={1: "xenstore", 2: "console", 3: "timer", 4: "netfront"})


@pytest.mark.parametrize("arch", ["x86_64", "x86_32", "arm64"])
def test_snapshot_renders_like_the_e_key(tmp_path: Path, arch: str) -> None:
    with XrrReader(_hang_recording(tmp_path, arch)) as r:
        last = list(r.snapshots())[-1]
    assert last.hang and last.interrupts_enabled is True
    v0 = last.vcpus[0]
    assert (v0.evtchn_upcall_pending, v0.evtchn_pending_sel) == (1, 1)
    table = {p.port: p for p in last.port_table()}
    assert table[1].pms == "[1/0/1]" and table[3].pms == "[1/0/1]"
    assert table[2].pms == "[1/1/1]"  # masked+pending, its word's selector bit is set
    assert table[4].pms == "[0/0/1]"
    text = last.render()
    assert "       1 [1/0/1]  (xenstore)" in text
    assert "evtchn_upcall_pending=1" in text


def test_last_port_of_each_abi(page_builder) -> None:
    for arch, last_port in (("x86_64", 4095), ("x86_32", 1023)):
        pb = page_builder(arch).raise_port(last_port)
        path = write_recording(Path(f"/tmp/xreplay-lastport-{arch}.xrr"), arch,
                               [("upcall", 0, pb.bytes(), 0, False)])
        with XrrReader(path) as r:
            snap = r.snapshot(0)
        assert snap.is_pending(last_port) and snap.selector_bit(last_port)
        assert snap.port_state(last_port).pms == "[1/0/1]"
        assert not snap.is_pending(0)
        path.unlink()


def test_show_summary_at_and_changes(tmp_path: Path) -> None:
    path = _hang_recording(tmp_path)
    run = CliRunner().invoke
    res = run(main, ["show", str(path)])
    assert res.exit_code == 0, res.output
    assert "5 snapshots" in res.output and "closed cleanly" in res.output
    assert "HANG" in res.output

    res = run(main, ["show", str(path), "--json"])
    doc = json.loads(res.output)
    assert doc["snapshots"] == 5 and doc["hang_snapshots"] == 1
    assert {p["name"]: p["hits"] for p in doc["probes"]} == {
        "upcall": 2, "bottom-half": 1, "block": 2}

    res = run(main, ["show", str(path), "--at", "4", "--json"])
    snap = json.loads(res.output)
    ports = {p["port"]: p for p in snap["ports"]}
    assert ports[1]["pending"] and not ports[1]["masked"] and ports[1]["selector"]
    assert snap["hang"] is True

    res = run(main, ["show", str(path), "--changes", "1..2"])
    assert res.exit_code == 0
    assert ("#1 -> #2 (bottom-half, vcpu 0): evtchn_pending port 3 (timer) 1->0; "
            "evtchn_pending_sel vcpu 0 selector word 0 1->0; "
            "evtchn_upcall_pending vcpu 0 1->0") in res.output
    res = run(main, ["show", str(path), "--changes", "0..", "--json"])
    rows = json.loads(res.output)["changes"]
    assert [r["to"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["changes"][0] == {"field": "evtchn_pending", "index": 3, "set": True,
                                     "vcpu": None}


def test_layout_json_shape() -> None:
    res = CliRunner().invoke(main, ["layout", "--arch", "x86_32", "--json"])
    doc = json.loads(res.output)
    assert doc["arch"] == "x86_32"
    si = doc["structs"]["shared_info"]
    assert si["size"] == 2344
    assert si["fields"]["evtchn_pending"] == {"offset": 2048, "size": 128}
    assert doc["structs"]["vcpu_info"]["fields"]["evtchn_pending_sel"] == {"offset": 4,
                                                                            "size": 4}


@pytest.mark.parametrize("args,needle", [
    (["layout", "--arch", "mips"], "unknown guest arch 'mips'"),
    (["show", "/nonexistent.xrr"], "cannot open recording"),
    (["show", "{bad}", "--at", "99"], "no snapshot #99"),
    (["show", "{bad}", "--changes", "5..2"], "TO is before FROM"),
    (["show", "{text}"], "bad magic"),
])
def test_errors_are_one_line_exit_2(tmp_path: Path, args, needle: str) -> None:
    good = _hang_recording(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("just some text\n")
    args = [a.replace("{bad}", str(good)).replace("{text}", str(text)) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert needle in res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output


def test_torn_file_shows_what_was_recorded(tmp_path: Path) -> None:
    path = _hang_recording(tmp_path)
    data = path.read_bytes()
    with XrrReader(path) as r:
        last = [rec.offset for rec in r.records()][-1]
    path.write_bytes(data[:last + 3])  # cut the trailer and part of the last snapshot
    res = CliRunner().invoke(main, ["show", str(path)])
    assert res.exit_code == 0
    assert "4 snapshots" in res.output and "NOT closed cleanly" in res.output
    assert "torn tail" in res.output
