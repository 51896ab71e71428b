"""``python -m benchmarks gdbsx``: snapshots/s through gdbsx on the Xen lab's PV domU.

Four methods in one run against the same lab and the same probes (the Linux profile's
upcall, bottom half, block and xen_timer_interrupt) and the same reads per hit
(shared_info, the per-cpu vcpu_info pointer, the live vcpu_info): ``xreplay record``
and a raw remote-protocol client (:mod:`benchmarks.rsp_client`), each through the
project's gdbsx (``patches/gdbsx-fast.patch``) and through Debian's. One gdbsx is started
per run (it serves one connection). Ratios are xreplay/raw on the same gdbsx.

An idle domU takes only ~10-15 upcalls per second, so a rate there is the smaller of the
guest's event rate and what the stub allows; ``lab up --domu-busy`` gives the domU a
4 ms sleep loop (a timer upcall every few ms), so the stub is what limits. The raw
client shows that ceiling. Uses the gdbsx lab in ``$XREPLAY_LAB_DIR`` when one runs there
(``xreplay lab up --stub gdbsx [--domu-busy]``); with ``XREPLAY_GDBSX_BENCH_BOOT=1`` boots a
busy PV one (about 1-2 minutes) and stops it by PID afterwards; else it is skipped, saying
so (``make bench`` does not boot Xen).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks import BenchArgs, Measurement, Method, register, run_interleaved, table
from benchmarks.rsp_client import RspClient

DEFAULT_HITS = 60
#: vcpu_info.evtchn_upcall_pending (offset 0): 1 at almost every upcall hit.
UPCALL_PENDING_OFF = 0
VCPU_INFO_SIZE = 64


def _log(msg: str) -> None:
    print(msg, flush=True)


def _lab():  # -> tuple[Lab, bool]: the lab and whether we started it
    from xreplay.errors import XReplayError
    from xreplay.lab.xen import Lab, default_run_dir

    run_dir = default_run_dir()
    try:
        lab = Lab.attach(run_dir)
        if lab.stub == "gdbsx" and lab.domu == "pv":
            return lab, False
    except XReplayError:
        pass
    if not os.environ.get("XREPLAY_GDBSX_BENCH_BOOT"):
        return None, False
    lab = Lab(Path(tempfile.mkdtemp(prefix="gdbsx-bench-")), domu="pv", stub="gdbsx",
              domu_busy=True, progress=lambda m: _log(f"  lab: {m}"))
    lab.start()
    return lab, True


def _verify_upcalls(upcall_pending: list[int]) -> tuple[bool, str]:
    if not upcall_pending:
        return False, "no upcall hit"
    share = sum(upcall_pending) / len(upcall_pending)
    return share >= 0.8, f"upcall_pending=1 at {share:.0%} of upcall hits"


def run_xreplay(lab, binary: str, hits: int) -> Measurement:
    from xreplay.gdb.gdbsx import adapt_options
    from xreplay.lab.xen import gdbsx as lab_gdbsx
    from xreplay.lab.xen.record import lab_record_options
    from xreplay.record import Recorder
    from xreplay.xrr import XrrReader

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gdbsx-bench-") as tmp:
        out = Path(tmp) / "run.xrr"
        options, _ = lab_record_options(lab, out, count=hits)
        own = binary == lab_gdbsx.GDBSX_XREPLAY
        options.target = lab_gdbsx.start_gdbsx(lab, binary=binary)
        options.extra_gdb_commands = [c for c in options.extra_gdb_commands
                                      if "packet-size" not in c]
        adapt_options(options, own_build=own)
        res = Recorder(options).run()
        with XrrReader(out) as reader:
            pend = [s.vcpus[s.vcpu].evtchn_upcall_pending for s in reader.snapshots()
                    if s.probe == "upcall"]
    ok, note = _verify_upcalls(pend)
    return Measurement(res.snapshots, res.elapsed, ok and res.snapshots == hits,
                       time.monotonic() - t0, "" if ok else note)


def run_raw(lab, binary: str, hits: int) -> Measurement:
    """What a hit needs on gdbsx, by hand: stop, registers, pc back onto the int3, the
    reads, then step over the breakpoint (Z0 on the project's gdbsx, byte writes on
    Debian's) and continue."""
    from xreplay.lab.xen import gdbsx as lab_gdbsx
    from xreplay.profiles.linux import LinuxSymbols, inspect_guest

    t_wall = time.monotonic()
    syms = LinuxSymbols.load(lab.symbol_map)
    facts = inspect_guest(lab_gdbsx.start_gdbsx(lab, binary=binary), syms, None, [0],
                          machine_addresses=False)
    addrs = [syms.upcall, syms.bottom_half, syms.extra["xen_timer_interrupt"]]
    if syms.block is not None:
        addrs.append(syms.block)
    host, port = lab_gdbsx.start_gdbsx(lab, binary=binary).split(":")
    own = binary == lab_gdbsx.GDBSX_XREPLAY
    c = RspClient(host, int(port), read_chunk=None if own else 1995)
    c.connect()
    orig: dict[int, bytes] = {}

    def insert(addr: int) -> None:
        if own:
            c.set_breakpoint(addr, True)
        else:
            orig.setdefault(addr, c.read_memory(addr, 1))
            assert c.request(b"M%x,1:cc" % addr) == b"OK"

    def remove(addr: int) -> None:
        if own:
            c.set_breakpoint(addr, False)
        else:
            assert c.request(b"M%x,1:%s" % (addr, orig[addr].hex().encode())) == b"OK"

    for a in addrs:
        insert(a)
    pend: list[int] = []
    n = 0
    t0 = time.monotonic()
    stop = c.cont()
    while True:
        regs = bytearray(c.read_registers())
        rip = int.from_bytes(regs[128:136], "little") - 1
        if rip not in addrs:
            break
        regs[128:136] = rip.to_bytes(8, "little")
        assert c.request(b"G" + bytes(regs).hex().encode()) == b"OK"
        c.read_memory(facts.shared_info_va, 4096)
        vcpu = int(stop.thread or b"0", 16)
        base = int.from_bytes(c.read_memory(syms.per_cpu_offset + 8 * vcpu, 8), "little")
        vinfo = int.from_bytes(c.read_memory(base + syms.xen_vcpu, 8), "little")
        data = c.read_memory(vinfo, VCPU_INFO_SIZE)
        if rip == syms.upcall:
            pend.append(data[UPCALL_PENDING_OFF])
        n += 1
        if n >= hits:
            break
        remove(rip)
        c.request(b"s")
        insert(rip)
        stop = c.cont()
    elapsed = time.monotonic() - t0
    for a in addrs:
        remove(a)
    c.send(b"D")
    c.close()
    ok, note = _verify_upcalls(pend)
    return Measurement(n, elapsed, ok and n == hits, time.monotonic() - t_wall,
                       "" if ok else note)


@register("gdbsx", "xreplay vs a raw RSP client through gdbsx on the Xen lab's PV domU")
def main(args: BenchArgs) -> bool:
    from xreplay.lab.xen import gdbsx as lab_gdbsx

    hits = args.hits or DEFAULT_HITS
    lab, started = _lab()
    if lab is None:
        _log("gdbsx: skipped: no gdbsx lab with a PV domU in $XREPLAY_LAB_DIR (start one with "
             "`xreplay lab up --stub gdbsx`, or set XREPLAY_GDBSX_BENCH_BOOT=1 to boot one)")
        return True
    try:
        if not lab_gdbsx.install_own_gdbsx(lab):
            _log("  the lab has no project gdbsx: only Debian's is measured")
        methods = []
        for label, binary in (("project's", lab_gdbsx.GDBSX_XREPLAY),
                              ("Debian's", lab_gdbsx.GDBSX)):
            tag = "own" if binary == lab_gdbsx.GDBSX_XREPLAY else "deb"
            methods += [
                Method(f"xreplay ({label} gdbsx)", f"xreplay-{tag}", hits,
                       lambda h, b=binary: run_xreplay(lab, b, h)),
                Method(f"raw RSP ({label} gdbsx)", f"raw-{tag}", hits,
                       lambda h, b=binary: run_raw(lab, b, h)),
            ]
        busy = "busy" if lab.state is not None and lab.state.domu_busy else "idle"
        _log(f"gdbsx benchmark on the lab in {lab.run_dir} ({busy} PV domU {lab.domid}), "
             f"{hits} hits per run, {args.runs} runs, load {os.getloadavg()[0]:.1f}")
        run_interleaved(methods, args.runs, _log)
        for base in ("raw RSP (project's gdbsx)", "raw RSP (Debian's gdbsx)"):
            group = [m for m in methods if m.name.endswith(base[base.index("("):])]
            _log(table(group, base, title=f"\nthrough {base[base.index('(') + 1:-1]}:"))
        return all(x.verified for m in methods for x in m.results)
    finally:
        if started:
            lab.stop()
