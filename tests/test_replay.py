"""Replay: the 2-level model, each detector on hand-built recordings, and the CLI."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import GuestSim, page_from_state, write_recording_ex

from xreplay.cli import XReplayGroup
from xreplay.replay import Evtchn2L, Replayer, ReplayOptions, explain, replay
from xreplay.replay.commands import diff_command, replay_command
from xreplay.snapshot import Snapshot, VcpuState
from xreplay.xrr import XrrReader

DATA = Path(__file__).parent / "data" / "debugkeys"
UPC_SEL = ["evtchn_upcall_pending", "evtchn_pending_sel"]


@click.group(cls=XReplayGroup)
def cli() -> None:
    """The two commands under the main CLI's error handling, as cli.py registers them."""


cli.add_command(replay_command, "replay")
cli.add_command(diff_command, "diff")


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def kinds(result) -> list[str]:
    return [f.kind for f in result.findings]


# --------------------------------------------------------------------------- scenarios


def episode(sim: GuestSim, *ports: int, vcpu: int = 0) -> tuple[int, int, int]:
    """Blocked vCPU woken by Xen raising ``ports``: upcall, bottom half, handlers, block."""
    for p in ports:
        sim.m.set_pending(p)
    u = sim.hit("upcall", vcpu)
    b = sim.hit("bottom-half", vcpu)
    sim.demux(vcpu)
    sim.handlers()
    k = sim.hit("block", vcpu)
    return u, b, k


def correct_guest(arch: str = "x86_64") -> GuestSim:
    """The mirage-xen fix in every shape the lab's correct guest takes."""
    sim = GuestSim(arch)
    sim.hit("block")
    episode(sim, 1)
    episode(sim, 3, 4)
    # an upcall while the handlers run: the main loop sees upcall_pending and demuxes again
    sim.m.set_pending(3)
    sim.hit("upcall")
    sim.hit("bottom-half")
    sim.demux()
    sim.m.set_pending(4)
    sim.hit("upcall")
    sim.handlers()
    sim.hit("bottom-half")
    sim.demux()
    sim.handlers()
    # an event between the main loop's check and the block entry: the block function
    # re-checks upcall_pending with interrupts off and returns; the vector is taken at sti
    sim.hit("block")
    sim.m.set_pending(1)
    sim.hit("block")  # entered with upcall_pending=1 and [1/0/1]: not a bug by itself
    sim.hit("upcall")
    sim.hit("bottom-half")
    sim.demux()
    sim.handlers()
    sim.hit("block")
    sim.hit("hang", hang=True)  # idle: nothing pending, nothing lost
    return sim


def lost_upcall_guest(arch: str = "x86_64") -> tuple[GuestSim, dict[str, int]]:
    """The thread's bug: an upcall between sti and hlt is EOI'd, nobody demuxes."""
    sim = GuestSim(arch)
    sim.hit("block")
    episode(sim, 1)
    episode(sim, 4)
    at = {"block": len(sim.steps) - 1}
    sim.m.set_pending(3)
    at["upcall"] = sim.hit("upcall")  # in the window before hlt: top half EOIs
    sim.m.set_pending(1)  # Xen goes on raising: no notification, upcall_pending is 1
    sim.m.set_pending(4)
    sim.m.set_pending(2)  # console, masked
    at["hang"] = sim.hit("hang", hang=True)
    return sim, at


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("arch", ["x86_64", "x86_32"])
def test_model_mirrors_event_2l(arch: str) -> None:
    m = Evtchn2L.new(arch, all_masked=True)
    last = m.geometry.nr_ports - 1
    assert m.geometry.nr_ports == (4096 if arch == "x86_64" else 1024)
    assert not m.set_pending(last)  # masked: pending only, no selector, no upcall
    assert m.is_pending(last) and not m.print_state(last) and m.upcalls == 0
    assert m.unmask(last)  # EVTCHNOP_unmask re-raises: selector word, then the edge
    assert m.print_state(last) and m.vcpu_info[0].evtchn_upcall_pending == 1
    m.unmask(0)
    assert not m.set_pending(0)  # upcall_pending already 1: no new notification
    assert m.deliverable(0) == (1 << last) | 1
    assert m.demux(0) == [0, last]
    assert m.evtchn_pending == 0 and m.vcpu_info[0].evtchn_pending_sel == 0
    m.mask(5)
    m.set_pending(5)
    m.unmask_no_reraise(5)
    assert m.stranded() == 1 << 5


