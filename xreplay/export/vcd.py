"""Value Change Dump export: every event-channel bit as a waveform.

A missed clear is a timing story (upcall_pending rises, the bottom half never lowers it,
the vCPU blocks), which a waveform viewer shows at a glance.  Signals: per vCPU
``evtchn_upcall_pending``, ``evtchn_upcall_mask`` and ``evtchn_pending_sel``; per port that
ever changes (plus labelled ones) ``pending`` and ``mask``; the probe that fired (as an
integer index into the header's probe list) and the snapshot number.  Time unit: ns of
host time (``t_ns``), nudged forward so each snapshot gets its own instant.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import BinaryIO, TextIO

from xreplay.abi import iter_bits, layout
from xreplay.snapshot import Snapshot
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
    first: Snapshot | None = None
    for snap in r.snapshots():
        if first is None:
            first = snap
            seen |= snap.evtchn_pending
        else:
            seen |= (snap.evtchn_pending ^ first.evtchn_pending)
            seen |= (snap.evtchn_mask ^ first.evtchn_mask) | snap.evtchn_pending
    ports = set(iter_bits(seen)) | set(r.header.labels)
    return sorted(p for p in ports if p > 0)


def export_vcd(path: Source, out: TextIO) -> int:
    """Write ``path`` as VCD to ``out``; returns the number of snapshots written."""
    with XrrReader(path) as r:
        ports = _changing_ports(r)
        h = r.header
        sig: dict[str, tuple[str, int]] = {}

        def declare(name: str, width: int) -> str:
            ident = _ident(len(sig))
            sig[name] = (ident, width)
            return ident

        lines = [f"$date {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} $end",
                 f"$version {h.tool} export of {r.name} $end", "$timescale 1ns $end",
                 "$scope module xen $end"]
        declare("snapshot", 32)
        declare("probe", 8)
        lines += [f"$var integer 32 {sig['snapshot'][0]} snapshot $end",
                  f"$var integer 8 {sig['probe'][0]} probe $end"]
        bits_per_word = layout(h.arch).bits_per_word
        for v in r.decoded_vcpus:  # the others have no vcpu_info in any snapshot
            lines.append(f"$scope module vcpu{v} $end")
            for field, width in (("evtchn_upcall_pending", 1), ("evtchn_upcall_mask", 1),
                                 ("evtchn_pending_sel", bits_per_word)):
                ident = declare(f"v{v}.{field}", width)
                kind = "wire" if width == 1 else "reg"
                lines.append(f"$var {kind} {width} {ident} {field} $end")
            lines.append("$upscope $end")
        for p in ports:
            label = h.labels.get(p)
            lines.append(f"$scope module port{p}{'_' + label if label else ''} $end")
            for field in ("pending", "mask"):
                lines.append(f"$var wire 1 {declare(f'p{p}.{field}', 1)} {field} $end")
            lines.append("$upscope $end")
        lines += ["$upscope $end", "$comment probes: "
                  + ", ".join(f"{i}={p.name}" for i, p in enumerate(h.probes)) + " $end",
                  "$enddefinitions $end"]
        out.write("\n".join(lines) + "\n")

        probe_ids = {p.name: i for i, p in enumerate(h.probes)}
        last: dict[str, int] = {}
        t_prev = -1
        count = 0
        for snap in r.snapshots():
            values = {"snapshot": snap.index, "probe": probe_ids.get(snap.probe, 255)}
            for v, st in snap.vcpus.items():
                values[f"v{v}.evtchn_upcall_pending"] = st.evtchn_upcall_pending & 1
                values[f"v{v}.evtchn_upcall_mask"] = (st.evtchn_upcall_mask or 0) & 1
                values[f"v{v}.evtchn_pending_sel"] = st.evtchn_pending_sel
            for p in ports:
                values[f"p{p}.pending"] = snap.evtchn_pending >> p & 1
                values[f"p{p}.mask"] = snap.evtchn_mask >> p & 1
            t = max(snap.t_ns, t_prev + 1)
            t_prev = t
            changes = []
            for name, value in values.items():
                if name in sig and last.get(name) != value:
                    ident, width = sig[name]
                    changes.append(f"{value}{ident}" if width == 1 else f"b{value:b} {ident}")
                    last[name] = value
            out.write(f"#{t}\n" + "\n".join(changes) + "\n")
            count += 1
    return count
