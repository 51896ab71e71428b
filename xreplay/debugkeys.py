"""Parse Xen's 'e' debug key (``xl debug-keys e; xl dmesg``) into :class:`PortState`\\ s.

The 'e' key is what a Xen developer asks for first when a guest hangs ("what does Xen think
is pending?"), so xreplay reads it to seed or check a recording against a real host.  The
format (``xen/common/event_channel.c``, ``domain_dump_evtchn_info``) is the same in Xen
4.11-4.21::

    'e' pressed -> dumping event-channel info
    Event channel information for domain 27:
    Polling vCPUs: {0-1,3}
        port [p/m/s]
           1 [1/0/1]: s=3 n=0 x=0 d=0 p=33

Input is whatever a user pastes: ``xl dmesg`` (``(XEN) `` prefix), a serial capture
(timestamps, CRLF, other CPUs' and guests' lines in between) or a mail quote (``> (XEN)``).
Lines are read one at a time with a length cap, and every regex is anchored and bounded, so a
huge or hostile file costs linear time and bounded memory per line.

Error policy: text with no section header raises :class:`XReplayError`.  A line inside a
section that starts like a port line but does not parse (cut by the console ring, or mixed
with another CPU's output) is skipped and noted in :attr:`DomainEvtchnDump.warnings` with its
line number; ``strict=True`` raises instead.  Unrelated lines are ignored silently.

Several dumps: an ``'e' pressed`` banner starts a new dump, and so does a domain header whose
domid does not increase (Xen walks domains in domid order), which also splits pasted dumps
that lost their banner.  Each section keeps its ``dump_index``; :func:`latest` picks the last
section per domain.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import os
import re
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from xreplay.abi.ports import (
    EVTCHN_FIFO_LINK_MASK,
    EVTCHN_FIFO_NR_CHANNELS,
    MAX_VIRT_CPUS,
    nr_ports,
)
from xreplay.errors import DebugKeysFormatError, XReplayError
from xreplay.snapshot import PortState

__all__ = [
    "DomainEvtchnDump", "FifoColumn", "MalformedLine", "PortDiff", "VcpuSet", "compare",
    "fifo_column",
    "format_vcpu_list", "from_json", "latest", "parse", "parse_file", "parse_lines",
    "parse_port_line", "parse_vcpu_list", "render", "strip_console_prefix", "to_json",
]

# Longest console line we look at.  Xen's printk buffer is 1 KiB; anything longer is not an
# 'e' line, and the cap keeps matching cost per line constant.
MAX_LINE_CHARS = 4096
# Upper bound for vCPU ids in "Polling vCPUs"; stops "{0-10**9}" from meaning anything.
MAX_VCPUS = MAX_VIRT_CPUS
# Per section: enough to diagnose a damaged capture without growing without bound.
MAX_WARNINGS = 100

BANNER = "'e' pressed -> dumping event-channel info"
COLUMN_HEADER = "    port [p/m/s]"

# Numbers are ASCII digits only (re.ASCII): Python's \d and str.isdigit() also take
# superscripts, Arabic-Indic and fullwidth digits, which Xen never prints.
_HEADER = re.compile(r"Event channel information for (?:domain |d)(\d{1,5}):", re.ASCII)
_POLLING = re.compile(r"Polling vCPUs: \{([0-9, -]{0,4096})\}", re.ASCII)
# printk("    %4u [%d/%d/", ...) print_state() printk("]: s=%d n=%d x=%d", ...) + tail.
_PORT = re.compile(
    r"(\d{1,7}) \[([01])/([01])/([^\]]{1,8})\]: s=(\d{1,3}) n=(-?\d{1,10}) x=(\d{1,3})(.*)",
    re.ASCII)
# Any digits here (not re.ASCII): a port line with Unicode digits is reported, not skipped.
_PORT_START = re.compile(r"\d{1,10} {0,4}\[")
# The s column of the 2-level ABI: evtchn_2l_print_state's "%d" of one bit.  The FIFO ABI's
# (evtchn_fifo_print_state: "?     ", "%c -   ", "%c %-4u") is checked by rendering it back.
_CELL_2L = re.compile(r"[01]")
_2L_MAX_PORTS = nr_ports(64)
# Timestamps Xen (console_timestamps=boot/date/datems/raw) or a capture tool puts in front.
_STAMP = re.compile(r"\[[0-9 .:,T+/-]{1,40}\] ?", re.ASCII)
_TAIL_TOKEN = re.compile(r"([dpiv])=(-?\d{1,10})", re.ASCII)
_UINT = re.compile(r"[0-9]{1,7}", re.ASCII)

# Type-specific tokens after "x=%d", by ECS state, in the order Xen prints them.
_TAIL_KEYS: dict[int, tuple[str, ...]] = {
    0: (), 1: (), 2: ("d",), 3: ("d", "p"), 4: ("p", "i"), 5: ("v",), 6: (),
}
_TAIL_FIELD = {
    (2, "d"): "remote_domain", (3, "d"): "remote_domain", (3, "p"): "remote_port",
    (4, "p"): "pirq", (4, "i"): "irq", (5, "v"): "virq",
}


class MalformedLine(DebugKeysFormatError):
    """A port line that does not follow Xen's format; the message says what is wrong."""


