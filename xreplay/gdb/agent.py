"""xreplay's in-gdb agent: snapshots at breakpoints without an MI round trip per hit.

GDB sources this file into its embedded Python, which is the *system* Python, not the
project's virtualenv, so it uses the standard library only.  Each probe is a
``gdb.Breakpoint`` whose ``stop()`` reads the configured memory regions with
``Inferior.read_memory``, sends one binary frame to the recorder over a Unix socket and
returns False, so gdb resumes the target at once (GDB manual, "Breakpoints In Python").
The recorder (``xreplay.record``) owns the ``.xrr`` file; this side only reads and sends.
The wire format is :mod:`xreplay.gdb.wire`, loaded from beside this file.

A region named by a *pointer* (Mini-OS' and Linux's ``HYPERVISOR_shared_info``) is
followed at every hit: the pointer may be NULL or unmapped when gdb attaches and set at
boot, and a PIE's statically initialised pointer holds its link-time value until the
dynamic loader relocates it.  Each change of address is reported to the recorder, which
notes it in the recording.
"""

import importlib.util
import json
import os
import re
import socket
import sys
import threading

import gdb  # type: ignore[import-not-found]


def _load_wire():
    name = "xreplay_wire"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(os.path.dirname(os.path.abspath(__file__)), "wire.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


wire = _load_wire()

FLUSH_INTERVAL = 0.02  # s
_ADDRESS_OF = re.compile(r"^\s*&\s*[A-Za-z_]\w*\s*$")
FLUSH_COUNT = 64
#: passes after the first that ``stable_reads`` tries before it keeps the last one
STABLE_READ_TRIES = 4
FLUSH_BYTES = 1 << 18

_agent = None
_ICOUNT = re.compile(r"instruction count = (\d+)")


class _Probe(gdb.Breakpoint):
    """One probe location; its hits become snapshots."""

    def __init__(self, agent, pid, spec):
        super().__init__(spec["location"], type=gdb.BP_BREAKPOINT, internal=True)
        if self.pending:  # Python breakpoints ignore "set breakpoint pending off"
            self.delete()
            raise gdb.GdbError(
                "probe {}: location {!r} not found".format(spec["name"], spec["location"]))
        self.agent = agent
        self.pid = pid
        self.name = spec["name"]

    def stop(self):
        return self.agent.on_hit(self.pid)


class _Region:
    """Where one region lives: a fixed address, a pointer followed at each hit, or an
    expression re-evaluated at each hit (profiles that know better, e.g. Linux per-cpu)."""

    def __init__(self, spec):
        self.name = spec["name"]
        self.size = spec["size"]
        self.expr = spec["expr"]
        self.address = None
        self.pointer_at = None  # address of the pointer variable, when followed by value
        self.pointer_size = 0
        self.reeval = bool(spec.get("reeval"))
        # a FIFO event-array page: read only while the guest's page count (the region at
        # index ``count``, read earlier in the same hit) says page ``page`` is in use
        self.gate = spec.get("in_use")
        self.info = {"name": self.name, "expr": self.expr}
        try:
            value = gdb.parse_and_eval(self.expr)
        except gdb.MemoryError as e:
            # Memory the expression reads is not mapped now (a whole-machine stub attached
            # in Xen or another domain, a pointer not yet set): resolve it at each hit.
            self.reeval = True
            self.info.update(how="expression", error=str(e))
            return
        t = value.type.strip_typedefs()
        self.info["type"] = str(value.type)
        if self.reeval:
            self.info["how"] = "expression"
        elif t.code == gdb.TYPE_CODE_PTR:
            self.info["how"] = "pointer"
            target = t.target().strip_typedefs()
            if target.code in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_ARRAY):
                self.info.update(type_size=target.sizeof, type_code=_code(target))
            if value.address is not None:
                self.pointer_at = int(value.address)
                self.pointer_size = t.sizeof
            elif not _ADDRESS_OF.match(self.expr):
                # e.g. &HYPERVISOR_shared_info->vcpu_info[1]: computed from a pointer
                # that may not be set yet
                self.reeval = True
        elif t.code == gdb.TYPE_CODE_INT and value.address is not None:
            # a word in memory holding the address (a symbol map's pointer variable,
            # read as *(unsigned long *)ADDR): followed like a pointer
            self.info["how"] = "pointer"
            self.pointer_at = int(value.address)
            self.pointer_size = t.sizeof
        elif t.code == gdb.TYPE_CODE_INT:
            self.info["how"] = "address"
        elif value.address is not None:
            self.info.update(how="object", type_size=t.sizeof, type_code=_code(t))
        else:
            raise gdb.GdbError(f"cannot take the address of {self.expr!r} ({value.type})")
        if not self.size:
            # --watch NAME=EXPR without a length: the object's own size
            self.size = self.info.get("type_size") or 0
            if not self.size:
                raise gdb.GdbError(f"region {self.name}: gdb does not know the size of "
                                   f"{self.expr!r}; give NAME=EXPR:LEN")
        self.info["size"] = self.size
        self.address = self.locate(value)
        self.info["address"] = self.address

    def locate(self, value=None):
        """The region's address now; None when its pointer is NULL or unreadable."""
        try:
            if self.pointer_at is not None:
                raw = bytes(gdb.selected_inferior().read_memory(self.pointer_at,
                                                                self.pointer_size))
                addr = int.from_bytes(raw, "little")
            else:
                if value is None:
                    value = gdb.parse_and_eval(self.expr)
                t = value.type.strip_typedefs()
                if t.code in (gdb.TYPE_CODE_PTR, gdb.TYPE_CODE_INT):
                    addr = int(value)
                elif value.address is not None:
                    addr = int(value.address)
                else:
                    return None
        except (gdb.error, gdb.MemoryError, ValueError):
            return None
        return addr or None

    @property
    def follows(self):
        return self.pointer_at is not None or self.reeval


