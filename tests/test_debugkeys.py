"""Tests for the 'e' debug-key parser: real dumps from the 2020 thread, synthetic 4.11/4.17+
dumps, damaged captures, and a render → parse round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xreplay import debugkeys as dk
from xreplay.errors import XReplayError
from xreplay.snapshot import PortState

DATA = Path(__file__).parent / "data" / "debugkeys"


def ps(port: int, p: int, m: int, s: int, state: int, **kw: object) -> PortState:
    """A 2-level port as the 'e' key shows it (n=0 x=0 unless given)."""
    kw.setdefault("notify_vcpu", 0)
    kw.setdefault("xen_consumer", 0)
    return PortState(port=port, pending=bool(p), masked=bool(m), selector=bool(s), state=state,
                     **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real dumps


def test_mirage_hang_dumps_from_the_thread() -> None:
    dumps = dk.parse_file(DATA / "xen411-mirage-hang.txt")
    assert [d.domid for d in dumps] == [27, 28]
    d27, d28 = dumps
    assert d27.polling_vcpus == frozenset() and d27.warnings == []
    assert d27.ports == [
        ps(1, 1, 0, 1, 3, remote_domain=0, remote_port=33),
        ps(2, 1, 1, 1, 3, remote_domain=0, remote_port=34),
        ps(3, 1, 0, 1, 5, virq=0),
    ]
    assert d28.ports == [
        ps(1, 0, 0, 1, 3, remote_domain=0, remote_port=33),
        ps(2, 1, 1, 1, 3, remote_domain=0, remote_port=34),
        ps(3, 1, 0, 1, 5, virq=0),
        ps(4, 1, 0, 1, 3, remote_domain=0, remote_port=35),
    ]
    # The hang signature: pending, unmasked, selector set, and no further upcall.
    assert [p.port for p in d27.pending_unmasked()] == [1, 3]
    assert d27.abi == "2l"
    # No banner and increasing domids: grouped as one key press.
    assert [d.dump_index for d in dumps] == [0, 0]


def test_mirage_render_matches_xen_byte_for_byte() -> None:
    text = (DATA / "xen411-mirage-hang.txt").read_text()
    d28 = dk.latest(dk.parse(text))[28]
    block = text[text.index("(XEN) Event channel information for domain 28:"):]
    block = block[: block.index("\n\n")]
    assert d28.render() == block


# --------------------------------------------------------------------------- synthetic dumps


def test_xen411_dom0_and_domu() -> None:
    dumps = dk.parse_file(DATA / "xen411-dom0-domu.txt")
    assert [(d.domid, d.dump_index) for d in dumps] == [(0, 0), (3, 0)]
    dom0, dom3 = dumps
    assert dom3.polling_vcpus == {0, 1, 3}
    assert dom0.port(8) == ps(8, 0, 0, 0, 4, pirq=9, irq=9)
    assert dom0.port(70) == ps(70, 0, 0, 0, 4, notify_vcpu=1, pirq=1022, irq=-1)
    assert dom0.port(12) == ps(12, 0, 0, 0, 2, remote_domain=0)
    assert dom0.port(16) == ps(16, 0, 0, 0, 1)
    assert dom0.port(6) == ps(6, 0, 0, 0, 6, notify_vcpu=1)
    assert dom0.port(7) == ps(7, 0, 0, 0, 5, virq=9)
    assert dom0.port(17) is None
    assert dom3.port(7) == ps(7, 1, 1, 0, 3, notify_vcpu=3, xen_consumer=1, remote_domain=0,
                              remote_port=15)
    text = (DATA / "xen411-dom0-domu.txt").read_text()
    assert dk.render(dumps) == text


def test_xen417_serial_capture_fifo_xsm_timestamps_crlf() -> None:
    raw = (DATA / "xen417-serial-fifo.txt").read_bytes()
    assert b"\r\n" in raw
    dumps = dk.parse_file(DATA / "xen417-serial-fifo.txt")
    assert [(d.domid, d.dump_index) for d in dumps] == [(0, 0), (2, 0), (0, 1), (2, 1)]
    first0 = dumps[0]
    assert first0.abi == "fifo"
    assert [p.fifo for p in first0.ports] == ["-", "B 3", "7", "B -", "?"]
    assert all(p.selector is None for p in first0.ports)
    assert first0.port(3) == PortState(port=3, pending=True, masked=False, fifo="7", state=4,
                                       notify_vcpu=0, xen_consumer=0, pirq=9, irq=9,
                                       xsm_label="system_u:object_r:irq_t")
    assert first0.port(4).xsm_label == "system_u:object_r:domU_t_channel"  # type: ignore[union-attr]
    assert dk.fifo_column("B 3") == dk.FifoColumn(word=True, busy=True, link=3)
    assert dk.fifo_column("B -") == dk.FifoColumn(word=True, busy=True)
    assert dk.fifo_column("?") == dk.FifoColumn(word=False)
    assert dumps[1].polling_vcpus == {1}
    # The guest's "(d2)" line is ignored; the line cut by the serial banner is reported.
    last = dumps[3]
    assert [p.port for p in last.ports] == [1, 3]
    assert len(last.warnings) == 1 and last.warnings[0].startswith("line 30: ")
    latest = dk.latest(dumps)
    assert latest[2] is last and latest[0] is dumps[2]


def test_fifo_render_restores_the_six_char_column() -> None:
    dumps = dk.parse_file(DATA / "xen417-serial-fifo.txt")
    out = dumps[0].render(prefix="")
    assert "       2 [1/0/B 3   ]: s=6 n=0 x=0 Z=system_u:system_r:dom0_t" in out
    assert "       5 [0/0/?     ]: s=2 n=0 x=0 d=2 Z=" in out
    assert "       1 [0/0/  -   ]: s=5 n=0 x=0 v=0 Z=" in out


def test_strict_names_the_line() -> None:
    with pytest.raises(XReplayError, match=r"xen417-serial-fifo.txt:30: malformed"):
        dk.parse_file(DATA / "xen417-serial-fifo.txt", strict=True)


@pytest.mark.parametrize("prefix", [
    "", "(XEN) ", "(XEN) [  123.456789] ", "(XEN) [2020-06-15 17:58:01] ",
    "(XEN) [2020-06-15 17:58:01.123] ", "(XEN) [0000000123456789] ",
    "[2020-06-15 17:58:01] ", "[2020-06-15 17:58:01] (XEN) [   12.000001] ", "> (XEN) ", "> > ",
])
def test_console_prefixes(prefix: str) -> None:
    body = ["Event channel information for domain 5:", "Polling vCPUs: {0,2-3}",
            "    port [p/m/s]", "       1 [1/0/1]: s=3 n=0 x=0 d=0 p=33",
            "    4095 [0/1/0]: s=5 n=3 x=0 v=0"]
    dumps = dk.parse("\r\n".join(prefix + line for line in body) + "\r\n")
    (d,) = dumps
    assert d.domid == 5 and d.polling_vcpus == {0, 2, 3} and d.warnings == []
    assert d.ports == [ps(1, 1, 0, 1, 3, remote_domain=0, remote_port=33),
                       ps(4095, 0, 1, 0, 5, notify_vcpu=3, virq=0)]


def test_noise_between_and_inside_sections_is_ignored() -> None:
    text = "\n".join([
        "(XEN) 'q' pressed -> dumping domain info (now = 812406113)",
        "(XEN) General information for domain 1:",
        "(XEN)     refcnt=3 dying=0 pause_count=0",
        "(d1) Solo5: hello",
        "(XEN) Event channel information for domain 1:",
        "(d1) Solo5: tick",
        "(XEN) Polling vCPUs: {}",
        "(XEN)     port [p/m/s]",
        "(XEN) Notifying guest 1:0 (virq 1, port 5)",
        "(XEN)        1 [1/0/1]: s=3 n=0 x=0 d=0 p=33",
        "random text 1 2 3",
        "(XEN) *** Serial input to Xen (type 'CTRL-a' three times to switch input)",
        "(XEN)        2 [0/0/1]: s=5 n=0 x=0 v=0",
    ])
    (d,) = dk.parse(text)
    assert [p.port for p in d.ports] == [1, 2] and d.warnings == []


def test_multiple_dumps_banner_and_domid_order() -> None:
    section = ("(XEN) Event channel information for domain {d}:\n(XEN) Polling vCPUs: {{}}\n"
               "(XEN)     port [p/m/s]\n(XEN)        1 [{p}/0/1]: s=5 n=0 x=0 v=0\n")
    banner = "(XEN) 'e' pressed -> dumping event-channel info\n"
    text = (banner + section.format(d=0, p=0) + section.format(d=7, p=0)
            + banner + section.format(d=7, p=1)            # banner: new dump
            + section.format(d=0, p=1) + section.format(d=7, p=1)  # domid drops: new dump
            + banner + banner + section.format(d=9, p=1))
    dumps = dk.parse(text)
    assert [(d.domid, d.dump_index) for d in dumps] == [(0, 0), (7, 0), (7, 1), (0, 2), (7, 2),
                                                        (9, 3)]
    latest = dk.latest(dumps)
    assert list(latest) == [0, 7, 9]
    assert latest[7] is dumps[4] and latest[7].ports[0].pending
    rendered = dk.render(dumps)
    assert rendered.count("'e' pressed") == 4
    assert [(d.domid, d.dump_index, d.ports) for d in dk.parse(rendered)] == \
        [(d.domid, d.dump_index, d.ports) for d in dumps]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text", ["", "(XEN) 'q' pressed -> dumping domain info\n",
                                  "(XEN)        1 [1/0/1]: s=3 n=0 x=0 d=0 p=33\n"])
def test_no_section_is_one_clear_error(text: str) -> None:
    with pytest.raises(XReplayError) as e:
        dk.parse(text, source="dmesg.txt")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("no 'Event channel information for domain' section found in dmesg.txt: "
                   "pass the output of `xl debug-keys e; xl dmesg`")


@pytest.mark.parametrize(("line", "why"), [
    ("       0 [1/0/1]: s=5 n=0 x=0 v=0", "port 0"),
    ("       1 [1/0/1]: s=7 n=0 x=0", "not an ECS state"),
    ("       1 [1/0/1]: s=3 n=0 x=0 v=0", "should be followed by d= p="),
    ("       1 [1/0/1]: s=4 n=0 x=0 p=9", "should be followed by p= i="),
    ("       1 [1/0/1]: s=5 n=0 x=0 v=0 q=1", "unexpected 'q=1'"),
    ("       1 [1/0/1]: s=3 n=0 x=", "format"),
    ("       1 [2/0/1]: s=3 n=0 x=0 d=0 p=1", "format"),
    ("       1 [1/0/X 1 ]: s=5 n=0 x=0 v=0", "FIFO state column"),
])
def test_malformed_port_lines_warn_or_raise(line: str, why: str) -> None:
    text = ("(XEN) Event channel information for domain 4:\n(XEN) Polling vCPUs: {}\n"
            f"(XEN)     port [p/m/s]\n(XEN) {line}\n(XEN)        2 [0/0/0]: s=6 n=0 x=0\n")
    (d,) = dk.parse(text)
    assert [p.port for p in d.ports] == [2]
    assert len(d.warnings) == 1 and d.warnings[0].startswith("line 4: ") and why in d.warnings[0]
    with pytest.raises(XReplayError, match=r"^x\.txt:4: malformed 'e' key line"):
        dk.parse(text, source="x.txt", strict=True)


def test_out_of_order_and_orphan_ports_are_reported() -> None:
    text = ("(XEN)        9 [1/0/1]: s=5 n=0 x=0 v=0\n"
            "(XEN) Event channel information for domain 4:\n(XEN) Polling vCPUs: {}\n"
            "(XEN)        5 [0/0/0]: s=6 n=0 x=0\n(XEN)        3 [0/0/0]: s=6 n=0 x=0\n")
    (d,) = dk.parse(text)
    assert [p.port for p in d.ports] == [5]
    assert d.warnings[0].startswith("line 1: port line outside any section")
    assert d.warnings[1].startswith("line 5: port 3 after port 5")


def test_bounded_input() -> None:
    huge = "x" * (dk.MAX_LINE_CHARS * 5)
    text = (f"{huge}\n(XEN) Event channel information for domain 1:\n"
            f"(XEN)        1 [1/0/1]: s=5 n=0 x=0 v=0 Z={huge}\n"
            "(XEN)        2 [1/0/1]: s=5 n=0 x=0 v=1\n")
    (d,) = dk.parse(text)
    assert [p.port for p in d.ports] == [1, 2]
    assert len(d.ports[0].xsm_label or "") < dk.MAX_LINE_CHARS
    with pytest.raises(dk.MalformedLine):
        dk.parse_vcpu_list("0-1000000000")
    many = "\n".join(f"(XEN) {i} [" for i in range(1, 500))
    (d,) = dk.parse("(XEN) Event channel information for domain 1:\n" + many)
    assert len(d.warnings) == dk.MAX_WARNINGS + 1


def test_vcpu_lists() -> None:
    assert dk.parse_vcpu_list("") == frozenset()
    assert dk.parse_vcpu_list("0-1,3") == {0, 1, 3}
    assert dk.parse_vcpu_list("5") == {5}
    assert dk.format_vcpu_list({0, 1, 3, 5, 6, 7}) == "0-1,3,5-7"
    assert dk.format_vcpu_list(()) == ""
    for bad in ("a", "1-", "3-1", ",", "1,,2"):
        with pytest.raises(dk.MalformedLine):
            dk.parse_vcpu_list(bad)


# --------------------------------------------------------------------------- JSON, compare


def test_json_shape_and_round_trip() -> None:
    dumps = dk.parse_file(DATA / "xen411-mirage-hang.txt")
    doc = json.loads(json.dumps(dk.to_json(dumps)))
    assert list(doc) == ["dumps"]
    first = doc["dumps"][0]
    assert {"domid", "polling_vcpus", "ports", "dump_index", "line", "warnings"} == set(first)
    assert first["domid"] == 27 and first["polling_vcpus"] == [] and first["line"] == 11
    assert first["ports"][0] == PortState.to_json(dumps[0].ports[0])
    assert first["ports"][0]["remote_port"] == 33
    assert dk.from_json(doc) == dumps
    with pytest.raises(XReplayError):
        dk.from_json({"dumps": [{"ports": []}]})


def test_compare() -> None:
    (d,) = dk.parse("(XEN) Event channel information for domain 27:\n"
                    "(XEN)        1 [1/0/1]: s=3 n=0 x=0 d=0 p=33\n"
                    "(XEN)        2 [1/1/1]: s=3 n=0 x=0 d=0 p=34\n"
                    "(XEN)        3 [1/0/1]: s=5 n=0 x=0 v=0\n")
    snap = [PortState(1, pending=True, masked=False, selector=True, label="xenstore"),
            PortState(2, pending=True, masked=True, selector=None),
            PortState(3, pending=False, masked=False, selector=False),
            PortState(9, pending=False, masked=False)]
    diffs = dk.compare(d, snap)
    assert [(x.port, x.fields, x.only_in) for x in diffs] == [
        (3, ("pending", "selector"), None), (9, (), "snapshot")]
    assert diffs[0].describe() == "port 3: pending dump=1 snapshot=0, selector dump=1 snapshot=0"
    assert diffs[1].describe() == "port 9: only in snapshot [0/0/?]"
    assert dk.compare(d, d.ports) == []
    only_dump = dk.compare(d, [])
    assert [x.only_in for x in only_dump] == ["dump"] * 3
    assert json.dumps([x.to_json() for x in diffs])


# --------------------------------------------------------------------------- property


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_:.-0123456789", min_size=1, max_size=40)
_i = st.integers(0, 32767)


@st.composite
def port_states(draw: st.DrawFn, port: int, fifo: bool) -> PortState:
    state = draw(st.integers(1, 6))
    tail: dict[str, object] = {}
    if state == 2:
        tail = {"remote_domain": draw(_i)}
    elif state == 3:
        tail = {"remote_domain": draw(_i), "remote_port": draw(st.integers(1, 131071))}
    elif state == 4:
        tail = {"pirq": draw(st.integers(0, 4095)), "irq": draw(st.integers(-1, 4095))}
    elif state == 5:
        tail = {"virq": draw(st.integers(0, 23))}
    col: dict[str, object]
    if fifo:
        link = draw(st.sampled_from(["?", "-", "B -", "0", "B 1", "4095", "B 131071"]))
        col = {"fifo": link}
    else:
        col = {"selector": draw(st.booleans())}
    return PortState(port=port, pending=draw(st.booleans()), masked=draw(st.booleans()),
                     state=state, notify_vcpu=draw(st.integers(0, 127)),
                     xen_consumer=draw(st.integers(0, 255)),
                     xsm_label=draw(st.none() | _label), **col, **tail)  # type: ignore[arg-type]


@st.composite
def domain_dumps(draw: st.DrawFn, fifo: bool = False) -> dk.DomainEvtchnDump:
    limit = 131071 if fifo else 4095
    ports = sorted(draw(st.sets(st.integers(1, limit), max_size=12)))
    return dk.DomainEvtchnDump(
        domid=draw(st.integers(0, 32767)),
        polling_vcpus=frozenset(draw(st.sets(st.integers(0, 127), max_size=8))),
        ports=[draw(port_states(p, fifo)) for p in ports])


@given(domain_dumps())
def test_render_parse_round_trip_2l(dump: dk.DomainEvtchnDump) -> None:
    text = dk.render([dump])
    (back,) = dk.parse(text, strict=True)
    assert (back.domid, back.polling_vcpus, back.ports) == (dump.domid, dump.polling_vcpus,
                                                           dump.ports)
    assert dk.render([back]) == text


@given(domain_dumps(fifo=True))
def test_render_parse_round_trip_fifo(dump: dk.DomainEvtchnDump) -> None:
    text = dk.render([dump], prefix="")
    (back,) = dk.parse(text, strict=True)
    assert back.ports == dump.ports
    for line in text.splitlines()[4:]:
        assert line.startswith("    ") and line[4:].split(" [")[0].strip().isdigit()
        assert len(line.split("[")[1].split("]")[0]) >= 4 + 6  # "p/m/" + 6-char column
