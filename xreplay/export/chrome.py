"""Chrome trace-event export (Perfetto UI, chrome://tracing): one track per vCPU.

A FIFO recording gets the same instants with its own fields, and counter tracks per vCPU
(``evtchn_upcall_pending``, each queue's ``ready`` bit and ``head``) and per port that
moves (its event word's PENDING, MASKED, LINKED, BUSY and LINK).

Each probe hit is an instant event carrying the vCPU's event-channel fields and the
pending-and-unmasked ports; counter tracks plot ``evtchn_upcall_pending`` and the number
of pending ports.  The JSON array is written incrementally (the format allows an
unterminated array, but we close it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, BinaryIO, TextIO

from xreplay.abi import fifo as fifo_abi
from xreplay.abi import iter_bits
from xreplay.export import fifo as fifo_export
from xreplay.replay.observe import states
from xreplay.snapshot import interrupts_enabled
from xreplay.xrr import XrrReader


def export_chrome(path: str | os.PathLike | BinaryIO, out: TextIO) -> int:
    """Write ``path`` as Chrome trace JSON to ``out``; returns the number of snapshots."""
    count = 0
    with XrrReader(path) as r:
        out.write("[\n")
        meta = {"name": "process_name", "ph": "M", "pid": 1,
                "args": {"name": f"xreplay {r.name} ({r.header.arch})"}}
        out.write(json.dumps(meta))
        if r.header.abi == "fifo":
            for e in _fifo_events(r):
                if e is None:
                    count += 1
                else:
                    out.write(",\n" + json.dumps(e))
            out.write("\n]\n")
            return count
        h = r.header
        names, labels = [p.name for p in h.probes], h.labels
        for hit, m in states(r):  # the delta path: fields decoded only where they changed
            us = hit.t_ns / 1000.0
            v = m.vcpu_info.get(hit.vcpu)
            live = [p for p in iter_bits(m.evtchn_pending & m.unmasked())][:64]
            args = {"snapshot": hit.seq, "pc": hex(hit.pc),
                    "interrupts_enabled": interrupts_enabled(h.arch, hit.regflags),
                    "pending_unmasked": [f"{p}" + (f" ({labels[p]})" if p in labels
                                                   else "") for p in live]}
            if v is not None:
                args.update(evtchn_upcall_pending=v.evtchn_upcall_pending,
                            evtchn_upcall_mask=v.evtchn_upcall_mask,
                            evtchn_pending_sel=hex(v.evtchn_pending_sel))
            events = [{"name": names[hit.probe] + (" (HANG)" if hit.hang else ""), "ph": "i",
                       "s": "t", "ts": us, "pid": 1, "tid": hit.vcpu, "args": args},
                      {"name": "pending ports", "ph": "C", "ts": us, "pid": 1,
                       "args": {"pending": m.evtchn_pending.bit_count(),
                                "pending_unmasked": len(live)}}]
            if v is not None:
                events.append({"name": f"vcpu{hit.vcpu} evtchn_upcall_pending", "ph": "C",
                               "ts": us, "pid": 1,
                               "args": {"value": v.evtchn_upcall_pending}})
            for e in events:
                out.write(",\n" + json.dumps(e))
            count += 1
        out.write("\n]\n")
    return count


def _fifo_events(r: XrrReader) -> Iterator[dict[str, Any] | None]:
    """A FIFO recording's events (None after each snapshot's): the instant per hit with its
    vCPU's upcall bytes, ``ready`` queues and heads, the PENDING-and-unmasked and the LINKED
    ports; counters per vCPU (``evtchn_upcall_pending``, and per queue in use ``ready`` and
    ``head``) and per port that moves (PENDING, MASKED, LINKED, BUSY, LINK), each written
    when it changes."""
    sel = fifo_export.select(r)
    h = r.header
    labels = h.labels
    last: dict[str, dict[str, Any]] = {}

    def counter(name: str, us: float, args: dict[str, Any]) -> dict[str, Any] | None:
        args = {k: v for k, v in args.items() if v is not None}  # not read: no sample
        if not args or last.get(name) == args:
            return None
        last[name] = args
        return {"name": name, "ph": "C", "ts": us, "pid": 1, "args": args}

    def port_name(p: int) -> str:
        return f"{p}" + (f" ({labels[p]})" if p in labels else "")

    for snap, values in fifo_export.frames(r, sel):
        us = snap.t_ns / 1000.0
        fs = snap.fifo
        words = [] if fs is None else fs.words
        pend = [p for p in iter_bits(snap.evtchn_pending) if p]  # the words' PENDING bits
        live = [p for p in pend if not snap.evtchn_mask >> p & 1]
        linked = [p for p in sel.ports if words and values[f"p{p}.linked"]]
        args: dict[str, Any] = {
            "snapshot": snap.index, "pc": hex(snap.pc),
            "interrupts_enabled": snap.interrupts_enabled,
            "pending_unmasked": [port_name(p) for p in live[:64]],
            "linked": [port_name(p) for p in linked[:64]]}
        v = snap.vcpu
        if v in sel.vcpus:
            mine = {k.split(".", 1)[1]: x for k, x in values.items() if k.startswith(f"v{v}.")}
            ready = mine.pop("ready")
            args.update({k: x for k, x in mine.items() if not k.startswith("head_")})
            if ready is not None:
                args["ready_queues"] = [q for q in range(fifo_abi.EVTCHN_FIFO_MAX_QUEUES)
                                        if ready >> q & 1]
                args["head"] = {q: mine[fifo_export.head_name(q)] for q in sel.queues[v]}
        name = snap.probe + (" (HANG)" if snap.hang else "")
        yield {"name": name, "ph": "i", "s": "t", "ts": us, "pid": 1, "tid": v, "args": args}
        events = [counter("pending ports", us, {"pending": len(pend),
                                                "pending_unmasked": len(live),
                                                "linked": len(linked)} if words else {})]
        for u in sel.vcpus:
            events.append(counter(f"vcpu{u} evtchn_upcall_pending", us,
                                  {"value": values[f"v{u}.evtchn_upcall_pending"]}))
            ready = values[f"v{u}.ready"]
            for q in sel.queues[u]:
                events.append(counter(f"vcpu{u} queue {q}", us, {
                    "ready": None if ready is None else ready >> q & 1,
                    "head": values[f"v{u}.{fifo_export.head_name(q)}"]}))
        for p in sel.ports:
            events.append(counter(f"port {port_name(p)}", us, {
                f.upper(): values[f"p{p}.{f}"] for f, _ in fifo_export.WORD_FIELDS}))
        yield from (e for e in events if e is not None)
        yield None
