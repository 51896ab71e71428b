"""The FIFO ABI end to end on recordings written by the real XrrWriter from a FIFO guest
model: decoding, the 'e'-key rendering against a real Xen 4.17 dump, and each detector."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from xreplay import debugkeys as dk
from xreplay.abi import fifo as fa
from xreplay.abi import layout
from xreplay.errors import XReplayError
from xreplay.replay import fifo_explain, replay
from xreplay.replay.fifo_model import EvtchnFifo
from xreplay.xrr import ProbeSpec, RecordingHeader, XrrReader, XrrWriter

DATA = Path(__file__).parent / "data" / "debugkeys"
LINUX_PROBES = [ProbeSpec("upcall", "xen_evtchn_do_upcall", "upcall"),
                ProbeSpec("bottom-half", "evtchn_fifo_handle_events", "bottom-half"),
                ProbeSpec("block", "xen_safe_halt", "block")]
LABELS = {1: "xenstore", 2: "console", 3: "timer"}


class FifoGuest:
    """A Linux-like FIFO guest: one snapshot per probe hit, Xen's side from the model."""

    def __init__(self, vcpus=(0,), pages: int = 1, notify=None) -> None:
        self.vcpus = tuple(vcpus)
        self.m = EvtchnFifo(self.vcpus, pages)
        self.notify = dict(notify or {})
        for p in LABELS:  # as Linux: VIRQ_TIMER at the highest priority, the rest at 7
            self.m.bind(p, self.notify.get(p, 0), fa.EVTCHN_FIFO_PRIORITY_MAX if p == 3
                        else fa.EVTCHN_FIFO_PRIORITY_DEFAULT)
            self.m.guest_unmask(p)
        self.steps: list = []

    def shared_info(self) -> bytes:
        s = layout("x86_64")
        page = bytearray(s.shared_info.sizeof())
        for v in self.vcpus:
            page[v * s.vcpu_info.sizeof()] = self.m.upcall_pending[v]
        return bytes(page)

    def hit(self, probe: str, vcpu: int = 0, hang: bool = False) -> int:
        regions = [self.shared_info()] + [self.m.control_block(v) for v in self.vcpus] + [
            self.m.page(i) for i in range(self.m.pages)]
        self.steps.append((probe, vcpu, regions, hang))
        return len(self.steps) - 1

    def episode(self, *ports: int, vcpu: int = 0, **kw) -> tuple[int, int, int]:
        for p in ports:
            self.m.evtchn_fifo_set_pending(p)
        u = self.hit("upcall", vcpu)
        self.m.upcall(vcpu)
        b = self.hit("bottom-half", vcpu)
        self.m.handle_events(vcpu, **kw)
        k = self.hit("block", vcpu)
        return u, b, k

    def write(self, path: Path) -> Path:
        header = RecordingHeader.for_arch("x86_64", LINUX_PROBES, vcpus=list(self.vcpus),
                                          fifo_pages=self.m.pages, labels=LABELS,
                                          notify=self.notify)
        with XrrWriter(path, header) as w:
            for i, (probe, vcpu, regions, hang) in enumerate(self.steps):
                w.append(probe=probe, vcpu=vcpu, pc=0x1000 + i, regions=regions,
                         regflags=0x202, t_ns=i * 1000, hang=hang)
        return path


def kinds(result) -> list[str]:
    return [f.kind for f in result.findings if f.severity != "info"]


def test_header_declares_fifo_regions_and_round_trips(tmp_path: Path) -> None:
    h = RecordingHeader.for_arch("x86_64", LINUX_PROBES, vcpus=[0, 1], fifo_pages=2)
    assert h.abi == "fifo"
    assert [(r.name, r.kind, r.size, r.vcpu, r.page) for r in h.regions[1:]] == [
        ("control_block.0", "fifo_control_block", 72, 0, None),
        ("control_block.1", "fifo_control_block", 72, 1, None),
        ("event_array.0", "fifo_event_page", 4096, None, 0),
        ("event_array.1", "fifo_event_page", 4096, None, 1)]
    back = RecordingHeader.from_json(h.to_json())
    assert back.regions == h.regions and back.abi == "fifo"
    # 2-level headers keep their JSON exactly (no "page" key) and their ABI
    two = RecordingHeader.for_arch("x86_64", LINUX_PROBES)
    assert two.abi == "2l" and all("page" not in r for r in two.to_json()["regions"])
    bad = h.to_json()
    del bad["regions"][3]["page"]
    with pytest.raises(XReplayError, match="FIFO region 'event_array.0'"):
        RecordingHeader.from_json(bad)