def test_explain_names_who_may_make_each_transition(tmp_path: Path) -> None:
    sim = GuestSim()
    sim.hit("block")
    sim.m.set_pending(1)
    sim.hit("upcall")
    with XrrReader(sim.write(tmp_path / "r.xrr")) as r:
        a, b = list(r.snapshots())
    from xreplay.replay import Geometry, Routing

    g = Geometry.for_arch("x86_64")
    ex = explain(a, b, g, Routing(g, [0]), quiet=True)
    by_field = {e.change.field: e for e in ex}
    assert by_field["evtchn_pending"].actor == "Xen" and by_field["evtchn_pending"].legal
    assert by_field["evtchn_pending_sel"].legal and by_field["evtchn_upcall_pending"].legal
    assert all(e.legal for e in explain(b, a, g, Routing(g, [0]))), "the guest clears"


# --------------------------------------------------------------------------- missed clear


def test_correct_guest_has_no_finding(tmp_path: Path) -> None:
    result = replay(correct_guest().write(tmp_path / "ok.xrr"))
    assert not result.failed, [f.message for f in result.findings]
    assert "missed-clear" not in kinds(result)
    assert result.stats["hits"]["block"] == 6


@pytest.mark.parametrize("arch", ["x86_64", "x86_32"])
def test_lost_upcall_is_a_missed_clear(tmp_path: Path, arch: str) -> None:
    sim, at = lost_upcall_guest(arch)
    result = replay(sim.write(tmp_path / "hang.xrr"))
    (f,) = result.by_kind("missed-clear")
    assert (f.snapshot, f.upcall_snapshot, f.block_snapshot) == (at["hang"], at["upcall"],
                                                                 at["block"])
    assert f.vcpu == 0 and f.ports == [1, 3, 4] and f.fields == UPC_SEL
    assert f.severity == "error"
    assert "1 (xenstore) [1/0/1]" in f.message and "4 (netfront) [1/0/1]" in f.message
    assert "0->1 edge" in f.message
    masked = result.by_kind("masked-pending")
    assert masked and masked[0].ports == [2] and masked[0].severity == "info"


def test_upcall_before_block_without_recheck(tmp_path: Path) -> None:
    """The original Mirage loop: upcall during the handlers, block without re-checking."""
    sim = GuestSim()
    sim.hit("block")
    episode(sim, 1)
    sim.hit("bottom-half")
    sim.m.set_pending(4)
    up = sim.hit("upcall")
    blk = sim.hit("block")
    hang = sim.hit("hang", hang=True)
    (f,) = replay(sim.write(tmp_path / "r.xrr")).by_kind("missed-clear")
    assert (f.snapshot, f.upcall_snapshot, f.block_snapshot, f.ports) == (hang, up, blk, [4])
    assert "without re-checking" in f.message


def test_end_without_hang_is_only_a_note_unless_the_recorder_saw_a_hang(tmp_path: Path) -> None:
    sim = GuestSim()
    sim.hit("block")
    episode(sim, 1)
    sim.m.set_pending(3)
    sim.hit("upcall")  # the recording stops here (e.g. --count)
    # --count: the vCPU is on its usual wake-up path (block, upcall, then a bottom half)
    assert replay(sim.write(tmp_path / "count.xrr", trailer={"reason": "count"})).findings == []
    # Ctrl-C: maybe because it hung; a note, not a failure
    result = replay(sim.write(tmp_path / "int.xrr", trailer={"reason": "interrupted"}))
    assert kinds(result) == ["blocked-at-end"] and not result.failed
    assert "--hang-after" in result.findings[0].message
    result = replay(sim.write(tmp_path / "hang.xrr", trailer={"reason": "hang"}))
    assert kinds(result) == ["missed-clear"] and result.failed


@pytest.mark.parametrize("arch,last", [("x86_64", 4095), ("x86_32", 1023)])
def test_last_port_of_each_abi_and_port_zero(tmp_path: Path, arch: str, last: int) -> None:
    sim = GuestSim(arch, listen=(0, last), labels={last: "last"})
    sim.hit("block")
    episode(sim, 0)
    sim.m.set_pending(last)
    up = sim.hit("upcall")
    sim.m.set_pending(0)
    sim.hit("hang", hang=True)
    (f,) = replay(sim.write(tmp_path / "r.xrr")).by_kind("missed-clear")
    assert f.ports == [0, last] and f.upcall_snapshot == up
    assert f"{last} (last) [1/0/1]" in f.message