# --------------------------------------------------------------------------- data types


@dataclass(slots=True)
class DomainEvtchnDump:
    """One "Event channel information for domain N" section of one 'e' key press.

    ``dump_index`` counts key presses in the input (0-based), so sections printed by the same
    press share it; ``line`` is the 1-based line of the section header; ``warnings`` lists
    port lines that were skipped (``"line N: why"``).
    """

    domid: int
    dump_index: int = 0
    polling_vcpus: Set[int] = frozenset()  # a VcpuSet when parsed
    ports: list[PortState] = field(default_factory=list)
    line: int = 0
    warnings: list[str] = field(default_factory=list)

    def port(self, port: int) -> PortState | None:
        """The state Xen printed for ``port``, or None if the port was not listed (free)."""
        for p in self.ports:
            if p.port == port:
                return p
        return None

    @property
    def abi(self) -> Literal["2l", "fifo"] | None:
        """Which event-channel ABI the ``s`` column shows (None: no ports to tell)."""
        if not self.ports:
            return None
        return "fifo" if self.ports[0].fifo is not None else "2l"

    def pending_unmasked(self) -> list[PortState]:
        """Ports Xen holds as ``[1/0/x]``: raised and deliverable, waiting for the guest."""
        return [p for p in self.ports if p.pending and not p.masked]

    def render(self, prefix: str = "(XEN) ") -> str:
        """This section exactly as Xen prints it (``prefix`` on every line)."""
        lines = [f"Event channel information for domain {self.domid}:",
                 f"Polling vCPUs: {{{format_vcpu_list(self.polling_vcpus)}}}",
                 COLUMN_HEADER]
        lines.extend(_render_port(p) for p in self.ports)
        return "\n".join(prefix + line for line in lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "dump_index": self.dump_index,
            "domid": self.domid,
            "line": self.line,
            "polling_vcpus": list(self.polling_vcpus) if isinstance(self.polling_vcpus, VcpuSet)
            else sorted(self.polling_vcpus),
            "ports": [p.to_json() for p in self.ports],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class FifoColumn:
    """The FIFO ABI's ``s`` column decoded (``evtchn_fifo_print_state``).

    ``word`` False means Xen had no event word for the port (``?``); ``link`` is None when
    the event is not LINKED into a queue (``-``).
    """

    word: bool
    busy: bool = False
    link: int | None = None


@dataclass(frozen=True, slots=True)
class PortDiff:
    """How one port differs between Xen's dump and another view (e.g. a guest snapshot).

    ``fields`` names the bits that disagree, among ``pending``, ``masked``, ``selector``
    (selector only when both sides know it).  When the port is on one side only, the other
    side is None and ``fields`` is empty.
    """

    port: int
    dump: PortState | None
    snapshot: PortState | None
    fields: tuple[str, ...] = ()

    @property
    def only_in(self) -> Literal["dump", "snapshot"] | None:
        if self.snapshot is None:
            return "dump"
        if self.dump is None:
            return "snapshot"
        return None

    def describe(self) -> str:
        """One line for a human: ``port 3: pending dump=1 snapshot=0``."""
        if self.only_in is not None:
            side = self.dump if self.snapshot is None else self.snapshot
            assert side is not None
            return f"port {self.port}: only in {self.only_in} {side.pms}"
        parts = []
        for name in self.fields:
            a, b = getattr(self.dump, name), getattr(self.snapshot, name)
            parts.append(f"{name} dump={int(a)} snapshot={int(b)}")
        return f"port {self.port}: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "only_in": self.only_in, "fields": list(self.fields),
                "dump": None if self.dump is None else self.dump.to_json(),
                "snapshot": None if self.snapshot is None else self.snapshot.to_json()}


