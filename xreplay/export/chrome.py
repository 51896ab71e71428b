"""Chrome trace-event export (Perfetto UI, chrome://tracing): one track per vCPU.

Each probe hit is an instant event carrying the vCPU's event-channel fields and the
pending-and-unmasked ports; counter tracks plot ``evtchn_upcall_pending`` and the number
of pending ports.  The JSON array is written incrementally (the format allows an
unterminated array, but we close it).
"""

from __future__ import annotations

import json
import os
from typing import BinaryIO, TextIO

from xreplay.abi import iter_bits
from xreplay.xrr import XrrReader


def export_chrome(path: str | os.PathLike | BinaryIO, out: TextIO) -> int:
    """Write ``path`` as Chrome trace JSON to ``out``; returns the number of snapshots."""
    count = 0
    with XrrReader(path) as r:
        out.write("[\n")
        meta = {"name": "process_name", "ph": "M", "pid": 1,
                "args": {"name": f"xreplay {r.name} ({r.header.arch})"}}
        out.write(json.dumps(meta))
        for snap in r.snapshots():
            us = snap.t_ns / 1000.0
            v = snap.vcpus.get(snap.vcpu)
            live = [p for p in iter_bits(snap.pending_unmasked())][:64]
            args = {"snapshot": snap.index, "pc": hex(snap.pc),
                    "interrupts_enabled": snap.interrupts_enabled,
                    "pending_unmasked": [f"{p}" + (f" ({snap.labels[p]})" if p in snap.labels
                                                   else "") for p in live]}
            if v is not None:
                args.update(evtchn_upcall_pending=v.evtchn_upcall_pending,
                            evtchn_upcall_mask=v.evtchn_upcall_mask,
                            evtchn_pending_sel=hex(v.evtchn_pending_sel))
            events = [{"name": snap.probe + (" (HANG)" if snap.hang else ""), "ph": "i",
                       "s": "t", "ts": us, "pid": 1, "tid": snap.vcpu, "args": args},
                      {"name": "pending ports", "ph": "C", "ts": us, "pid": 1,
                       "args": {"pending": snap.evtchn_pending.bit_count(),
                                "pending_unmasked": len(live)}}]
            if v is not None:
                events.append({"name": f"vcpu{snap.vcpu} evtchn_upcall_pending", "ph": "C",
                               "ts": us, "pid": 1,
                               "args": {"value": v.evtchn_upcall_pending}})
            for e in events:
                out.write(",\n" + json.dumps(e))
            count += 1
        out.write("\n]\n")
    return count
