"""Value Change Dump export: every event-channel bit as a waveform.

A missed clear is a timing story (upcall_pending rises, the bottom half never lowers it,
the vCPU blocks), which a waveform viewer shows at a glance.  Signals: per vCPU
``evtchn_upcall_pending``, ``evtchn_upcall_mask`` and ``evtchn_pending_sel``; per port that
ever changes (plus labelled ones) ``pending`` and ``mask``; the probe that fired (as an
integer index into the header's probe list) and the snapshot number.  A FIFO recording
(:mod:`xreplay.export.fifo`) has per vCPU ``evtchn_upcall_pending``, ``evtchn_upcall_mask``,
the control block's ``ready`` and ``head_<q>`` of each queue in use, and per port that moves
``pending``, ``masked``, ``linked``, ``busy`` and ``link``; a field not read at a hit is
``x``.  Time unit: ns of host time (``t_ns``), nudged forward so each snapshot gets its own
instant.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterator
from typing import BinaryIO, TextIO

from xreplay.abi import iter_bits, layout
from xreplay.export import fifo as fifo_export
from xreplay.replay.observe import states
from xreplay.xrr import XrrReader


def _ident(n: int) -> str:
    """Short VCD identifiers from printable ASCII 33..126."""
    chars = []
    n += 1
    while n:
        n, r = divmod(n - 1, 94)
        chars.append(chr(33 + r))
    return "".join(chars)


Source = str | os.PathLike | BinaryIO  # a recording's path, or a seekable binary stream


def _changing_ports(r: XrrReader) -> list[int]:
    """Ports whose pending or mask bit changes, or that are pending at any snapshot (pass 1)."""
    seen = 0
    first: tuple[int, int] | None = None  # (evtchn_pending, evtchn_mask) at the first
    for _, m in states(r):
        if first is None:
            first = (m.evtchn_pending, m.evtchn_mask)
            seen |= m.evtchn_pending
        else:
            seen |= (m.evtchn_pending ^ first[0])
            seen |= (m.evtchn_mask ^ first[1]) | m.evtchn_pending
    ports = set(iter_bits(seen)) | set(r.header.labels)
    return sorted(p for p in ports if p > 0)


Signals = list[tuple[str, list[tuple[str, str, int]]]]  # (scope, [(key, name, width)])
Frames = Iterator[tuple[int, int, str, dict[str, int | None]]]  # seq, t_ns, probe, values


def _two_level(r: XrrReader) -> tuple[Signals, Frames]:
    """The 2-level signals: per vCPU upcall bytes and selector, per port pending and mask."""
    ports = _changing_ports(r)
    h = r.header
    bits_per_word = layout(h.arch).bits_per_word
    scopes: Signals = [(f"vcpu{v}", [(f"v{v}.{f}", f, w) for f, w in (
        ("evtchn_upcall_pending", 1), ("evtchn_upcall_mask", 1),
        ("evtchn_pending_sel", bits_per_word))]) for v in r.decoded_vcpus]
    scopes += [(_port_scope(p, h.labels), [(f"p{p}.{f}", f, 1) for f in ("pending", "mask")])
               for p in ports]

    def frames() -> Frames:
        names = [p.name for p in h.probes]
        for hit, m in states(r):  # the delta path: fields decoded only where they changed
            values: dict[str, int | None] = {}
            for v, st in m.vcpu_info.items():
                values[f"v{v}.evtchn_upcall_pending"] = st.evtchn_upcall_pending & 1
                values[f"v{v}.evtchn_upcall_mask"] = (st.evtchn_upcall_mask or 0) & 1
                values[f"v{v}.evtchn_pending_sel"] = st.evtchn_pending_sel
            for p in ports:
                values[f"p{p}.pending"] = m.evtchn_pending >> p & 1
                values[f"p{p}.mask"] = m.evtchn_mask >> p & 1
            yield hit.seq, hit.t_ns, names[hit.probe], values
    return scopes, frames()


def _fifo(r: XrrReader) -> tuple[Signals, Frames]:
    """The FIFO signals: per vCPU upcall bytes, control block ``ready`` and the ``head[q]``
    of each queue in use; per port that moves PENDING, MASKED, LINKED, BUSY and LINK."""
    sel = fifo_export.select(r)
    has_mask = layout(r.header.arch).spec.has_upcall_mask  # arm's vcpu_info has none
    scopes: Signals = []
    for v in sel.vcpus:
        fields = [(f, w) for f, w in fifo_export.VCPU_FIELDS
                  if has_mask or f != "evtchn_upcall_mask"]
        fields += [(fifo_export.head_name(q), fifo_export.HEAD_WIDTH) for q in sel.queues[v]]
        scopes.append((f"vcpu{v}", [(f"v{v}.{f}", f, w) for f, w in fields]))
    scopes += [(_port_scope(p, r.header.labels),
                [(f"p{p}.{f}", f, w) for f, w in fifo_export.WORD_FIELDS]) for p in sel.ports]
    frames = ((s.index, s.t_ns, s.probe, values) for s, values in fifo_export.frames(r, sel))
    return scopes, frames


def _port_scope(p: int, labels: dict[int, str]) -> str:
    label = labels.get(p)
    return f"port{p}{'_' + label if label else ''}"


def _value(value: int | None, width: int) -> str:
    if value is None:  # not read at this hit: unknown, never 0
        return "x" if width == 1 else "bx "
    return f"{value}" if width == 1 else f"b{value:b} "


def export_vcd(path: Source, out: TextIO) -> int:
    """Write ``path`` as VCD to ``out``; returns the number of snapshots written."""
    with XrrReader(path) as r:
        h = r.header
        scopes, frames = (_fifo if h.abi == "fifo" else _two_level)(r)
        sig: dict[str, tuple[str, int]] = {}

        def declare(name: str, width: int) -> str:
            ident = _ident(len(sig))
            sig[name] = (ident, width)
            return ident

        lines = [f"$date {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} $end",
                 f"$version {h.tool} export of {r.name} $end", "$timescale 1ns $end",
                 "$scope module xen $end"]
        lines += [f"$var integer 32 {declare('snapshot', 32)} snapshot $end",
                  f"$var integer 8 {declare('probe', 8)} probe $end"]
        for scope, signals in scopes:
            lines.append(f"$scope module {scope} $end")
            for key, name, width in signals:
                kind = "wire" if width == 1 else "reg"
                lines.append(f"$var {kind} {width} {declare(key, width)} {name} $end")
            lines.append("$upscope $end")
        lines += ["$upscope $end", "$comment probes: "
                  + ", ".join(f"{i}={p.name}" for i, p in enumerate(h.probes)) + " $end",
                  "$enddefinitions $end"]
        out.write("\n".join(lines) + "\n")

        probe_ids = {p.name: i for i, p in enumerate(h.probes)}
        last: dict[str, int | None] = {}
        t_prev = -1
        count = 0
        for seq, t_ns, probe, values in frames:
            values = {"snapshot": seq, "probe": probe_ids.get(probe, 255), **values}
            t = max(t_ns, t_prev + 1)
            t_prev = t
            changes = []
            for name, value in values.items():
                if name in sig and (name not in last or last[name] != value):
                    ident, width = sig[name]
                    changes.append(_value(value, width) + ident)
                    last[name] = value
            out.write(f"#{t}\n" + "\n".join(changes) + "\n")
            count += 1
    return count