# --------------------------------------------------------------------------- small parsers


def strip_console_prefix(line: str) -> str:
    """Drop what the console and capture tools put before Xen's text.

    Removes everything up to ``(XEN)`` when it appears near the start (capture-tool
    timestamps, ``> `` mail quoting), else leading ``>`` quoting; then up to three
    ``[timestamp]`` groups.  Callers strip the remaining whitespace: the 'e' format does
    not depend on it.
    """
    s = line
    tag = s.find("(XEN)", 0, 128)
    s = s[tag + 5:] if tag >= 0 else s.lstrip("> \t")
    for _ in range(3):
        t = s.lstrip()
        m = _STAMP.match(t) if t.startswith("[") else None
        if m is None:
            break
        s = t[m.end():]
    return s


class VcpuSet(Set):
    """An immutable set of vCPU ids kept as sorted ``(first, last)`` runs.

    ``Polling vCPUs: {0-8191}`` costs two numbers, not 8192 (memory stays proportional to
    the text); iteration is in increasing order; equal to any set with the same members.
    """

    __slots__ = ("_firsts", "_runs")

    def __init__(self, vcpus: Iterable[int] = (), *, runs: Iterable[tuple[int, int]] = ()
                 ) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([*runs, *((v, v) for v in vcpus)]):
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self._runs = tuple(merged)
        self._firsts = [lo for lo, _ in merged]

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        return self._runs

    def __contains__(self, vcpu: object) -> bool:
        if not isinstance(vcpu, int):
            return False
        i = bisect.bisect_right(self._firsts, vcpu) - 1
        return i >= 0 and vcpu <= self._runs[i][1]

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self._runs:
            yield from range(lo, hi + 1)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self._runs)

    __hash__ = Set._hash

    def __repr__(self) -> str:
        return f"VcpuSet({{{format_vcpu_list(self)}}})"


def parse_vcpu_list(text: str) -> VcpuSet:
    """Parse ``bitmap_scnlistprintf`` output (``0-1,3``; empty for none).

    Xen 4.11 calls ``bitmap_scnlistprintf`` itself and 4.12+ print ``%*pbl``, which is the
    same routine, so one grammar covers both; spaces are tolerated.  Every id must be below
    :data:`MAX_VCPUS`; the result holds runs, not members.
    """
    body = text.replace(" ", "")
    if not body:
        return VcpuSet()
    runs = []
    for item in body.split(","):
        lo_s, sep, hi_s = item.partition("-")
        if not _UINT.fullmatch(lo_s) or (sep and not _UINT.fullmatch(hi_s)):
            raise MalformedLine(f"bad vCPU list item {item[:20]!r}")
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
        if hi < lo or hi >= MAX_VCPUS:
            raise MalformedLine(f"bad vCPU range {item!r} (vCPU ids are 0-{MAX_VCPUS - 1})")
        runs.append((lo, hi))
    return VcpuSet(runs=runs)


