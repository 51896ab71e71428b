"""The lab guest's FIFO variants, recorded through gdbserver and replayed on the FIFO rules.

``fifo`` consumes its queues as Linux's events_fifo.c does (clear_linked with cmpxchg);
``fifo-lost-link`` clears LINKED with a plain read and store, so the LINK Xen sets in
between (the seeded race, ``hv_race``) is wiped and the xenstore reply queued behind the
netfront event is never seen: the planted lost link the replay must name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xreplay.abi import fifo as fa
from xreplay.debugkeys import parse
from xreplay.demo import record_lab_guest
from xreplay.lab.guests import FIFO_HIGH_PORT, FIFO_PAGES, FIFO_REGIONS, FIFO_VARIANTS, run_guest
from xreplay.replay import replay
from xreplay.xrr import XrrReader

pytestmark = [pytest.mark.gdbserver,
              pytest.mark.skipif(shutil.which("gdbserver") is None, reason="needs gdbserver")]

# what lab_record_options adds for a FIFO variant (given here too, so the test says it)
FIFO_OPTIONS = {"fifo_control_block": {0: FIFO_REGIONS["control_block"]},
                "fifo_event_pages": list(FIFO_PAGES),
                "fifo_page_count": FIFO_REGIONS["page_count"]}


def test_the_fifo_variants_run_as_designed() -> None:
    assert FIFO_VARIANTS == ("fifo", "fifo-lost-link")
    ok = run_guest("process", "fifo", seed=1, events=2000)
    assert ok.returncode == 0 and "LAB-DONE variant=fifo" in ok.output
    bad = run_guest("process", "fifo-lost-link", seed=1, events=2000)
    assert bad.hung and "LAB-HUNG variant=fifo-lost-link" in bad.output
    # the guest's own 'e'-style dump, in Xen's FIFO format: xenstore LINKED behind netfront
    (dump,) = parse(bad.output)
    assert dump.abi == "fifo"
    x, n = dump.port(1), dump.port(4)
    assert x is not None and n is not None
    assert (x.pending, x.masked, x.linked, x.link) == (True, False, True, 4)
    assert (n.pending, n.linked, n.link) == (True, True, 0)


def test_fifo_guest_records_and_replays_clean(tmp_path: Path) -> None:
    out = tmp_path / "fifo.xrr"
    res = record_lab_guest("process", "fifo", out, events=300, **FIFO_OPTIONS)
    assert res.snapshots > 300 and not res.unreadable
    with XrrReader(out) as r:
        assert r.header.abi == "fifo"
        snaps = list(r.snapshots())
    ups = [s for s in snaps if s.probe == "upcall"]
    # Xen queued something at every upcall: a ready bit set, its head LINKED
    assert all(s.fifo.control_blocks[0].ready for s in ups)
    timer_q = [s for s in ups if s.fifo.control_blocks[0].is_ready(fa.EVTCHN_FIFO_PRIORITY_MAX)]
    assert timer_q and all(s.fifo.control_blocks[0].head[0] == 3 for s in timer_q)
    assert any(s.port_state(3).linked for s in ups)
    result = replay(out)
    assert [f for f in result.findings if f.severity != "info"] == [], [
        f.message for f in result.findings]


def test_lost_link_is_named_by_replay(tmp_path: Path) -> None:
    out = tmp_path / "lost.xrr"
    res = record_lab_guest("process", "fifo-lost-link", out, **FIFO_OPTIONS)
    assert res.hang_snapshot is not None
    result = replay(out)
    errors = [f for f in result.findings if f.severity != "info"]
    assert errors, "the lost link was not found"
    first = errors[0]
    assert first.kind == "fifo-stranded" and first.ports == [1] and first.vcpu == 0
    assert "dropped the LINK" in first.message and "xenstore" in first.message
    with XrrReader(out) as r:
        at = r.snapshot(first.snapshot)
    x = at.port_state(1)
    assert (x.pending, x.masked, x.linked) == (True, False, True)
    assert not at.fifo.control_blocks[0].is_ready(fa.EVTCHN_FIFO_PRIORITY_DEFAULT)


def test_xreplay_record_cli_takes_fifo_regions(tmp_path: Path) -> None:
    """The equivalent command the demo prints for a FIFO variant, run as it is."""
    import shlex

    from click.testing import CliRunner

    from xreplay.cli import main
    from xreplay.demo import lab_record_options
    from xreplay.lab.guests import start_guest
    from xreplay.record.build import command_line

    out = tmp_path / "cli.xrr"
    with start_guest("process", "fifo-lost-link", seed=1, events=2000) as guest:
        line = command_line(lab_record_options(guest, out, hang_after=2.0))
        assert "--fifo-control-block 0=lab_control_block" in line
        assert "--fifo-event-page 'lab_event_pages[1]'" in line
        assert "--fifo-page-count '&lab_event_array_pages'" in line
        res = CliRunner().invoke(main, shlex.split(line)[1:])  # after "xreplay"
    assert res.exit_code == 0, res.output
    result = replay(out)
    assert [(f.kind, f.ports) for f in result.findings if f.severity != "info"][:1] == [
        ("fifo-stranded", [1])]
    bad = CliRunner().invoke(main, ["record", "--target", "127.0.0.1:1", "--fifo-event-page",
                                    "x", "-o", str(tmp_path / "y.xrr")])
    assert bad.exit_code == 2 and "--fifo-control-block" in bad.output


@pytest.mark.parametrize("kind", ["process", pytest.param("baremetal", marks=pytest.mark.qemu)])
def test_a_page_added_mid_run_is_read_from_the_hit_it_appears(kind: str, tmp_path: Path
                                                               ) -> None:
    """The fifo variant binds port 1100 half way through: a second event-array page, as
    Linux's expand_array. The recording follows the guest's page count, so that page is
    read from the hit where the count covers it, noted, and its port replayed."""
    if kind == "baremetal" and shutil.which("qemu-system-i386") is None:
        pytest.skip("needs qemu-system-i386")
    out = tmp_path / f"grow-{kind}.xrr"
    res = record_lab_guest(kind, "fifo", out, events=300, **FIFO_OPTIONS)
    assert not res.unreadable, res.unreadable  # page 1 before it exists is not "unreadable"
    with XrrReader(out) as r:
        assert [x.kind for x in r.header.regions if x.kind.startswith("fifo")] == [
            "fifo_control_block", "fifo_page_count", "fifo_event_page", "fifo_event_page"]
        snaps = list(r.snapshots())
        moved = [n.data for n in r.notes if n.data.get("event") == "region-moved"
                 and n.data.get("region") == "event_array.1"]
    assert not any(s.missing for s in snaps)
    sizes = [s.fifo.nr_ports for s in snaps]
    grown = sizes.index(2 * fa.EVENT_WORDS_PER_PAGE)
    # one page, then two from one hit on, never back
    assert 0 < grown < len(snaps) - 1 and set(sizes[:grown]) == {fa.EVENT_WORDS_PER_PAGE}
    assert set(sizes[grown:]) == {2 * fa.EVENT_WORDS_PER_PAGE}
    assert len(moved) == 1 and moved[0]["hit"] == grown and moved[0]["address"]
    assert all(s.port_state(FIFO_HIGH_PORT).masked is None or s.fifo.word(FIFO_HIGH_PORT) is None
               for s in snaps[:grown])
    # Xen's first notify on the new port: PENDING and LINKED on queue 7, then consumed
    high = [s.port_state(FIFO_HIGH_PORT) for s in snaps[grown:]]
    assert any(p.pending and p.linked and p.priority == fa.EVTCHN_FIFO_PRIORITY_DEFAULT
               for p in high)
    assert not high[-1].pending
    result = replay(out)
    assert [f for f in result.findings if f.severity != "info"] == [], [
        f.message for f in result.findings]
    assert result.stats["unreadable"] == {}
