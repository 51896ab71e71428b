"""Diff: two recordings by their event-handling pattern, two snapshots of one."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner
from conftest import GuestSim
from test_replay import correct_guest, episode, lost_upcall_guest

from xreplay.cli import XReplayGroup
from xreplay.replay import diff_recordings, diff_snapshots
from xreplay.replay.commands import diff_command
from xreplay.xrr import XrrReader


@click.group(cls=XReplayGroup)
def cli() -> None:
    """``diff`` under the main CLI's error handling."""


cli.add_command(diff_command, "diff")


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    ok = correct_guest().write(tmp_path / "ok.xrr")
    sim, at = lost_upcall_guest()
    return ok, sim.write(tmp_path / "hang.xrr"), at


def test_correct_vs_hanging_reports_the_first_divergence(tmp_path: Path) -> None:
    ok, hang, at = pair(tmp_path)
    r = diff_recordings(ok, hang)
    d = r.divergence
    assert d is not None and d.side == "b" and d.snapshot == at["upcall"]
    assert d.message == (f"in B, the upcall at #{at['upcall']} (vCPU 0) is followed by hang "
                         f"#{at['hang']} with no bottom-half; in A every upcall (5) is "
                         "followed by a bottom-half")
    assert d.seen.context[-3:] == (("block", at["block"]), ("upcall", at["upcall"]),
                                   ("hang", at["hang"]))
    # A's closest: its first upcall taken in the block function, then its bottom half
    assert d.match is not None and [r for r, _ in d.match.context] == ["block", "upcall",
                                                                       "bottom-half"]
    assert r.patterns["b"].followups == {"bottom-half": 2, "hang": 1}
    labels = [s.label for s in r.aligned]
    assert labels == ["same step (upcall)", "different step (next)", "end"]
    nxt = r.aligned[1]
    assert (nxt.a_probe, nxt.b_probe, nxt.b_snapshot) == ("bottom-half", "hang", at["hang"])
    end = r.aligned[-1]
    assert {"port": 1, "label": "xenstore", "a": "[0/0/0]", "b": "[1/0/1]"} in end.ports
    assert {"vcpu": 0, "field": "evtchn_upcall_pending", "a": 0, "b": 1} in end.vcpus
    assert [f["kind"] for f in r.findings["b"]] == ["missed-clear", "masked-pending"]
    assert r.findings["a"] == []


def test_upcall_followed_by_block_without_bottom_half(tmp_path: Path) -> None:
    ok = correct_guest().write(tmp_path / "ok.xrr")
    sim = GuestSim()
    sim.hit("block")
    episode(sim, 1)
    sim.m.set_pending(1)
    sim.hit("upcall")
    sim.hit("bottom-half")
    sim.demux()
    sim.m.set_pending(4)
    up = sim.hit("upcall")  # while the handlers run; the loop then blocks without re-checking
    blk = sim.hit("block")
    sim.hit("hang", hang=True)
    d = diff_recordings(ok, sim.write(tmp_path / "b.xrr")).divergence
    assert d is not None and d.snapshot == up
    assert f"the upcall at #{up} (vCPU 0) is followed by block #{blk} with no bottom-half" \
        in d.message


def test_same_pattern_is_no_divergence(tmp_path: Path) -> None:
    ok = correct_guest().write(tmp_path / "ok.xrr")
    r = diff_recordings(ok, ok)
    assert not r.diverged and r.divergence is None
    assert [s.label for s in r.aligned] == ["end"] and r.aligned[0].identical
    res = run("diff", ok, ok)
    assert res.exit_code == 0 and "no divergence" in res.output