def test_two_vcpus_with_a_notify_map(tmp_path: Path) -> None:
    """vCPU 1 loses its upcall while vCPU 0 goes on working."""
    sim = GuestSim(listen=(1, 3, 4, 5), vcpus=(0, 1), notify={5: 1}, labels={5: "blk"})
    sim.hit("block", 0)
    sim.hit("block", 1)
    episode(sim, 5, vcpu=1)
    blk1 = len(sim.steps) - 1
    sim.m.set_pending(5)
    up1 = sim.hit("upcall", 1)  # vCPU 1: EOI'd, then halts for good
    assert sim.m.vcpu_info[0].evtchn_upcall_pending == 0
    for _ in range(3):
        episode(sim, 1, vcpu=0)
    sim.m.set_pending(3)
    last_up0 = sim.hit("upcall", 0)
    path = sim.write(tmp_path / "r.xrr", trailer={"reason": "count"})
    result = replay(path)
    # no hang snapshot and the stall window not reached: only a note at the end (vCPU 0,
    # whose upcall ends a --count recording, is just waking up as usual)
    (f,) = result.findings
    assert (f.kind, f.vcpu, f.ports, f.severity) == ("blocked-at-end", 1, [5], "info")
    # a stall window shorter than vCPU 1's silence proves it
    result = replay(path, ReplayOptions(stall_ns=5000))
    (f,) = result.by_kind("missed-clear")
    assert (f.vcpu, f.ports, f.upcall_snapshot, f.block_snapshot) == (1, [5], up1, blk1)
    assert f.snapshot < last_up0
    assert "5 (blk) [1/0/1]" in f.message and "vCPU 0 kept running" in f.message


# --------------------------------------------------------------------------- stranded port


def test_unmask_without_reraise_strands_the_port(tmp_path: Path) -> None:
    sim = GuestSim()
    sim.hit("block")
    sim.m.set_pending(4)
    sim.hit("upcall")
    sim.hit("bottom-half")
    sim.demux()  # port 4 taken: masked, cleared, marked
    sim.m.set_pending(4)  # the backend notifies again while it is masked
    sim.handlers(reraise=False)  # BUG: clears the mask bit, no re-raise
    blk = sim.hit("block")
    sim.m.set_pending(1)  # another port of word 0 sets the selector: rescued by luck
    sim.hit("upcall")
    result = replay(sim.write(tmp_path / "r.xrr"))
    (f,) = result.by_kind("stranded-port")
    # mask 0->1->0 and pending 1->0->1 between two hits: the selector clear is what shows
    assert (f.snapshot, f.block_snapshot, f.ports) == (blk, blk, [4])
    assert f.fields == ["evtchn_pending_sel", "evtchn_mask"]
    assert "cleared the mask bit without re-raising it" in f.message
    assert "[1/0/0]" in f.message and "rescued it by luck" in f.message
    assert result.failed


def test_unmask_seen_between_two_hits_names_the_mask(tmp_path: Path) -> None:
    sim = GuestSim()
    sim.hit("block")
    sim.m.set_pending(4)
    sim.hit("upcall")
    sim.hit("bottom-half")
    sim.demux()
    sim.m.set_pending(4)
    sim.hit("other")  # the guest's evtchn_unmask probe: port 4 [1/1/0]
    sim.handlers(reraise=False)
    blk = sim.hit("block")
    (f,) = replay(sim.write(tmp_path / "r.xrr")).by_kind("stranded-port")
    assert (f.snapshot, f.fields) == (blk, ["evtchn_mask"])
    assert "evtchn_mask port 4 1->0 by the guest while pending, no selector bit / upcall " \
           "raised" in f.message


def test_stranded_at_the_hang_port_zero(tmp_path: Path) -> None:
    sim = GuestSim(listen=(0,))
    sim.hit("block")
    sim.m.mask(0)
    sim.m.set_pending(0)
    sim.hit("upcall")
    sim.m.unmask_no_reraise(0)
    became = sim.hit("other")
    hang = sim.hit("hang", hang=True)
    path = sim.write(tmp_path / "r.xrr")
    (f,) = replay(path).by_kind("stranded-port")
    assert (f.snapshot, f.block_snapshot, f.ports) == (became, hang, [0])
    assert "Still stranded at the end" in f.message