def format_vcpu_list(vcpus: Iterable[int]) -> str:
    """Inverse of :func:`parse_vcpu_list`, in Xen's form: runs of two or more as ``a-b``."""
    if isinstance(vcpus, VcpuSet):
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in vcpus.runs)
    out: list[str] = []
    run: list[int] = []
    for v in sorted(set(vcpus)):
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [v]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def fifo_column(text: str) -> FifoColumn:
    """Decode a stripped FIFO ``s`` column: ``?``, ``-``, ``B -``, ``12``, ``B 12``."""
    if text == "?":
        return FifoColumn(word=False)
    busy = text.startswith("B")
    rest = text[1:].strip() if busy else text
    if rest == "-":
        return FifoColumn(word=True, busy=busy)
    if _UINT.fullmatch(rest) and int(rest) <= EVTCHN_FIFO_LINK_MASK:
        return FifoColumn(word=True, busy=busy, link=int(rest))
    raise MalformedLine(f"bad FIFO state column {text!r}")


def _pad_fifo(text: str) -> str:
    """Back to Xen's 6-character column (``"%c %-4u"`` / ``"%c -   "`` / ``"?     "``)."""
    col = fifo_column(text)
    if not col.word:
        return "?     "
    link = "-" if col.link is None else str(col.link)
    return f"{'B' if col.busy else ' '} {link:<4}"


def parse_port_line(text: str) -> PortState:
    """Parse one port line (console prefix already removed) into a :class:`PortState`.

    The ``s`` column is one digit for the 2-level ABI (→ ``selector``) and a 6-character
    field for FIFO (→ ``fifo``, stripped: ``B 12``, ``12``, ``B -``, ``-`` or ``?``).
    Raises :class:`MalformedLine` when the line breaks Xen's format.
    """
    m = _PORT.fullmatch(text.strip())
    if m is None:
        raise MalformedLine("not in Xen's '%4u [p/m/s]: s=%d n=%d x=%d ...' format")
    port_s, p_s, m_s, col, state_s, notify_s, consumer_s, tail = m.groups()
    port, state = int(port_s), int(state_s)
    if port == 0:
        raise MalformedLine("port 0 (Xen never prints it)")
    if port >= EVTCHN_FIFO_NR_CHANNELS:
        raise MalformedLine(f"port {port} is beyond any event-channel ABI")
    if state not in _TAIL_KEYS:
        raise MalformedLine(f"s={state} is not an ECS state (0-6)")
    selector: bool | None = None
    fifo: str | None = None
    if _CELL_2L.fullmatch(col):
        selector = col == "1"
        if port >= _2L_MAX_PORTS:
            raise MalformedLine(f"port {port} is beyond the 2-level ABI's {_2L_MAX_PORTS}")
    else:
        fifo = col.strip()
        if _pad_fifo(fifo) != col:  # one shape per ABI, exactly as Xen prints it
            raise MalformedLine(f"[p/m/s] cell {col!r} is neither the 2-level ABI's one bit "
                                "nor a FIFO state column as Xen prints it")
    values: dict[str, Any] = {}
    label_at = tail.find(" Z=")
    if label_at >= 0:
        values["xsm_label"] = tail[label_at + 3:]
        tail = tail[:label_at]
    keys = []
    for token in tail.split():
        t = _TAIL_TOKEN.fullmatch(token)
        if t is None:
            raise MalformedLine(f"unexpected {token!r} after x=")
        keys.append(t.group(1))
        values[_TAIL_FIELD.get((state, t.group(1)), "?")] = int(t.group(2))
    if tuple(keys) != _TAIL_KEYS[state]:
        want = " ".join(f"{k}=" for k in _TAIL_KEYS[state]) or "nothing"
        raise MalformedLine(f"s={state} should be followed by {want}, got {tail.strip()!r}")
    return PortState(port=port, pending=p_s == "1", masked=m_s == "1", selector=selector,
                     fifo=fifo, state=state, notify_vcpu=int(notify_s),
                     xen_consumer=int(consumer_s), **values)


# --------------------------------------------------------------------------- parsing


def _bounded_lines(stream: IO[str]) -> Iterator[str]:
    """Lines of ``stream`` cut to :data:`MAX_LINE_CHARS`, reading at most that much at once."""
    while True:
        line = stream.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            while True:  # drain the rest of an over-long line
                more = stream.readline(MAX_LINE_CHARS)
                if not more or more.endswith(("\n", "\r")):
                    break
            line = line[:MAX_LINE_CHARS]
        yield line


