"""The last writer of each field a replay finding names, for recordings taken on a replay.

A finding such as ``missed-clear`` names fields (``evtchn_upcall_pending``,
``evtchn_pending_sel``, a port's ``evtchn_pending`` word) at a snapshot; on a recording
made by ``record --from-rr`` the run can be replayed again with a watchpoint on each, so
the finding can say which instruction set the field last and that nothing wrote it after
that, up to the finding's snapshot.  Fields are watched by address (from the recording's
``attached`` note and the ABI layout), so no debug info for Xen's structs is needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xreplay.abi import layout
from xreplay.errors import XReplayError
from xreplay.rr.lastwrite import Write, last_writes

VCPU_FIELDS = ("evtchn_upcall_pending", "evtchn_upcall_mask", "evtchn_pending_sel")
PORT_FIELDS = ("evtchn_pending", "evtchn_mask")
_CTYPE = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int", 8: "unsigned long long"}


@dataclass
class FieldWriter:
    finding: int  # index into the replay's findings
    kind: str
    snapshot: int
    field: str  # e.g. "vcpu 0 evtchn_upcall_pending", "evtchn_pending word 0 (ports 1, 3, 4)"
    expr: str
    write: Write | None
    initial: int | None

    def render(self) -> str:
        w = self.write
        if w is None:
            return (f"{self.field}: never written before #{self.snapshot} "
                    f"(value {self.initial} throughout)")
        pc = f"{w.writer_pc:#x}" if w.writer_pc is not None else f"before {w.pc:#x}"
        between = f", {w.between()}" if w.between() else ""
        return (f"{self.field}: last written {w.old} -> {w.new} by {pc} {w.where} at icount "
                f"{w.icount}{between}; unchanged after it up to #{self.snapshot}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["write"] = asdict(self.write) if self.write else None
        return d


def _addresses(path: Path) -> tuple[str, dict[str, int], dict[int, int]]:
    """(arch, region name -> address, vCPU -> vcpu_info address) from the recording."""
    from xreplay.xrr import XrrReader

    with XrrReader(path) as r:
        for _ in r.records():
            pass
        attached = next((n.data for n in r.notes if n.data.get("event") == "attached"), None)
        regions = r.header.regions
        arch = r.header.arch
    addr: dict[str, int] = {}
    for spec, info in zip(regions, (attached or {}).get("regions") or [], strict=False):
        if isinstance(info, dict) and isinstance(info.get("address"), int) and \
                not info.get("per_hit"):
            addr[spec.name] = info["address"]
    vinfo = {s.vcpu: addr[s.name] for s in regions
             if s.kind == "vcpu_info" and s.vcpu is not None and s.name in addr}
    return arch, addr, vinfo


def field_exprs(path: Path, finding: Any) -> list[tuple[str, str]]:
    """(label, gdb expression) for each field the finding names, by address."""
    arch, addr, vinfo = _addresses(path)
    if "shared_info" not in addr:
        raise XReplayError(f"{path}: the recording does not say where shared_info was "
                           "(no fixed address in its 'attached' note)")
    desc = layout(arch).describe()
    si, vi = desc["structs"]["shared_info"]["fields"], desc["structs"]["vcpu_info"]["fields"]
    vsize = desc["structs"]["vcpu_info"]["size"]
    word = desc["bits_per_word"] // 8
    vcpu = finding.vcpu or 0
    out: list[tuple[str, str]] = []
    for name in finding.fields or []:
        if name in VCPU_FIELDS:
            base = vinfo.get(vcpu, addr["shared_info"] + si["vcpu_info"]["offset"] + vcpu * vsize)
            f = vi[name]
            out.append((f"vcpu {vcpu} {name}",
                        f"*({_CTYPE[f['size']]} *){base + f['offset']:#x}"))
        elif name in PORT_FIELDS:
            words: dict[int, list[int]] = {}
            for port in finding.ports or []:
                words.setdefault(port // desc["bits_per_word"], []).append(port)
            for w, ports in sorted(words.items()):
                a = addr["shared_info"] + si[name]["offset"] + w * word
                out.append((f"{name} word {w} (ports {', '.join(map(str, ports))})",
                            f"*({_CTYPE[word]} *){a:#x}"))
    return out


def finding_writers(path: Path, findings: list[Any], *, run: Path | None = None,
                    limit: int = 2, gdb: str = "gdb") -> list[FieldWriter]:
    """Last writers for the fields of the first ``limit`` error findings of ``path``."""
    from xreplay.xrr import XrrReader

    with XrrReader(path) as r:
        origin = r.header.replay
        elf = r.header.target.get("elf")
    if not origin:
        return []
    run = run or Path(str(origin.get("run", "")))
    if not (run / "manifest.json").is_file():
        raise XReplayError(f"{path}: its run {run} is gone: last writers need it (give --rr "
                           "RUN.rr, or --no-last-writer)")
    out = []
    errors = [(i, f) for i, f in enumerate(findings) if f.severity == "error"][:limit]
    for i, f in errors:
        fields = field_exprs(path, f)
        if not fields:
            continue
        results = last_writes(run, [e for _, e in fields], elf=Path(elf) if elf else None,
                              before=f.snapshot, recording=path, gdb=gdb)
        for (label, expr), res in zip(fields, results, strict=True):
            out.append(FieldWriter(i, f.kind, f.snapshot, label, expr, res.last, res.initial))
    return out