# --------------------------------------------------------------------------- lost pending


def ffs_guest(shadow: bool) -> tuple[GuestSim, int]:
    sim = GuestSim(shadow=shadow)
    sim.hit("block")
    episode(sim, 1)
    sim.m.set_pending(1)
    sim.m.set_pending(4)
    sim.hit("upcall")
    sim.hit("bottom-half")
    sim.demux(ffs_bug=True)  # port 1 marked right; port 4 marked as 5
    sim.handlers()
    blk = sim.hit("block")
    episode(sim, 1)
    sim.hit("hang", hang=True)
    return sim, blk


def test_shadow_shows_a_cleared_pending_bit_never_marked(tmp_path: Path) -> None:
    sim, blk = ffs_guest(shadow=True)
    result = replay(sim.write(tmp_path / "r.xrr"))
    assert result.stats["shadow"] == "evtchn_callback_ml"
    (f,) = result.by_kind("lost-pending")
    assert (f.snapshot, f.ports, f.vcpu) == (blk, [4], 0)
    assert "evtchn_callback_ml[4] is 0" in f.message
    assert "evtchn_callback_ml[5] was marked instead" in f.message and "ffs()" in f.message
    # the shadow can be named explicitly, or ignored (then the inference below applies)
    assert replay(tmp_path / "r.xrr", ReplayOptions(shadow="evtchn_callback_ml")).failed
    inferred = replay(tmp_path / "r.xrr", ReplayOptions(use_shadow=False))
    assert [f.snapshot for f in inferred.by_kind("lost-pending")] == [blk]


def test_lost_pending_inferred_without_a_shadow(tmp_path: Path) -> None:
    sim, blk = ffs_guest(shadow=False)
    result = replay(sim.write(tmp_path / "r.xrr"))
    (f,) = result.by_kind("lost-pending")
    assert (f.snapshot, f.block_snapshot, f.ports) == (blk, blk, [4])
    assert "still masked" in f.message
    # a correct guest's taken ports are unmasked by their handlers: nothing inferred
    assert not replay(correct_guest().write(tmp_path / "ok.xrr")).by_kind("lost-pending")


def test_unknown_shadow_name_is_an_error(tmp_path: Path) -> None:
    sim, _ = ffs_guest(shadow=True)
    path = sim.write(tmp_path / "r.xrr")
    res = run("replay", path, "--shadow", "nope")
    assert res.exit_code == 2 and "no watch region named 'nope'" in res.output


# --------------------------------------------------------------------------- upcall mask, ABI


def test_upcall_masked_at_block(tmp_path: Path) -> None:
    sim = GuestSim()
    sim.hit("block")
    episode(sim, 1)
    sim.m.vcpu_info[0].evtchn_upcall_mask = 1
    blk = sim.hit("block")
    sim.hit("block")
    sim.m.vcpu_info[0].evtchn_upcall_mask = 0
    sim.hit("block")
    (f,) = replay(sim.write(tmp_path / "r.xrr")).by_kind("upcall-masked-at-block")
    assert (f.snapshot, f.block_snapshot, f.fields) == (blk, blk, ["evtchn_upcall_mask"])
    assert "next 1 block entries" in f.message


def test_abi_violations_while_only_xen_runs(tmp_path: Path) -> None:
    arch = "x86_64"
    idle = page_from_state(arch, 0, ~0x16 & ((1 << 4096) - 1), {0: (0, 0, 0)})
    # Xen sets the selector bit (and the upcall) for masked port 2
    bad_sel = page_from_state(arch, 1 << 2, ~0x12 & ((1 << 4096) - 1), {0: (1, 0, 1)})
    # evtchn_upcall_pending 0->1 with nothing pending
    bad_upc = page_from_state(arch, 0, ~0x16 & ((1 << 4096) - 1), {0: (1, 0, 0)})
    steps = [("block", 0, idle, 0x202, False), ("upcall", 0, bad_sel, 0x202, False),
             ("bottom-half", 0, idle, 0x202, False), ("block", 0, idle, 0x202, False),
             ("upcall", 0, bad_upc, 0x202, False)]
    result = replay(write_recording_ex(tmp_path / "r.xrr", arch, steps))
    abi = result.by_kind("abi-violation")
    assert [f.snapshot for f in abi] == [1, 4]
    assert "masked port(s) 2" in abi[0].message and abi[0].severity == "warning"
    assert "nothing is pending" in abi[1].message
    assert result.by_kind("spurious-upcall")[0].severity == "info"