def _endian():
    text = gdb.execute("show endian", to_string=True)
    return "big" if "big endian" in text else "little"


def _code(t):
    return "struct" if t.code == gdb.TYPE_CODE_STRUCT else "array"


class Agent:
    def __init__(self, config):
        self.config = config
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(config["socket"])
        self.lock = threading.Lock()
        self.queue = []
        self.queued = 0
        self.done = threading.Event()
        threading.Thread(target=self._flusher, name="xreplay-flush", daemon=True).start()
        self.inferior = gdb.selected_inferior()
        self.arch = gdb.selected_frame().architecture().name() if gdb.selected_thread() else ""
        self.flags_reg = config.get("flags_register")
        self.hits = 0
        self.duplicates = 0
        self.foreign = 0
        self.filter_errors = 0
        self.count_limit = config.get("count") or 0
        self.dedupe = bool(config.get("dedupe"))
        self.stable_reads = bool(config.get("stable_reads"))
        self.unstable_reads = 0  # hits whose regions changed under every pair of passes
        self.filter_expr = config.get("filter")
        self.vcpu_expr = config.get("vcpu_expr")
        self.guest_time = bool(config.get("guest_time"))
        self.last = {}
        self.probes = []
        self.regions = [_Region(spec) for spec in config["regions"]]
        for r in self.regions:
            r.info["readable"] = self.readable(r.address)
        self.check_expression("--filter", self.filter_expr)
        self.check_expression("--vcpu-expr", self.vcpu_expr)
        try:
            for i, spec in enumerate(config["probes"]):
                self.probes.append(_Probe(self, i, spec))
        except gdb.GdbError:
            for p in self.probes:
                p.delete()
            self.sock.close()
            raise
        hello = {"event": "hello", "regions": [r.info for r in self.regions],
                 "arch": self.arch,
                 "probes": [{"name": p.name, "locations": p.location,
                             "number": p.number} for p in self.probes]}
        if config.get("direct"):
            hello["direct"] = self.direct_info()
        self.send_json(hello)

    # -- what the recorder's direct hit loop needs ---------------------------------

    def direct_info(self):
        """Every address gdb resolved, for a hit loop that speaks to the stub itself
        (xreplay.record.direct): probe addresses, where each region is (or the pointer it
        is read through), gdb's thread numbers by the stub's thread id, and where pc, sp
        and the flags register are in the stub's register numbering and ``g`` reply."""
        probes = []
        for p in self.probes:
            locs = getattr(p, "locations", None)  # gdb >= 13
            if locs is None:
                return {"error": "this gdb does not list breakpoint locations (gdb < 13)"}
            probes.append(sorted({int(loc.address) for loc in locs if loc.enabled}))
        regions = []
        for r in self.regions:
            regions.append({"address": r.address, "size": r.size, "reeval": r.reeval,
                            "pointer_at": r.pointer_at, "pointer_size": r.pointer_size,
                            "in_use": r.gate})
        threads = {}
        for t in self.inferior.threads():
            pid, lwp, tid = t.ptid
            threads[str(lwp or tid or pid)] = t.num
        return {"probes": probes, "regions": regions, "threads": threads,
                "registers": self.remote_registers(), "endian": _endian()}

    def remote_registers(self):
        """``{"pc"|"sp"|"flags": [remote number, g offset, size]}`` from gdb's own map."""
        names = {"pc": ("rip", "eip", "pc"), "sp": ("rsp", "esp", "sp"),
                 "flags": (self.flags_reg,) if self.flags_reg else ()}
        table = gdb.execute("maint print remote-registers", to_string=True)
        found = {}
        for line in table.splitlines()[1:]:
            cols = line.split()
            if len(cols) < 8 or not cols[-1].isdigit() or not cols[-2].isdigit():
                continue
            name, size, rnum, goff = cols[0], int(cols[4]), int(cols[-2]), int(cols[-1])
            for key, wanted in names.items():
                if key not in found and name in wanted:
                    found[key] = [rnum, goff, size]
        return found

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    def check_expression(option, expr):
        """An expression gdb cannot evaluate at all is a set-up error, not 'false' at every
        hit; one that only reads memory not mapped right now is fine."""
        if not expr:
            return
        try:
            gdb.parse_and_eval(expr)
        except gdb.MemoryError:
            pass
        except gdb.error as e:
            raise gdb.GdbError(f"{option} {expr!r}: gdb cannot evaluate it: {e}") from None

    def readable(self, addr):
        if addr is None:
            return False
        try:
            self.inferior.read_memory(addr, 1)
            return True
        except gdb.MemoryError:
            return False

    def send(self, kind, body, now=True):
        """Queue a message; flush at once (``now``) or when the batch is big or old.

        Sending every snapshot on its own costs a syscall and a wake-up of the recorder per
        hit, about 30% of the snapshot rate on two cores; a flusher thread bounds the delay
        to FLUSH_INTERVAL so the recorder's hang detection still sees hits promptly.
        """
        with self.lock:
            self.queue.append(wire.frame(kind, body))
            self.queued += len(body)
            if now or self.queued >= FLUSH_BYTES or len(self.queue) >= FLUSH_COUNT:
                self._flush_locked()

    def _flush_locked(self):
        if self.queue:
            data = b"".join(self.queue)
            self.queue = []
            self.queued = 0
            self.sock.sendall(data)

    def _flusher(self):
        while not self.done.wait(FLUSH_INTERVAL):
            with self.lock:
                try:
                    self._flush_locked()
                except OSError:
                    return

    def send_json(self, obj):
        self.send(wire.JSON_KIND, json.dumps(obj).encode())

    def vcpu_id(self):
        """The guest's vCPU number: from the configured expression (a guest's own CPU id,
        e.g. Linux's per-cpu xen_vcpu_id) or else gdb's thread (QEMU: the physical CPU)."""
        if self.vcpu_expr:
            try:
                return int(gdb.parse_and_eval(self.vcpu_expr)) & 0xFFFF
            except (gdb.error, ValueError):
                pass
        thread = gdb.selected_thread()
        return max(0, thread.num - 1) if thread is not None else 0

    def register(self, name):
        # "$pc" reads the register cache directly; gdb.selected_frame() would first compute
        # the frame's id, which costs two stack reads from the stub per hit (~20% of the rate).
        try:
            return int(gdb.parse_and_eval("$" + name)) & 0xFFFFFFFFFFFFFFFF
        except (gdb.error, ValueError):
            return None

    def read_regions(self):
        """The regions at this hit. With ``stable_reads`` (a stub that pauses only the
        domain while Xen runs on: gdbsx) they are read again until two passes agree, so
        a snapshot is one moment of Xen's writes, not two halves of an event delivery."""
        out = self.read_regions_once()
        if not self.stable_reads:
            return out
        for _ in range(STABLE_READ_TRIES):
            again = self.read_regions_once()
            if again == out:
                return out
            out = again
        self.unstable_reads += 1
        return out

    def read_regions_once(self):
        out = []
        for r in self.regions:
            if r.gate is not None and not self.page_in_use(out, r.gate):
                # not given to Xen (yet): no read at all, so a hit costs only the pages in
                # use; the address is forgotten, and the region-moved note when it
                # appears says from which hit it is read
                if r.address is not None:
                    r.address = None
                    self.send_json({"event": "region-moved", "region": r.name,
                                    "address": None, "hit": self.hits})
                out.append(None)
                continue
            if r.follows:
                addr = r.locate()
                if addr != r.address:
                    r.address = addr
                    self.send_json({"event": "region-moved", "region": r.name,
                                    "address": addr, "hit": self.hits})
            if r.address is None:
                out.append(None)
                continue
            try:
                out.append(bytes(self.inferior.read_memory(r.address, r.size)))
            except gdb.MemoryError:
                out.append(None)
        return out

    @staticmethod
    def page_in_use(read, gate):
        """Whether the page count read at this hit (``read[gate["count"]]``, 4 bytes)
        covers page ``gate["page"]``; an unreadable count reads no page."""
        raw = read[gate["count"]] if gate["count"] < len(read) else None
        if raw is None:
            return False
        return int.from_bytes(raw[:4], "little") > gate["page"]

    # -- hits ----------------------------------------------------------------------

    def on_hit(self, pid, hang=False):
        if self.filter_expr and not hang:
            try:
                keep = bool(gdb.parse_and_eval(self.filter_expr))
            except gdb.error:
                self.filter_errors += 1
                keep = False
            if not keep:
                self.foreign += 1
                return False
        vcpu = self.vcpu_id()
        pc = self.register("pc") or 0
        sp = self.register("sp")
        regflags = self.register(self.flags_reg) if self.flags_reg else None
        regions = self.read_regions()
        if self.dedupe and not hang:
            # gdb + QEMU can report one hit twice (shared/gdbstub-limits.md): drop an exact
            # repeat of the previous hit on the same vCPU.
            key = (pid, pc, sp, regflags, tuple(regions))
            if self.last.get(vcpu) == key:
                self.duplicates += 1
                return False
            self.last[vcpu] = key
        body = wire.pack_snapshot(self.hits, pid, vcpu, pc, sp, regflags, hang, regions)
        hit = self.hits
        self.hits += 1
        last = bool(self.count_limit) and self.hits >= self.count_limit and not hang
        icount = self.icount() if self.guest_time else None
        self.send(wire.SNAPSHOT_KIND, body, now=(hang or last) and icount is None)
        if icount is not None:
            self.send(wire.TIME_KIND, wire.TIME.pack(hit, icount), now=hang or last)
        return last  # True is a real stop: the recorder sees *stopped and finishes

    @staticmethod
    def icount():
        """QEMU's instruction count on a record/replay run (``monitor info replay``)."""
        try:
            m = _ICOUNT.search(gdb.execute("monitor info replay", to_string=True))
        except gdb.error:
            return None
        return int(m.group(1)) if m else None

    def snapshot_now(self, pid):
        """A snapshot where the target is stopped now (the hang snapshot)."""
        self.on_hit(pid, hang=True)

    def finish(self):
        """Delete every probe and report counters; the target is left as found."""
        for p in self.probes:
            if p.is_valid():
                p.delete()
        self.probes = []
        self.send_json({"event": "finish", "hits": self.hits, "duplicates": self.duplicates,
                        "foreign": self.foreign, "filter_errors": self.filter_errors,
                        "unstable_reads": self.unstable_reads})
        self.done.set()
        with self.lock:
            self.sock.close()


def start(config_path):
    global _agent
    with open(config_path) as f:
        config = json.load(f)
    _agent = Agent(config)


def snapshot_now(pid):
    _agent.snapshot_now(pid)


def finish():
    if _agent is not None:
        _agent.finish()
