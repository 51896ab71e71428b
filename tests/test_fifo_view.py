"""What the viewers show of real FIFO recordings: VCD and Perfetto exports, ``replay
--explain`` and ``diff``.

The recordings are the lab guest's FIFO variants recorded through gdbserver
(``recordings/fifo-lost-link-process.xrr``, and a fresh ``fifo`` run) and the Xen lab's PV
Linux domU on FIFO (``recordings/xenlab-pv-domu-fifo.xrr``).  Expected values are read
from the recordings themselves with the reader, never written down from an export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from xreplay.abi import fifo as fa
from xreplay.cli import main
from xreplay.replay.diff import diff_recordings
from xreplay.xrr import XrrReader

REC = Path(__file__).parent.parent / "recordings"
LOST = REC / "fifo-lost-link-process.xrr"  # seed 1, 2000 events: lost link found at #260
XENLAB = REC / "xenlab-pv-domu-fifo.xrr"


def run(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def parse_vcd(text: str) -> tuple[dict[str, str], list[tuple[int, dict[str, str]]]]:
    """(scope.name -> identifier, [(time, {identifier: value as written})])."""
    head, body = text.split("$enddefinitions $end\n", 1)
    names, scope = {}, []
    for line in head.splitlines():
        parts = line.split()
        if parts[:2] == ["$scope", "module"]:
            scope.append(parts[2])
        elif parts[:1] == ["$upscope"]:
            scope.pop()
        elif parts[:1] == ["$var"]:
            names[".".join(scope[1:] + [parts[4]])] = parts[3]
    frames: list[tuple[int, dict[str, str]]] = []
    for line in body.splitlines():
        if line.startswith("#"):
            frames.append((int(line[1:]), {}))
        elif line.startswith("b"):
            value, ident = line[1:].split()
            frames[-1][1][ident] = value
        elif line:
            frames[-1][1][line[1:]] = line[0]
    return names, frames


def values_at(frames: list[tuple[int, dict[str, str]]]) -> list[dict[str, str]]:
    """The value of every signal at each timestamp (VCD writes only changes)."""
    now: dict[str, str] = {}
    out = []
    for _, changes in frames:
        now = {**now, **changes}
        out.append(now)
    return out


def test_vcd_of_the_lost_link_shows_the_fifo_fields_of_the_ports_that_move(tmp_path: Path
                                                                           ) -> None:
    out = tmp_path / "lost.vcd"
    res = run("export", LOST, "-o", out)
    assert res.exit_code == 0, res.output
    names, frames = parse_vcd(out.read_text())
    with XrrReader(LOST) as r:
        snaps = list(r.snapshots())
    assert len(frames) == len(snaps) == 1597
    # one 1024-port page, four ports that ever move: four port scopes, not 1024
    ports = sorted({n.split(".")[0] for n in names if n.startswith("port")})
    assert ports == ["port1_xenstore", "port2_console", "port3_timer", "port4_netfront"]
    assert {n for n in names if n.startswith("vcpu0.")} == {
        "vcpu0.evtchn_upcall_pending", "vcpu0.evtchn_upcall_mask", "vcpu0.ready",
        "vcpu0.head_0", "vcpu0.head_7"}
    at = values_at(frames)
    sig = {n: names[n] for n in names}
    # the timer's first LINKED edge lands on the timestamp of the snapshot that shows it
    first = next(s for s in snaps if s.port_state(3).linked)
    i = first.index
    assert frames[i][0] == first.t_ns
    assert frames[i][1][sig["port3_timer.linked"]] == "1"
    assert at[i - 1][sig["port3_timer.linked"]] == "0"
    # at #260 (the finding): xenstore PENDING and LINKED with LINK 4, queue 7's head 4
    # while its ready bit is clear
    s260 = snaps[260]
    assert s260.fifo.control_blocks[0].head[7] == 4 and not s260.fifo.control_blocks[0].ready
    v = at[260]
    assert (v[sig["port1_xenstore.pending"]], v[sig["port1_xenstore.linked"]],
            v[sig["port1_xenstore.masked"]]) == ("1", "1", "0")
    assert int(v[sig["port1_xenstore.link"]], 2) == s260.port_state(1).link == 4
    assert int(v[sig["vcpu0.head_7"]], 2) == 4 and int(v[sig["vcpu0.ready"]], 2) == 0
    # every snapshot's values agree with the reader's decoding
    for s, row in zip(snaps[::97], at[::97], strict=True):
        cb = s.fifo.control_blocks[0]
        assert int(row[sig["vcpu0.ready"]], 2) == cb.ready
        for p, scope in ((1, "port1_xenstore"), (4, "port4_netfront")):
            w = fa.EventWord(s.fifo.words[p])
            assert row[sig[f"{scope}.pending"]] == str(int(w.pending))
            assert row[sig[f"{scope}.busy"]] == str(int(w.busy))


def test_vcd_of_the_xen_lab_linux_fifo_domu(tmp_path: Path) -> None:
    out = tmp_path / "domu.vcd"
    assert run("export", XENLAB, "-o", out).exit_code == 0
    names, frames = parse_vcd(out.read_text())
    ports = sorted({n.split(".")[0] for n in names if n.startswith("port")})
    assert "port3_VIRQ_TIMER" in ports and len(ports) < 16  # of a 1024-port array
    at = values_at(frames)
    with XrrReader(XENLAB) as r:
        snaps = list(r.snapshots())
    timer_q0 = [s.index for s in snaps if s.fifo.control_blocks[0].is_ready(0)]
    assert timer_q0, "Linux raises VIRQ_TIMER to queue 0"
    for i in timer_q0[:20]:
        assert int(at[i][names["vcpu0.ready"]], 2) & 1
        assert int(at[i][names["vcpu0.head_0"]], 2) == snaps[i].fifo.control_blocks[0].head[0]


def test_perfetto_export_of_the_lost_link(tmp_path: Path) -> None:
    out = tmp_path / "lost.json"
    assert run("export", LOST, "--format", "chrome", "-o", out).exit_code == 0
    events = json.loads(out.read_text())
    instants = [e for e in events if e["ph"] == "i"]
    assert len(instants) == 1597 and instants[-1]["name"] == "hang (HANG)"
    i260 = instants[260]["args"]
    assert i260["snapshot"] == 260 and i260["ready_queues"] == []
    assert i260["linked"] == ["1 (xenstore)", "4 (netfront)"]
    assert i260["head"] == {"0": 3, "7": 4}
    ts = instants[260]["ts"]

    def counter(name: str) -> dict:  # its value at #260: the last sample at or before it
        return [e for e in events if e["ph"] == "C" and e["name"] == name
                and e["ts"] <= ts][-1]["args"]

    assert counter("port 1 (xenstore)") == {"PENDING": 1, "MASKED": 0, "LINKED": 1,
                                            "BUSY": 0, "LINK": 4}
    assert counter("vcpu0 queue 7") == {"ready": 0, "head": 4}
    names = {e["name"] for e in events if e["ph"] == "C"}
    assert not any(n.startswith("port 5") for n in names)  # idle ports get no track


def test_explain_of_the_lost_link_names_port_1_and_queue_7_history() -> None:
    res = run("replay", LOST, "--explain", "240..260", "--tables", "0")
    assert res.exit_code == 1, res.output
    out = res.output
    assert "history of fifo-stranded at #260 (port 1, vCPU 0 queue 7, vCPU 0 upcall):" in out
    story = out.split("history of fifo-stranded at #260")[1].split("history of")[0]
    assert ("#259 -> #260 (block): event_array.LINKED port 1 (xenstore) 0->1 by Xen "
            "(evtchn_fifo_set_pending / evtchn_fifo_unmask): on no queue a head leads to"
            ) in story
    assert "#259 -> #260 (block): event_array.LINK port 1 (xenstore) 0->4 by Xen" in story
    assert "port 4 is lost with it" in story
    assert ("control_block.ready vcpu 0 queue 7 1->0 by guest (xchg(ready) in "
            "__evtchn_fifo_handle_events)") in story
    assert "evtchn_upcall_pending vcpu 0 0->1 by Xen (vcpu_mark_events_pending)" in story
    ready_head = out.split("history of fifo-ready-head at #260")[1]
    assert "(port 4, vCPU 0 queue 7, vCPU 0 upcall)" in ready_head
    assert "control_block.head[7] vcpu 0 1->4 by Xen (evtchn_fifo_set_pending)" in ready_head
    doc = json.loads(run("replay", LOST, "--explain", "240..260", "--json").output)
    (h,) = [h for h in doc["history"] if h["kind"] == "fifo-stranded"]
    assert h["subjects"] == ["port 1", "vCPU 0 queue 7", "vCPU 0 upcall"]
    assert {c["subject"] for c in h["changes"]} == set(h["subjects"])
    assert all(c["to"] <= 260 for c in h["changes"])
    assert doc["explain"][0]["from"] == 240 and doc["explain"][-1]["to"] == 260


def test_explain_of_a_healthy_fifo_domu_breaks_no_rule() -> None:
    doc = json.loads(run("replay", XENLAB, "--explain", "0..", "--json").output)
    assert len(doc["explain"]) == 299
    changes = [c for row in doc["explain"] for c in row["changes"]]
    assert any(c["field"] == "event_array.LINKED" and c["index"] == 3 for c in changes)
    assert all(c["legal"] for c in changes), [c for c in changes if not c["legal"]]


@pytest.mark.gdbserver
@pytest.mark.skipif(shutil.which("gdbserver") is None, reason="needs gdbserver")
def test_diff_working_vs_lost_link_in_fifo_fields(tmp_path: Path) -> None:
    from xreplay.demo import record_lab_guest
    from xreplay.lab.guests import FIFO_REGIONS

    ok = tmp_path / "fifo.xrr"
    record_lab_guest("process", "fifo", ok, events=600,
                     fifo_control_block={0: FIFO_REGIONS["control_block"]},
                     fifo_event_pages=[FIFO_REGIONS["event_array"]])
    d = diff_recordings(ok, LOST)
    assert d.stats["a"]["findings"].get("fifo-stranded") is None
    rest = d.rest[0]
    assert (rest.side, rest.snapshot) == ("b", 260)
    assert "port 1 (xenstore) PENDING and LINKED on no queue a head leads to" in rest.facts
    assert "vCPU 0 queue 7: head LINKED, ready clear" in rest.facts
    (point,) = [s for s in d.aligned if s.label.startswith("at rest")]
    assert point.b_snapshot == 260
    x = next(p for p in point.ports if p["port"] == 1)
    assert x["b"] == "[1/0/4]" and {"PENDING", "LINKED"} <= set(x["fields"])
    res = run("diff", ok, LOST)
    assert res.exit_code == 1
    assert "FIFO state at rest: in B, at rest (block or hang) #260: port 1 (xenstore)" in \
        res.output.replace("\n", " ")


def test_explain_history_of_a_two_level_finding() -> None:
    """The same history, on the 2-level rules: the seed's missed clear."""
    rec = REC / "lost-upcall-process.xrr"
    res = run("replay", rec, "--explain", "480..", "--tables", "0")
    assert res.exit_code == 1
    story = res.output.split("history of missed-clear at #486 (port 1, port 3, port 4, "
                             "vCPU 0 upcall):")[1]
    assert ("#484 -> #485 (upcall, quiet): evtchn_upcall_pending vcpu 0 0->1 by Xen or guest"
            in story)
    assert "#483 -> #484 (block): evtchn_upcall_pending vcpu 0 1->0 by guest" in story