# --------------------------------------------------------------------------- streaming


def _stream(n: int) -> int:
    """Peak traced memory of replaying ``n`` correct episodes fed straight to a Replayer."""
    from conftest import LAB_PROBES

    from xreplay.xrr import RecordingHeader

    header = RecordingHeader.for_arch("x86_64", LAB_PROBES)
    m = Evtchn2L.new("x86_64", all_masked=True)
    m.unmask(1)
    r = Replayer(header)

    def snap(i: int, probe: str) -> Snapshot:
        v = m.vcpu_info[0]
        return Snapshot("x86_64", i, i * 1000, probe, 0, 0, 0x202, m.evtchn_pending,
                        m.evtchn_mask, {0: VcpuState(0, v.evtchn_upcall_pending, 0,
                                                     v.evtchn_pending_sel, {})})

    tracemalloc.start()
    i = 0
    for _ in range(n):
        m.set_pending(1)
        r.feed(snap(i, "upcall"))
        r.feed(snap(i + 1, "bottom-half"))
        m.demux(0)
        r.feed(snap(i + 2, "block"))
        i += 3
    result = r.finish()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not result.findings and result.stats["snapshots"] == 3 * n
    return peak


def test_replay_streams_in_constant_memory() -> None:
    small, big = _stream(2_000), _stream(20_000)
    assert big < small + 64 * 1024, (small, big)


# --------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_text(tmp_path: Path) -> None:
    ok = correct_guest().write(tmp_path / "ok.xrr")
    res = run("replay", ok)
    assert res.exit_code == 0, res.output
    assert "no lost event delivery found" in res.output
    sim, at = lost_upcall_guest()
    bad = sim.write(tmp_path / "bad.xrr")
    res = run("replay", bad)
    assert res.exit_code == 1, res.output
    t = at["hang"] * 1000 / 1e9  # write_recording_ex: 1 us per snapshot
    assert f"missed-clear (error) at #{at['hang']} (t={t:.6f} s); vCPU 0; upcall " \
           f"#{at['upcall']}; block #{at['block']}" in res.output
    assert "state at #" in res.output and "1 [1/0/1]  (xenstore)" in res.output
    assert "1 finding(s): missed-clear x1" in res.output
    junk = tmp_path / "junk.xrr"
    junk.write_bytes(b"not a recording")
    for path in (junk, tmp_path / "missing.xrr"):
        res = run("replay", path)
        assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
        assert res.output.startswith("xreplay: error: ")


def test_a_recording_that_stops_short_gets_no_clean_verdict(tmp_path: Path) -> None:
    """The lost-upcall run cut before its hang (a killed recorder: a torn tail, or no end
    frame at a frame boundary) shows nothing lost in what is left; that is no verdict on the
    run (exit 2, saying why), while a finding in what is left still stands (exit 1)."""
    sim, at = lost_upcall_guest()
    whole = sim.write(tmp_path / "bad.xrr").read_bytes()
    with XrrReader(tmp_path / "bad.xrr") as r:
        offsets = [rec.offset for rec in r.records()]
    before_hang = offsets[at["upcall"]]  # the frames up to the hang's upcall, not after
    torn = tmp_path / "torn.xrr"
    torn.write_bytes(whole[:before_hang + 3])
    cut = tmp_path / "cut.xrr"
    cut.write_bytes(whole[:before_hang])
    for path, why in ((torn, f"torn tail at byte {before_hang}, no end frame"),
                      (cut, "no end frame")):
        res = run("replay", path)
        assert res.exit_code == 2, res.output
        assert "no lost event delivery found" not in res.output
        assert f"no verdict: the recording stops short ({why})" in res.output
        assert f"what came after #{at['upcall'] - 1} was never recorded" in res.output
        out = run("replay", path, "--json").output
        doc = json.loads(out[:out.rindex("}") + 1])  # the error line follows the document
        assert doc["incomplete"].startswith("the recording stops short")
    # every snapshot but a torn end frame: the missed clear stands, with the warning
    open_ = tmp_path / "open.xrr"
    open_.write_bytes(whole[:-1])
    with XrrReader(open_) as r:
        assert r.trailer is None and sum(1 for _ in r.records()) == len(offsets)
    res = run("replay", open_)
    assert res.exit_code == 1 and "1 finding(s): missed-clear x1" in res.output, res.output
    assert "warning: " in res.output and "the recording stops short" in res.output


