"""xreplay's in-gdb agent: snapshots at breakpoints without an MI round trip per hit.

GDB sources this file into its embedded Python, which is the *system* Python, not the
project's virtualenv, so it uses the standard library only.  Each probe is a
``gdb.Breakpoint`` whose ``stop()`` reads the configured memory regions with
``Inferior.read_memory``, sends one binary frame to the recorder over a Unix socket and
returns False, so gdb resumes the target at once (GDB manual, "Breakpoints In Python").
The recorder (``xreplay.record``) owns the ``.xrr`` file; this side only reads and sends.

Wire protocol (little-endian), one message per frame: ``u32 length``, ``u8 type``, body.
Type ``S`` (snapshot): ``<IHHQQQB`` = hit, probe, vcpu, pc, sp, regflags, flags, then
``u8 nregions`` and per region ``u32 size`` (0xFFFFFFFF = unreadable) and the bytes.
Type ``J``: a UTF-8 JSON object (hello, counters, errors).
Type ``T`` (guest time, only with ``guest_time`` in the config, i.e. on a QEMU replay):
``<IQ`` = hit, icount, sent right after the hit's ``S``.
"""

import json
import re
import socket
import struct
import threading

import gdb  # type: ignore[import-not-found]

_SNAP = struct.Struct("<IHHQQQB")
_LEN = struct.Struct("<IB")
_TIME = struct.Struct("<IQ")
_ICOUNT = re.compile(r"instruction count = (\d+)")
UNREADABLE = 0xFFFFFFFF
F_HANG = 1
F_HAVE_SP = 2
F_HAVE_FLAGS = 4

FLUSH_INTERVAL = 0.02  # s
FLUSH_COUNT = 64
FLUSH_BYTES = 1 << 18

_agent = None


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
        self.regions = []  # [address or None, size, expression to re-evaluate or None]
        self.hits = 0
        self.duplicates = 0
        self.foreign = 0
        self.count_limit = config.get("count") or 0
        self.dedupe = bool(config.get("dedupe"))
        self.filter_expr = config.get("filter")
        self.guest_time = bool(config.get("guest_time"))
        self.last = {}
        self.probes = []
        resolved = []
        for spec in config["regions"]:
            reeval = spec["expr"] if spec.get("reeval") else None
            try:
                addr = self.resolve(spec["expr"])
            except gdb.error:
                # On a whole-machine stub the attach may stop in Xen or another domain, where
                # the guest's pointers are not mapped; a re-evaluated region resolves per hit.
                if reeval is None:
                    raise
                addr = None
            self.regions.append([addr, spec["size"], reeval])
            resolved.append({"name": spec["name"], "address": addr, "per_hit": bool(reeval),
                             "type_size": self.object_size(spec["expr"])})
        self.vcpu_expr = config.get("vcpu_expr")
        try:
            for i, spec in enumerate(config["probes"]):
                self.probes.append(_Probe(self, i, spec))
        except gdb.GdbError:
            for p in self.probes:
                p.delete()
            self.sock.close()
            raise
        self.send_json({"event": "hello", "regions": resolved, "arch": self.arch,
                        "probes": [{"name": p.name, "locations": p.location,
                                    "number": p.number} for p in self.probes]})

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    def resolve(expr):
        """An address from an expression: a pointer's value, an object's address, or an int."""
        value = gdb.parse_and_eval(expr)
        code = value.type.strip_typedefs().code
        if code == gdb.TYPE_CODE_PTR:
            return int(value)
        if code in (gdb.TYPE_CODE_INT,):
            return int(value)
        if value.address is not None:
            return int(value.address)
        raise gdb.GdbError(f"cannot take an address of {expr!r}")

    @staticmethod
    def object_size(expr):
        """sizeof the object an expression names or points to, when debug info says so
        (lets the recorder catch a wrong --arch); None for bare addresses."""
        try:
            t = gdb.parse_and_eval(expr).type.strip_typedefs()
            if t.code == gdb.TYPE_CODE_PTR:
                t = t.target().strip_typedefs()
            if t.code in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_ARRAY):
                return t.sizeof
        except (gdb.error, RuntimeError):
            pass
        return None

    def send(self, kind, body, now=True):
        """Queue a message; flush at once (``now``) or when the batch is big or old.

        Sending every snapshot on its own costs a syscall and a wake-up of the recorder per
        hit, about 30% of the snapshot rate on two cores; a flusher thread bounds the delay
        to FLUSH_INTERVAL so the recorder's hang detection still sees hits promptly.
        """
        with self.lock:
            self.queue.append(_LEN.pack(len(body) + 1, kind) + body)
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
        self.send(ord("J"), json.dumps(obj).encode())

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
        out = []
        for entry in self.regions:
            addr, size, expr = entry
            if expr is not None:
                try:
                    addr = entry[0] = self.resolve(expr)
                except gdb.error:
                    addr = None
            if addr is None:
                out.append(None)
                continue
            try:
                out.append(bytes(self.inferior.read_memory(addr, size)))
            except gdb.MemoryError:
                out.append(None)
        return out

    # -- hits ----------------------------------------------------------------------

    def on_hit(self, pid, hang=False):
        if self.filter_expr and not hang:
            try:
                keep = bool(gdb.parse_and_eval(self.filter_expr))
            except gdb.error:
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
        flags = (F_HANG if hang else 0) | (F_HAVE_SP if sp is not None else 0) | (
            F_HAVE_FLAGS if regflags is not None else 0)
        parts = [_SNAP.pack(self.hits, pid, vcpu, pc, sp or 0, regflags or 0, flags),
                 bytes([len(regions)])]
        for data in regions:
            if data is None:
                parts.append(struct.pack("<I", UNREADABLE))
            else:
                parts.append(struct.pack("<I", len(data)))
                parts.append(data)
        hit = self.hits
        self.hits += 1
        last = bool(self.count_limit) and self.hits >= self.count_limit and not hang
        icount = self.icount() if self.guest_time else None
        self.send(ord("S"), b"".join(parts), now=(hang or last) and icount is None)
        if icount is not None:
            self.send(ord("T"), _TIME.pack(hit, icount), now=hang or last)
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
                        "foreign": self.foreign})
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