def test_decoding_a_linux_fifo_guest(tmp_path: Path) -> None:
    g = FifoGuest()
    g.hit("block")
    g.m.evtchn_fifo_set_pending(1)  # xenstore, on queue 7
    g.m.evtchn_fifo_set_pending(2)  # console, behind it
    g.m.evtchn_fifo_set_pending(3)  # timer, alone on queue 0
    u = g.hit("upcall")
    g.m.upcall(0)
    b = g.hit("bottom-half")
    assert g.m.handle_events(0) == [3, 1, 2]  # queue 0 first
    k = g.hit("block")
    with XrrReader(g.write(tmp_path / "fifo.xrr")) as r:
        assert r.header.abi == "fifo"
        snaps = list(r.snapshots())
    s = snaps[u]
    assert s.abi == "fifo" and s.nr_ports == 1024
    cb = s.fifo.control_blocks[0]
    assert cb.ready == 1 << 0 | 1 << 7 and cb.head[7] == 1 and cb.head[0] == 3
    assert s.vcpus[0].evtchn_upcall_pending == 1
    x, c, t = s.port_state(1), s.port_state(2), s.port_state(3)
    assert (x.pending, x.masked, x.linked, x.link, x.fifo, x.priority, x.queue_head) == (
        True, False, True, 2, "2", 7, 1)
    assert (c.pending, c.linked, c.link, c.fifo, c.priority, c.queue_head) == (
        True, True, 0, "0", 7, 1)
    assert (t.linked, t.link, t.priority, t.queue_head) == (True, 0, 0, 3)
    assert s.port_state(5).masked and not s.port_state(5).pending
    assert s.port_state(5) == s.port_state(5).__class__(
        port=5, pending=False, masked=True, fifo="-", busy=False, linked=False)
    assert s.port_state(2000).fifo == "?" and s.port_state(2000).masked
    assert s.interesting_ports() == [1, 2, 3]
    text = s.render()
    assert "control_block ready=0x81 head[0]=3 head[7]=1" in text
    assert "       1 [1/0/  2   ]  (xenstore)  [queue 7, head 1]" in text
    assert "       3 [1/0/  0   ]  (timer)  [queue 0, head 3]" in text
    # after the bottom half: consumed, acked, heads left stale as Xen leaves them
    done = snaps[k]
    assert done.fifo.control_blocks[0].ready == 0 and done.fifo.control_blocks[0].head[7] == 1
    assert [done.port_state(p).fifo for p in (1, 2, 3)] == ["-", "-", "-"]
    assert not done.evtchn_pending
    assert snaps[b].fifo.control_blocks[0].ready == 0x81  # taken by xchg inside the bh
    assert replay(tmp_path / "fifo.xrr").findings == []


def test_snapshot_meets_xen417_fifo_dump(tmp_path: Path) -> None:
    """Domain 2 of the real dump: ``1 [1/0/  -   ]``, ``2 [1/0/B 1   ]``, ``3 [0/0/  -   ]``."""
    dump = dk.parse_file(DATA / "xen417-serial-fifo.txt")[1]
    assert dump.domid == 2 and dump.abi == "fifo"
    assert dump.port(2).busy and dump.port(2).linked and dump.port(2).link == 1
    assert dump.port(1).linked is False and dump.port(1).busy is False
    g = FifoGuest(notify={2: 1}, vcpus=(0, 1))
    words = g.m.words
    words[1] = fa.make_word(pending=True)
    words[2] = fa.make_word(pending=True, linked=True, busy=True, link=1)
    words[3] = 0
    g.hit("block")
    with XrrReader(g.write(tmp_path / "d2.xrr")) as r:
        snap = next(r.snapshots())
    table = snap.port_table([1, 2, 3])
    assert dk.compare(dump, table) == []
    # each FIFO field the column prints is compared
    words[2] = fa.make_word(pending=True, linked=True, link=1)
    words[1] = fa.make_word(pending=True, linked=True, link=0)
    g.steps.clear()
    g.hit("block")
    with XrrReader(g.write(tmp_path / "d2b.xrr")) as r:
        snap = next(r.snapshots())
    diffs = {d.port: d.fields for d in dk.compare(dump, snap.port_table([1, 2, 3]))}
    assert diffs == {1: ("linked",), 2: ("busy",)}  # link: only when both are LINKED
    # and our 'e'-style rendering parses back to the same states with Xen's parser
    line = snap.port_state(2).render(xen_format=True)
    assert line == "       2 [1/0/  1   ]"
    assert "[1/0/  1   ]" in dk.render([dk.DomainEvtchnDump(
        domid=2, ports=[dk.parse_port_line(line + ": s=5 n=1 x=0 v=0")])])