class _Parser:
    """Line-by-line state machine; one instance per input."""

    def __init__(self, source: str, strict: bool) -> None:
        self.source = source
        self.strict = strict
        self.sections: list[DomainEvtchnDump] = []
        self.current: DomainEvtchnDump | None = None
        self.dump_index = 0
        self.dump_domids: list[int] = []
        self.banner_seen = False
        self.orphans: list[str] = []
        self.polling_set = False

    def warn(self, lineno: int, why: str, text: str) -> None:
        message = f"line {lineno}: {why}: {text.strip()[:160]!r}"
        if self.strict:
            raise DebugKeysFormatError(f"{self.source}:{lineno}: malformed 'e' key line "
                                       f"({why}): {text.strip()[:160]!r}")
        target = self.current.warnings if self.current is not None else self.orphans
        if len(target) < MAX_WARNINGS:
            target.append(message)
        elif len(target) == MAX_WARNINGS:
            target.append("further warnings dropped")

    def feed(self, lineno: int, raw: str) -> None:
        text = strip_console_prefix(raw.rstrip("\r\n")).strip()
        if not text:
            return
        if text.startswith(BANNER):
            self.banner_seen = True
            return
        if text.startswith("Event channel information for "):
            m = _HEADER.fullmatch(text)
            if m is None:
                self.warn(lineno, "unreadable section header", text)
                return
            self.open_section(lineno, int(m.group(1)))
            return
        if self.current is None:
            if _PORT_START.match(text):
                self.warn(lineno, "port line outside any section (header lost?)", text)
            return
        if text.startswith("Polling vCPUs:"):
            m = _POLLING.fullmatch(text)
            if m is None or self.polling_set or self.current.ports:
                self.warn(lineno, "unexpected Polling vCPUs line", text)
                return
            try:
                self.current.polling_vcpus = parse_vcpu_list(m.group(1))
            except MalformedLine as e:
                self.warn(lineno, str(e), text)
            self.polling_set = True
            return
        if not _PORT_START.match(text):
            return  # another key's output, a guest's console line, prose: not ours
        try:
            state = parse_port_line(text)
        except MalformedLine as e:
            self.warn(lineno, str(e), text)
            return
        ports = self.current.ports
        if ports and state.port <= ports[-1].port:
            self.warn(lineno, f"port {state.port} after port {ports[-1].port} "
                      "(Xen prints ports in increasing order; header lost?)", text)
            return
        if ports and (state.fifo is None) != (ports[0].fifo is None):
            self.warn(lineno, "[p/m/s] cell of the other event-channel ABI than this "
                      f"section's (port {ports[0].port} is {ports[0].pms})", text)
            return
        ports.append(state)

    def open_section(self, lineno: int, domid: int) -> None:
        if self.dump_domids and (self.banner_seen or domid <= self.dump_domids[-1]):
            self.dump_index += 1
            self.dump_domids = []
        self.banner_seen = False
        self.dump_domids.append(domid)
        self.current = DomainEvtchnDump(domid=domid, dump_index=self.dump_index, line=lineno)
        if self.orphans:
            self.current.warnings.extend(self.orphans)
            self.orphans = []
        self.polling_set = False
        self.sections.append(self.current)

    def finish(self) -> list[DomainEvtchnDump]:
        if not self.sections:
            raise DebugKeysFormatError(
                f"no 'Event channel information for domain' section found in {self.source}: "
                "pass the output of `xl debug-keys e; xl dmesg`")
        return self.sections


def parse_lines(lines: Iterable[str], source: str = "<input>", *,
                strict: bool = False) -> list[DomainEvtchnDump]:
    """Parse console lines; sections in input order.  See the module doc for the policy."""
    parser = _Parser(source, strict)
    for lineno, raw in enumerate(lines, 1):
        parser.feed(lineno, raw[:MAX_LINE_CHARS])
    return parser.finish()