def test_cli_json_shape(tmp_path: Path) -> None:
    sim, at = lost_upcall_guest()
    res = run("replay", sim.write(tmp_path / "bad.xrr"), "--json")
    assert res.exit_code == 1
    doc = json.loads(res.output)
    keys = {"kind", "snapshot", "upcall_snapshot", "block_snapshot", "vcpu", "ports", "fields",
            "message", "severity"}
    assert all(set(f) == keys for f in doc["findings"])
    mc = [f for f in doc["findings"] if f["kind"] == "missed-clear"][0]
    assert mc["snapshot"] == at["hang"] and mc["ports"] == [1, 3, 4] and mc["fields"] == UPC_SEL
    mp = [f for f in doc["findings"] if f["kind"] == "masked-pending"][0]
    assert mp["upcall_snapshot"] is None and mp["vcpu"] is None
    assert doc["stats"]["snapshots"] == at["hang"] + 1
    res = run("replay", correct_guest().write(tmp_path / "ok.xrr"), "--json", "--no-info")
    assert res.exit_code == 0 and json.loads(res.output)["findings"] == []


def test_cli_explain_range(tmp_path: Path) -> None:
    sim, at = lost_upcall_guest()
    res = run("replay", sim.write(tmp_path / "bad.xrr"), "--explain",
              f"{at['block']}..{at['upcall']}")
    assert "evtchn_pending port 3 (timer) 0->1 by Xen (evtchn_2l_set_pending)" in res.output
    assert ", quiet):" in res.output


def _mirage_hang_recording(tmp_path: Path) -> Path:
    """A last snapshot equal to domain 28 of the thread's second hang."""
    full = (1 << 4096) - 1
    hang = page_from_state("x86_64", 0b11100, full & ~0b11010, {0: (1, 0, 1)})
    steps = [("block", 0, hang, 0x202, False), ("hang", 0, hang, 0x202, True)]
    return write_recording_ex(tmp_path / "hang.xrr", "x86_64", steps,
                              labels={1: "xenstore", 2: "console", 3: "timer", 4: "netfront"})


def test_cli_debugkeys_agreement_and_disagreement(tmp_path: Path) -> None:
    path = _mirage_hang_recording(tmp_path)
    dump = DATA / "xen411-mirage-hang.txt"
    res = run("replay", path, "--debugkeys", dump)  # two domains, no --domain
    assert res.exit_code == 2 and "--domain" in res.output
    res = run("replay", path, "--debugkeys", dump, "--domain", "28", "--json")
    doc = json.loads(res.output)
    assert doc["debugkeys"]["agree"] is True
    assert [p["xen"] for p in doc["debugkeys"]["ports"]] == ["[0/0/1]", "[1/1/1]", "[1/0/1]",
                                                             "[1/0/1]"]
    res = run("replay", path, "--debugkeys", dump, "--domain", "27")
    assert res.exit_code == 1
    assert "port 4 (netfront): guest [1/0/1]  Xen -  DISAGREE: only in the snapshot" \
        in res.output
    assert "port 3 (timer): guest [1/0/1]  Xen [1/0/1]  agree" in res.output
    # a dump of our own: Xen says port 3 is not pending
    own = tmp_path / "e.txt"
    own.write_text("(XEN) 'e' pressed -> dumping event-channel info\n"
                   "(XEN) Event channel information for domain 1:\n"
                   "(XEN) Polling vCPUs: {}\n(XEN)     port [p/m/s]\n"
                   "(XEN)        3 [0/0/1]: s=5 n=0 x=0 v=0\n")
    doc = json.loads(run("replay", path, "--debugkeys", own, "--json").output)
    row = [p for p in doc["debugkeys"]["ports"] if p["port"] == 3][0]
    assert row["agree"] is False and row["fields"] == ["pending"]
    assert run("replay", path, "--debugkeys", tmp_path / "none.txt").exit_code == 2