def test_healthy_guest_many_episodes_has_no_error(tmp_path: Path) -> None:
    g = FifoGuest()
    g.hit("block")
    for i in range(150):
        g.episode(*((3,) if i % 3 else (3, 1)))
    res = replay(g.write(tmp_path / "ok.xrr"))
    assert res.findings == [] and res.stats["snapshots"] == 451
    assert res.stats["abi"] == "fifo" and res.stats["hits"]["block"] == 151


def test_unmask_in_place_while_pending_is_stranded(tmp_path: Path) -> None:
    g = FifoGuest()
    g.hit("block")
    g.m.guest_mask(2)
    g.m.evtchn_fifo_set_pending(2)  # masked: Xen sets PENDING, links nothing
    g.episode(3)
    g.m.guest_unmask_unsafe(2)  # the bug: no EVTCHNOP_unmask
    k = g.hit("block")
    res = replay(g.write(tmp_path / "strand.xrr"))
    assert kinds(res) == ["fifo-stranded"]
    f = res.findings[0]
    assert (f.snapshot, f.ports, f.vcpu) == (k, [2], 0)
    assert "port 2 (console)" in f.message and "EVTCHNOP_unmask" in f.message
    assert "event_array[2].LINKED" in f.fields
    # the correct unmask (hypercall, Xen relinks) is healthy
    g2 = FifoGuest()
    g2.hit("block")
    g2.m.guest_mask(2)
    g2.m.evtchn_fifo_set_pending(2)
    g2.episode(3)
    g2.m.guest_unmask(2)
    g2.episode()
    assert kinds(replay(g2.write(tmp_path / "ok.xrr"))) == []


def test_dropped_link_strands_the_rest_of_the_queue(tmp_path: Path) -> None:
    g = FifoGuest()
    g.hit("block")
    _, _, k = g.episode(1, 2, drop_link=1)  # the guest loses xenstore's LINK to console
    g.m.evtchn_fifo_set_pending(1)  # appended behind console: no ready, no upcall
    k2 = g.hit("block")
    res = replay(g.write(tmp_path / "drop.xrr"))
    stranded = res.by_kind("fifo-stranded")
    assert [(f.snapshot, f.ports) for f in stranded] == [(k, [2])]
    assert "LINK" in stranded[0].message and "whose ready bit is set" in stranded[0].message
    # xenstore again: Xen linked it behind console, so the stale head[7]=1 is LINKED with
    # ready clear, which fifo-ready-head names (once, not also as stranded)
    rh = res.by_kind("fifo-ready-head")
    assert [(f.snapshot, f.ports) for f in rh] == [(k2, [1])]
    assert "dropped a LINK" in rh[0].message
    assert kinds(res) == ["fifo-stranded", "fifo-ready-head"]
    assert g.m.upcall_pending[0] == 0  # indeed no upcall was raised for port 1


def test_ready_head_and_unlinked_head(tmp_path: Path) -> None:
    g = FifoGuest()
    g.hit("block")
    g.m.ready[0] = 1 << 5  # ready bit with head[5] == 0
    a = g.hit("upcall")
    g.m.ready[0] = 0
    g.m.evtchn_fifo_set_pending(3)
    g.m.ready[0] = 0  # the guest took ready but never walked the queue
    b = g.hit("block")
    res = replay(g.write(tmp_path / "rh.xrr"))
    rh = res.by_kind("fifo-ready-head")
    assert [(f.snapshot, f.vcpu) for f in rh] == [(a, 0), (b, 0)]
    assert "head[5]=0" in rh[0].message and "is LINKED but ready bit 0" in rh[1].message
    assert rh[1].ports == [3] and "control_block[0].ready" in rh[1].fields
    assert "queue 0" in rh[1].message
    g2 = FifoGuest()
    g2.m.evtchn_fifo_set_pending(3)
    g2.m.guest_clear_linked(3)  # unlinked behind Xen's back, ready still set
    c = g2.hit("block")
    res2 = replay(g2.write(tmp_path / "hu.xrr"))
    hu = res2.by_kind("fifo-head-unlinked")
    assert [(f.snapshot, f.ports) for f in hu] == [(c, [3])]
    assert "queue 0" in hu[0].message