def parse(text: str, source: str = "<input>", *, strict: bool = False) -> list[DomainEvtchnDump]:
    """Parse the text of ``xl debug-keys e; xl dmesg`` or a serial capture.

    Raises :class:`XReplayError` if no section is found, or (``strict``) on the first
    malformed line; ``source`` names the input in messages.
    """
    return parse_lines(_bounded_lines(io.StringIO(text, newline="")), source, strict=strict)


def parse_file(path: str | os.PathLike[str], *, strict: bool = False) -> list[DomainEvtchnDump]:
    """:func:`parse` a file, streaming it (undecodable bytes are replaced, not fatal)."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            return parse_lines(_bounded_lines(f), os.fspath(path), strict=strict)
    except OSError as e:
        raise XReplayError(f"cannot read {os.fspath(path)}: {e.strerror}") from e


def latest(dumps: Iterable[DomainEvtchnDump]) -> dict[int, DomainEvtchnDump]:
    """The last section printed for each domain, keyed by domid (in order of domid)."""
    out: dict[int, DomainEvtchnDump] = {}
    for d in dumps:
        out[d.domid] = d
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- output


def _render_port(p: PortState) -> str:
    """One port line via :meth:`PortState.render`, made byte-exact with Xen's output."""
    q = dataclasses.replace(p, label=None,  # ours, not Xen's: it would not parse back
                            fifo=None if p.fifo is None else _pad_fifo(p.fifo))
    line = q.render()
    # PortState pads the port to 8 columns; Xen prints "    %4u", one more per digit past 4.
    return " " * max(0, len(str(p.port)) - 4) + line


def render(dumps: Iterable[DomainEvtchnDump], prefix: str = "(XEN) ") -> str:
    """Dumps back in ``xl dmesg`` form, with an ``'e' pressed`` banner per key press."""
    lines: list[str] = []
    last: int | None = None
    for d in dumps:
        if d.dump_index != last:
            lines.append(prefix + BANNER)
            last = d.dump_index
        lines.append(d.render(prefix))
    return "\n".join(lines) + "\n" if lines else ""


def to_json(dumps: Iterable[DomainEvtchnDump]) -> dict[str, Any]:
    """JSON-ready form::

        {"dumps": [{"dump_index": int, "domid": int, "line": int,
                    "polling_vcpus": [int, ...],          # sorted
                    "ports": [PortState.to_json(), ...],  # in port order
                    "warnings": [str, ...]}, ...]}        # in input order
    """
    return {"dumps": [d.to_json() for d in dumps]}


def from_json(obj: dict[str, Any]) -> list[DomainEvtchnDump]:
    """Inverse of :func:`to_json` (unknown keys in a port are an error, not ignored)."""
    try:
        return [DomainEvtchnDump(domid=int(d["domid"]), dump_index=int(d.get("dump_index", 0)),
                                 polling_vcpus=VcpuSet(int(v) for v in
                                                       d.get("polling_vcpus", ())),
                                 ports=[PortState(**p) for p in d["ports"]],
                                 line=int(d.get("line", 0)),
                                 warnings=list(d.get("warnings", ())))
                for d in obj["dumps"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DebugKeysFormatError(f"not an xreplay 'e' key JSON document: {e}") from e


# --------------------------------------------------------------------------- comparison

_COMPARED = ("pending", "masked", "selector")


def compare(dump: DomainEvtchnDump, ports: Iterable[PortState]) -> list[PortDiff]:
    """Ports where Xen's dump and ``ports`` (e.g. ``Snapshot.port_table()``) disagree.

    Only differing ports are returned, sorted by port.  ``selector`` is compared only when
    both sides know it (a FIFO dump or an unread vCPU gives None).
    """
    ours = {p.port: p for p in dump.ports}
    theirs = {p.port: p for p in ports}
    diffs: list[PortDiff] = []
    for port in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(port), theirs.get(port)
        if a is None or b is None:
            diffs.append(PortDiff(port, a, b))
            continue
        fields = tuple(name for name in _COMPARED
                       if getattr(a, name) is not None and getattr(b, name) is not None
                       and getattr(a, name) != getattr(b, name))
        if fields:
            diffs.append(PortDiff(port, a, b, fields))
    return diffs