def test_same_pattern_as_far_as_a_short_recording_goes_is_no_verdict(tmp_path: Path
                                                                     ) -> None:
    """Two runs cut short (killed recorders) that handle events the same way in what is
    left: that is no verdict (exit 2, naming each side), since their ends were never read;
    a divergence in what is left still stands (exit 1, with the warning)."""
    ok, hang, at = pair(tmp_path)
    whole = ok.read_bytes()
    with XrrReader(ok) as r:
        offsets = [rec.offset for rec in r.records()]
    first, cut = tmp_path / "first.xrr", tmp_path / "cut.xrr"
    first.write_bytes(whole[:offsets[-1]])  # no end frame, no torn bytes
    cut.write_bytes(whole[:offsets[-1] + 2])
    res = run("diff", first, cut)
    assert res.exit_code == 2, res.output
    assert "same pattern as far as both were read" in res.output
    assert f"no verdict: A ({first}): the recording stops short (no end frame)" in res.output
    assert f"; B ({cut}): the recording stops short (torn tail at byte {offsets[-1]}, no " \
           "end frame)" in res.output
    assert diff_recordings(first, cut).stats["b"]["incomplete"].startswith("the recording")
    assert run("diff", ok, ok).exit_code == 0
    open_ = tmp_path / "open.xrr"
    open_.write_bytes(hang.read_bytes()[:-1])  # every snapshot, the end frame torn
    res = run("diff", ok, open_)
    assert res.exit_code == 1 and "first divergence: in B" in res.output, res.output
    assert "warning: B (" in res.output and "stops short" in res.output


def test_cli_diff_text_json_and_exit_codes(tmp_path: Path) -> None:
    ok, hang, at = pair(tmp_path)
    res = run("diff", ok, hang)
    assert res.exit_code == 1, res.output
    assert f"first divergence: in B, the upcall at #{at['upcall']}" in res.output
    assert f"B: upcall #4 -> bottom-half #5 -> block #{at['block']} -> upcall #{at['upcall']} " \
           f"-> hang #{at['hang']}" in res.output
    assert "port 1 (xenstore): A [0/0/0]  B [1/0/1]" in res.output
    doc = json.loads(run("diff", ok, hang, "--json").output)
    assert set(doc) == {"a", "b", "divergence", "divergences", "patterns", "aligned",
                        "findings", "stats", "rest"}
    assert doc["divergence"]["side"] == "b" and doc["divergence"]["snapshot"] == at["upcall"]
    assert doc["divergence"]["seen"]["after"] == "hang"
    assert doc["patterns"]["a"]["followups"] == {"bottom-half": 5}
    assert doc["aligned"][-1]["label"] == "end"
    assert run("diff", ok).exit_code == 2
    assert run("diff", ok, hang, ok, "--at", 1, 2).exit_code == 2
    assert run("diff", ok, tmp_path / "missing.xrr").exit_code == 2


def test_diff_two_snapshots_of_one_recording(tmp_path: Path) -> None:
    _, hang, at = pair(tmp_path)
    sd = diff_snapshots(hang, at["block"], at["hang"])
    assert not sd.identical
    assert "evtchn_upcall_pending vcpu 0 0->1" in sd.text
    assert {"port": 3, "label": "timer", "a": "[0/0/0]", "b": "[1/0/1]"} in sd.state.ports
    res = run("diff", hang, "--at", at["block"], at["hang"])
    assert res.exit_code == 1
    assert f"#{at['block']} (block) vs #{at['hang']} (hang)" in res.output
    assert f"port 3 (timer): #{at['block']} [0/0/0]  #{at['hang']} [1/0/1]" in res.output
    res = run("diff", hang, "--at", 2, 2)
    assert res.exit_code == 0 and "identical" in res.output
    doc = json.loads(run("diff", hang, "--at", at["block"], at["hang"], "--json").output)
    assert doc["a_snapshot"] == at["block"] and doc["b_snapshot"] == at["hang"]
    assert run("diff", hang, "--at", 0, 999).exit_code == 2


def test_diff_snapshots_across_recordings(tmp_path: Path) -> None:
    ok, hang, at = pair(tmp_path)
    sd = diff_snapshots(ok, 16, at["hang"], other=hang)
    assert "vs" in sd.file and not sd.state.identical
    assert run("diff", ok, hang, "--at", 16, at["hang"]).exit_code == 1


def test_recordings_on_different_abis_are_refused_not_compared() -> None:
    """A FIFO event word and a 2-level bit pair are different fields: one error, exit 2."""
    rec = Path(__file__).parent.parent / "recordings"
    fifo, two_level = rec / "xenlab-pv-domu-fifo.xrr", rec / "xenlab-pv-domu.xrr"
    for args in ((fifo, two_level), (fifo, two_level, "--at", 3, 4)):
        res = run("diff", *args)
        assert res.exit_code == 2, res.output
        assert "is on the fifo event-channel ABI" in res.output and "on 2l" in res.output
        assert "port" not in res.output.split("ABI", 1)[0]  # nothing compared first