def test_blocked_with_upcall_pending_and_ready_queues(tmp_path: Path) -> None:
    g = FifoGuest()
    g.hit("block")
    g.m.evtchn_fifo_set_pending(3)
    a = g.hit("block")  # a wake-up in flight: not yet a finding
    b = g.hit("block")  # blocks again with nothing run between: missed clear
    res = replay(g.write(tmp_path / "mc.xrr"))
    mc = res.by_kind("fifo-missed-clear")
    assert [(f.snapshot, f.block_snapshot, f.vcpu) for f in mc] == [(b, a, 0)]
    assert "evtchn_upcall_pending=1" in mc[0].message and "{0}" in mc[0].message
    g2 = FifoGuest()
    g2.hit("block")
    g2.m.evtchn_fifo_set_pending(3)
    h = g2.hit("block", hang=True)
    assert [f.snapshot for f in replay(g2.write(tmp_path / "h.xrr")).by_kind(
        "fifo-missed-clear")] == [h]


def test_masked_pending_is_info_and_cli_runs(tmp_path: Path) -> None:
    from xreplay.cli import main

    g = FifoGuest()
    g.hit("block")
    g.m.guest_mask(1)
    g.m.evtchn_fifo_set_pending(1)
    g.episode(3)
    path = g.write(tmp_path / "mp.xrr")
    res = replay(path)
    assert [(f.kind, f.severity, f.ports) for f in res.findings] == [
        ("fifo-masked-pending", "info", [1])]
    out = CliRunner().invoke(main, ["replay", str(path)])
    assert out.exit_code == 0, out.output
    assert "fifo-masked-pending" in out.output
    shown = CliRunner().invoke(main, ["show", str(path), "--at", "-1"])
    assert shown.exit_code == 0, shown.output
    assert "control_block ready=0x0 head[0]=3" in shown.output
    assert "[1/1/  -   ]" in shown.output


def test_diff_and_show_changes_speak_fifo(tmp_path: Path) -> None:
    from xreplay.cli import main
    from xreplay.replay import diff_recordings
    from xreplay.replay.diff import diff_snapshots

    ok = FifoGuest()
    ok.hit("block")
    for _ in range(4):
        ok.episode(3)
    bad = FifoGuest()
    bad.hit("block")
    bad.episode(3)
    bad.m.guest_mask(2)
    bad.m.evtchn_fifo_set_pending(2)
    bad.episode(3)
    bad.m.guest_unmask_unsafe(2)
    bad.episode(3)
    bad.episode(3)
    a, b = ok.write(tmp_path / "ok.xrr"), bad.write(tmp_path / "bad.xrr")
    d = diff_recordings(a, b)
    assert d.stats["a"]["findings"] == {}  # judged on the FIFO rules, not the 2-level ones
    assert d.stats["b"]["findings"] == {"fifo-stranded": 1}
    end = d.aligned[-1]
    assert end.ports == [{"port": 2, "label": "console", "a": "[0/0/-]", "b": "[1/0/-]",
                          "fields": ["PENDING"], "a_queue": None, "b_queue": None}]
    # B holds at a block what A never does, first the console PENDING behind its mask
    (rest,) = d.rest
    assert (rest.side, rest.snapshot) == ("b", 6)
    assert rest.facts == ["port 2 (console) PENDING and MASKED"]
    assert d.diverged
    # within one recording: the timer's word and the ready bit, not 2-level selectors
    sd = diff_snapshots(a, 0, 1)
    assert sd.text == ["event_array.PENDING port 3 (timer) 0->1",
                               "event_array.LINKED port 3 (timer) 0->1",
                               "control_block.ready vcpu 0 queue 0 0->1",
                               "evtchn_upcall_pending vcpu 0 0->1"]
    assert {"vcpu": 0, "field": "control_block.ready", "a": 0, "b": 1} in sd.state.vcpus
    assert not any(v["field"] == "evtchn_pending_sel" for v in sd.state.vcpus)
    # --explain judges the direct clear of MASKED on the FIFO rules
    out = CliRunner().invoke(main, ["replay", str(b), "--explain", "0.."])
    assert out.exit_code == 1, out.output
    assert ("event_array.MASKED port 2 (console) 1->0 by guest (a direct clear of MASKED): "
            "PENDING yet not LINKED") in out.output
    # the later hit is an upcall, so a step the probes did not see may explain it
    assert "is stranded, unless the guest consumed it since" in out.output
    assert "history of fifo-stranded at #" in out.output
    with XrrReader(b) as r:
        snaps = list(r.snapshots())
    k = next(i for i in range(1, len(snaps)) if snaps[i - 1].fifo.words[2] >> 30 & 1
             and not snaps[i].fifo.words[2] >> 30 & 1)
    (e,) = [e for e in fifo_explain.explain(snaps[k - 1], snaps[k], settled=True)
            if e.change.field == "event_array.MASKED"]
    assert not e.legal and e.describe(LABELS).endswith("the event is stranded [breaks the "
                                                       "FIFO ABI]")


