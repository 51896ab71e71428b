"""gdb-side script of ``rr last-write``: one watchpoint pass over a QEMU replay.

Sourced by gdb's embedded (system) Python, so standard library only.  The config file
(path in ``$XREPLAY_WATCH_CONFIG``) says: ``exprs`` to watch (one watchpoint each, in one
replay), ``break_icount`` (where the replay must stop: a QEMU replay breakpoint),
``stop_at`` (pass 2: per expression, the change to stop on, counted from ``skip_to``, an
icount the replay first runs to without watchpoints) and ``out`` (the JSON result).
gdb's ``watch`` triggers on value changes only; QEMU reports a watchpoint after the
writing instruction, so the writer is
the instruction before the reported pc, found by disassembling the ELF in a second gdb
without a target (``symbolize`` in the config: the ELF's own architecture; the stub's
i386:x86-64 misdecodes 32-bit code, and gdb cannot switch back once connected).
"""

import json
import os
import re

import gdb  # type: ignore[import-not-found]

_ICOUNT = re.compile(r"instruction count = (\d+)")


def icount():
    m = _ICOUNT.search(gdb.execute("monitor info replay", to_string=True))
    return int(m.group(1)) if m else None


def value(expr):
    try:
        return int(gdb.parse_and_eval(expr))
    except (gdb.error, gdb.MemoryError):
        return None


class Watch(gdb.Breakpoint):
    """Logs every value change (pass 1), or stops on change number ``stop_at`` (pass 2)."""

    def __init__(self, expr, stop_at):
        super().__init__(expr, gdb.BP_WATCHPOINT, gdb.WP_WRITE)
        self.expr = expr
        self.stop_at = stop_at
        self.changes = []
        self.n = 0
        self.fired = False
        self.prev = self.initial = value(expr)

    def stop(self):
        new = value(self.expr)
        self.n += 1
        if self.stop_at is None:
            self.changes.append({"icount": icount(), "pc": int(gdb.parse_and_eval("$pc")),
                                 "old": self.prev, "new": new})
        self.prev = new
        self.fired = self.n == self.stop_at
        return self.fired


def _symbol(pc):
    """(function, offset) of the out-of-line function holding ``pc`` (gdb's info symbol)."""
    sym = gdb.execute(f"info symbol {pc}", to_string=True).strip()
    m = re.match(r"(\S+)(?: \+ (\d+))? in section", sym)
    return (m.group(1), int(m.group(2) or 0)) if m else (None, None)


def writer(pc):
    """Writer pc, its function (innermost, inlined ones included), the out-of-line
    function+offset and the source line, for a watchpoint QEMU reported at ``pc``."""
    func, off = _symbol(pc)
    wpc = None
    if func is not None and off:
        text = gdb.execute(f"disassemble {pc - off},{pc}", to_string=True)
        addrs = [int(m.group(1), 16) for m in re.finditer(r"^\s*(?:=>\s*)?0x([0-9a-f]+)",
                                                           text, re.M)]
        addrs = [a for a in addrs if a < pc]
        wpc = addrs[-1] if addrs else None
    at = wpc if wpc is not None else pc
    func, off = _symbol(at)
    inner = None
    try:
        block = gdb.block_for_pc(at)
        while block is not None and block.function is None:
            block = block.superblock
        inner = block.function.name if block is not None else None
    except RuntimeError:
        pass
    sal = gdb.find_pc_line(at)
    file = sal.symtab.filename if sal.symtab is not None else None
    return {"writer_pc": wpc, "function": inner or func, "symbol": func, "offset": off,
            "file": file, "line": sal.line or None}


def symbolize(cfg):
    out = {}
    for pc in cfg["symbolize"]:
        try:
            out[str(pc)] = writer(pc)
        except gdb.error as e:
            out[str(pc)] = {"symbol_error": str(e)}
    with open(cfg["out"], "w") as f:
        json.dump(out, f)


def main():
    with open(os.environ["XREPLAY_WATCH_CONFIG"]) as f:
        cfg = json.load(f)
    gdb.execute("set pagination off")
    gdb.execute("set confirm off")
    if "symbolize" in cfg:
        symbolize(cfg)
        return
    out = {"watches": [], "error": None}
    watches = []
    try:
        if cfg.get("skip_to"):
            # one QEMU replay breakpoint at a time: first the skip, then the end
            gdb.execute("monitor replay_break {}".format(cfg["skip_to"]))
            gdb.execute("continue")
            out["skipped_to"] = icount()
        if cfg.get("break_icount") is not None:
            gdb.execute("monitor replay_break {}".format(cfg["break_icount"]))
        stops = cfg.get("stop_at") or [None] * len(cfg["exprs"])
        watches = [Watch(e, n) for e, n in zip(cfg["exprs"], stops, strict=True)]
        pending = [w for w in watches if w.stop_at is not None]
        while True:
            try:
                gdb.execute("continue")
            except gdb.error as e:
                out["error"] = str(e)
                break
            fired = [w for w in pending if w.fired]
            if not fired or not gdb.selected_inferior().pid:
                break  # the replay break (or the end of the replay)
            for w in fired:
                w.stopped = {"icount": icount(), "pc": int(gdb.parse_and_eval("$pc")),
                             "new": value(w.expr),
                             "backtrace": gdb.execute("bt 8", to_string=True).splitlines()}
                w.fired = False
                pending.remove(w)
                w.enabled = False
            if not pending:
                break
        out["end_icount"] = icount() if gdb.selected_inferior().pid else None
    except gdb.error as e:
        out["error"] = str(e)
    for w in watches:
        out["watches"].append({"expr": w.expr, "initial": w.initial, "changes": w.changes,
                               "stopped": getattr(w, "stopped", None)})
    if gdb.selected_inferior().pid:
        gdb.execute("kill")
    with open(cfg["out"], "w") as f:
        json.dump(out, f)


main()