def test_head_outside_the_recorded_array_is_a_warning(tmp_path: Path) -> None:
    g = FifoGuest()
    g.m.head[0][7] = 5000  # beyond the one page recorded
    k = g.hit("block")
    res = replay(g.write(tmp_path / "far.xrr"))
    (f,) = res.by_kind("fifo-head-unlinked")
    assert (f.snapshot, f.severity, f.ports) == (k, "warning", [5000])
    assert "re-record" in f.message


def test_pages_the_guest_adds_are_followed_by_its_page_count(tmp_path: Path) -> None:
    """A fifo_page_count region (Linux's event_array_pages) says which declared pages are
    in use at each hit: pages not in use yet are neither ports nor unreadable, a page in
    use that was not read is missing, and pages in use past those declared are missing
    (never taken for no ports)."""
    from xreplay.inspect import summary

    h = RecordingHeader.for_arch("x86_64", LINUX_PROBES, fifo_pages=3,
                                 fifo_page_count="0xffffffff82c43140", labels=LABELS)
    assert [(r.name, r.kind, r.size) for r in h.regions[1:3]] == [
        ("control_block.0", "fifo_control_block", 72),
        ("event_array_pages", "fifo_page_count", 4)]
    assert RecordingHeader.from_json(h.to_json()).regions == h.regions
    for broken, why in ((lambda j: j["regions"][2].update(size=8), "4-byte page count"),
                        (lambda j: j["regions"].append(dict(j["regions"][2], name="n2")),
                         "more than one fifo_page_count"),
                        (lambda j: j.update(regions=j["regions"][:3]), "no fifo_event_page")):
        bad = h.to_json()
        broken(bad)
        with pytest.raises(XReplayError, match=why):
            RecordingHeader.from_json(bad)

    m = EvtchnFifo((0,), pages=2)  # Xen's view once the guest has given it page 1
    for p in LABELS:
        m.bind(p, 0, fa.EVTCHN_FIFO_PRIORITY_DEFAULT)
        m.guest_unmask(p)
    shared = bytes(layout("x86_64").shared_info.sizeof())

    def n(count: int) -> bytes:
        return count.to_bytes(4, "little")

    hits = [  # (page count, page 0, page 1, page 2)
        (n(1), m.page(0), None, None),  # #0-1: one page in use, two declared spare
        (n(1), m.page(0), None, None)]
    m.bind(1100, 0, fa.EVTCHN_FIFO_PRIORITY_DEFAULT)  # expand_array, then bind and unmask
    m.guest_unmask(1100)
    m.evtchn_fifo_set_pending(1100)
    hits += [(n(2), m.page(0), m.page(1), None),  # #2: page 1 read from here on
             (n(2), m.page(0), None, None),  # #3: in use but not read: missing
             (n(4), m.page(0), m.page(1), bytes(4096)),  # #4: page 3 in use, not declared
             (None, m.page(0), None, None)]  # #5: the count not read
    path = tmp_path / "grow.xrr"
    with XrrWriter(path, h) as w:
        for i, (count, *pages) in enumerate(hits):
            w.append(probe="upcall", vcpu=0, pc=0x1000, t_ns=i,
                     regions=[shared, m.control_block(0), count, *pages])
    with XrrReader(path) as r:
        snaps = list(r.snapshots())
        info = summary(r)
    assert [s.fifo.nr_ports for s in snaps[:3]] == [1024, 1024, 2048]
    assert [s.missing for s in snaps] == [
        (), (), (), ("event_array.1",), ("event_array.3",),
        ("event_array_pages", "event_array.1", "event_array.2")]
    assert snaps[0].fifo.word(1100) is None
    assert (snaps[2].port_state(1100).pending, snaps[2].port_state(1100).linked) == (True, True)
    assert {k: v["snapshots"] for k, v in info["unreadable"].items()} == {
        "event_array.1": 2, "event_array.2": 1, "event_array_pages": 1}
    res = replay(path)
    assert res.stats["snapshots"] == 3 and res.stats["recorded"] == 6  # judged: #0-2 only
