"""xreplay's lab unikernel: a Solo5/MirageOS-style PVH guest for the real Xen lab.

Why: the other lab guests model Xen inside the guest. This one runs on the lab's real Xen
4.17 (``xl create`` with ``type = "pvh"`` in dom0) with the seed's configuration — long
mode, ``HYPERVISOR_SHARED_INFO`` as a page-sized array, upcalls through
``HVMOP_set_evtchn_upcall_vector``, the thread's ``evtchn_demux_pending`` called from the
main loop, ``sti; hlt`` — so the hang it reproduces is Xen's own, and Xen's 'e' key is the
witness. See ``README.md`` next to the sources for the contract.

Built with gcc like the other lab guests (``-g``, output named by a hash of sources and
flags, atomic write); :func:`boot` puts it, its ``xl`` config and the dom0 flood helper
into a running :class:`~xreplay.lab.xen.Lab`'s dom0 and creates the domain.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from xreplay.debugkeys import DomainEvtchnDump, latest, parse
from xreplay.errors import XReplayError
from xreplay.lab import cache_root
from xreplay.lab.xen import vmcb
from xreplay.lab.xen.lab import Lab

VARIANTS: tuple[str, ...] = ("correct", "lost-upcall", "unmask-no-reraise", "callback-irq")
"""``variant=`` values (xl ``cmdline``); see ``main.c``."""
HANGING_VARIANTS: tuple[str, ...] = ("lost-upcall",)
"""Variants whose vCPU blocks for good (``unmask-no-reraise`` only deafens one port)."""

PROBES: dict[str, str] = {
    "upcall": "solo5__xen_evtchn_vector_handler",
    "bottom-half": "evtchn_demux_pending",
    "block": "evtchn_block_domain",
}
"""Probe role -> symbol. Aliases at the same addresses: ``evtchn_upcall_handler``
(the lab guests' name), ``mirage_xen_evtchn_demux_pending``,
``mirage_xen_evtchn_block_domain``."""
SHARED_INFO_SYMBOL = "HYPERVISOR_SHARED_INFO"
"""``uint8_t[4096]``, Solo5's declaration; ``solo5__xen_HYPERVISOR_SHARED_INFO`` aliases it."""
SHADOW_SYMBOL = "evtchn_callback_ml"
SHADOW_PORTS = 128
COUNTER_SYMBOLS: tuple[str, ...] = ("lab_upcall_count", "lab_demux_count", "lab_block_count")
UPCALL_VECTOR = 0xF3
ARCH = "x86_64"
"""The shared_info layout Xen latches for this guest (it is in long mode at its first
hypercall-page write and shared_info mapping)."""

DEFAULT_WINDOW_US = 2000
DEFAULT_PERIOD_MS = 10
DEFAULT_FLOOD_INTERVAL_US = 2000
DOM0_DIR = "/root/xreplay-pvh"

SOURCE_DIR = Path(__file__).parent
_KERNEL_SOURCES = ("head64.S", "main.c", "link.ld")
_KERNEL_CFLAGS: tuple[str, ...] = (
    "-m64", "-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-ffreestanding",
    "-fno-pic", "-fno-pie", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-optimize-sibling-calls",
    # Debian's Xen headers refuse 4.15+; 4.14's interface has everything used here.
    "-D__XEN_INTERFACE_VERSION__=0x00040e00",
    "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments",
)
_FLOOD_SOURCES = ("flood.c",)
_FLOOD_CFLAGS: tuple[str, ...] = (
    "-O2", "-Wall", "-Wextra", "-Werror", "-ffreestanding", "-fno-pie", "-no-pie",
    "-nostdlib", "-static", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-Wl,--build-id=none",
)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise XReplayError(f"unknown unikernel variant {variant!r}: use one of "
                           f"{', '.join(VARIANTS)}")


# -- building -------------------------------------------------------------------------------


def _digest(tag: str, flags: tuple[str, ...], sources: tuple[str, ...]) -> str:
    h = hashlib.sha256(tag.encode() + b"\0" + "\0".join(flags).encode())
    for name in sources:
        path = SOURCE_DIR / name
        if not path.is_file():
            raise XReplayError(f"unikernel source missing: {path} (broken xreplay install?)")
        h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _build(tag: str, suffix: str, flags: tuple[str, ...], sources: tuple[str, ...],
           cmd_tail: list[str],
           cache_dir: Path | None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "lab"
    out = cache / f"{tag}-{_digest(tag, flags, sources)}{suffix}"
    if out.is_file():
        return out
    if shutil.which("gcc") is None:
        raise XReplayError("gcc not found: install the Debian package gcc")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{tag}-", suffix=".tmp", dir=cache)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        units = [str(SOURCE_DIR / s) for s in sources if s.endswith((".c", ".S"))]
        res = subprocess.run(["gcc", *flags, *cmd_tail, "-o", str(tmp), *units],
                             cwd=SOURCE_DIR, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            err = res.stderr.strip()
            if "xen/" in err and "No such file" in err:
                raise XReplayError("Xen's public headers are missing: install the Debian "
                                   f"package libxen-dev\n{err}")
            raise XReplayError(f"building {tag} failed:\n{err}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def build_unikernel(cache_dir: Path | None = None) -> Path:
    """The unikernel's ELF (with ``-g``), built once per source/flag set."""
    return _build("pvh-unikernel", ".elf", _KERNEL_CFLAGS, _KERNEL_SOURCES,
                  ["-Wl,-T," + str(SOURCE_DIR / "link.ld")], cache_dir)


def build_flood(cache_dir: Path | None = None) -> Path:
    """The dom0 helper that binds the guest's flood port and kicks it (static, libc-free)."""
    return _build("xreplay-flood", "", _FLOOD_CFLAGS, _FLOOD_SOURCES, [], cache_dir)


# -- the domain -----------------------------------------------------------------------------


def domain_name(variant: str) -> str:
    return "uk-" + variant


def cmdline(variant: str, window_us: int = DEFAULT_WINDOW_US,
            period_ms: int = DEFAULT_PERIOD_MS) -> str:
    check_variant(variant)
    return f"variant={variant} window_us={window_us} period_ms={period_ms}"


def xl_config(variant: str, kernel: str, *, window_us: int = DEFAULT_WINDOW_US,
              period_ms: int = DEFAULT_PERIOD_MS) -> str:
    """The ``xl`` config: PVH, one vCPU, 32 MiB, kept on crash/poweroff for the 'e' key."""
    return "\n".join([
        f'name = "{domain_name(variant)}"',
        'type = "pvh"',
        f'kernel = "{kernel}"',
        f'cmdline = "{cmdline(variant, window_us, period_ms)}"',
        "memory = 32",
        "vcpus = 1",
        'on_crash = "preserve"',
        'on_poweroff = "preserve"',
        # a triple fault is Xen's HVM shutdown action "reboot": xl would destroy the
        # domain and start a new one under a new domid (seen: `xl list 2` gone after a
        # recording, the restarted copy still running into the next test); kept, it
        # shows as shut down and its Xen console lines say why (Unikernel.fate)
        'on_reboot = "preserve"',
        # TCG's emulated SVM gives Xen no NRIP for an intercepted RDTSCP (as the lab's domU)
        'cpuid = "host,rdtscp=0"',
    ]) + "\n"


XEN_CS = "e008"
"""Xen's own 64-bit code selector (``__HYPERVISOR_CS``) as its register dumps print it."""

_READY = re.compile(r"LAB-READY (.*)$")
_ALIVE = re.compile(r"LAB-ALIVE (.*)$")


def _fields(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


@dataclass
class Unikernel:
    """One unikernel domain in a running lab, its flood helper and its console."""

    lab: Lab
    variant: str
    domid: int
    name: str
    elf: Path
    ports: dict[str, int] = field(default_factory=dict)
    """``xenstore``, ``console``, ``timer``, ``flood`` -> port, from LAB-READY."""
    flood_pid: int | None = None
    """The helper's PID in dom0 (None until :meth:`start_flood`)."""
    _log_offset: int = 0

    def console(self) -> list[str]:
        """The domain's console lines so far (Xen prints port 0xE9 output as ``(dN) ...``
        on its serial console, which the lab logs)."""
        prefix = f"(d{self.domid}) "
        text = self.lab.serial_log.read_bytes()[self._log_offset:].decode(errors="replace")
        # only whole lines: a line still being written ("LAB-READY vari") is not yet one
        text = text[:text.rfind("\n") + 1]
        return [ln.split(prefix, 1)[1].rstrip("\r") for ln in text.splitlines() if prefix in ln]

    def wait_for(self, marker: str, timeout: float = 60.0) -> str:
        """The first console line containing ``marker``; fails on ``LAB-ERROR``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.console()
            for ln in lines:
                if marker in ln:
                    return ln
                if "LAB-ERROR" in ln:
                    raise XReplayError(f"unikernel {self.name} (domid {self.domid}): {ln}")
            if time.monotonic() > deadline:
                tail = "\n".join(lines[-5:]) or "(no console output)"
                raise XReplayError(f"unikernel {self.name} did not print {marker} within "
                                   f"{timeout:.0f} s:\n{tail}")
            time.sleep(0.25)

    def alive_lines(self) -> list[dict[str, str]]:
        """The ``LAB-ALIVE`` reports (one a second while the main loop runs)."""
        return [_fields(m.group(1)) for ln in self.console() if (m := _ALIVE.search(ln))]

    def labels(self) -> dict[int, str]:
        return {port: name for name, port in self.ports.items()}

    def start_flood(self, interval_us: int = DEFAULT_FLOOD_INTERVAL_US,
                    seconds: int = 3600) -> int:
        """Start the dom0 helper on the flood port (in its own session: it outlives the
        command; its PID is kept in a file for :func:`boot` to stop a leftover one)."""
        port = self.ports.get("flood")
        if port is None:
            raise XReplayError(f"unikernel {self.name}: no flood port (LAB-READY not seen)")
        base = f"{DOM0_DIR}/flood-{self.name}"
        out = self.lab.dom0(
            f"setsid {DOM0_DIR}/xreplay-flood {self.domid} {port} {interval_us} {seconds} "
            f"> {base}.log 2>&1 < /dev/null & echo $! > {base}.pid; sleep 1; "
            f"cat {base}.pid {base}.log", timeout=30)
        words = out.split()
        if not words or not words[0].isdigit() or "bound to" not in out:
            raise XReplayError(f"the dom0 flood helper did not bind port {port}: {out.strip()}")
        self.flood_pid = int(words[0])
        return self.flood_pid

    def stop_flood(self) -> None:
        if self.flood_pid is not None:
            self.lab.dom0(f"kill {self.flood_pid} 2>/dev/null; "
                          f"rm -f {DOM0_DIR}/flood-{self.name}.pid; true", timeout=30)
            self.flood_pid = None

    def xl_state(self) -> str:
        """``xl list``'s state column for the domain (e.g. ``-b----``, ``r-----``)."""
        return self.state_of(self.lab, self.domid)

    @staticmethod
    def state_of(lab: Lab, domid: int) -> str:
        out = lab.dom0(f"xl list {domid}", timeout=30)
        rows = [ln.split() for ln in out.splitlines()[1:] if ln.strip()]
        if not rows or len(rows[0]) < 5:
            raise XReplayError(f"xl list {domid}: unexpected output: {out.strip()}")
        return rows[0][4]

    def xen_lines(self) -> list[str]:
        """What Xen itself printed about this domain (``(XEN) ... d<domid>v...``) since
        it was created: a triple fault and its register dump, a crash."""
        text = self.lab.serial_log.read_bytes()[self._log_offset:].decode(errors="replace")
        lines = text.splitlines()
        keep: set[int] = set()
        tag = re.compile(rf"\bd{self.domid}v\d+ |\bDom{self.domid}\b|\bd{self.domid}\b")
        for i, ln in enumerate(lines):
            if ln.startswith("(XEN)") and tag.search(ln) and " save: " not in ln \
                    and "restore:" not in ln:
                keep.add(i)
                if "Dumping" in ln:  # the vCPU dump: where it was (RIP, RFLAGS)
                    keep.update(j for j in range(i + 1, min(i + 6, len(lines)))
                                if lines[j].startswith(("(XEN) RIP", "(XEN) RFLAGS")))
        return [lines[i].strip() for i in sorted(keep)]

    def fate(self) -> str | None:
        """Why the domain is no longer running, or None while it runs (or blocks, or is
        paused): ``xl list``'s shut-down/crashed/dying state or its absence, with Xen's
        own lines about it (a triple fault names the vCPU and its RIP)."""
        rc, out = self.lab.dom0_run(f"xl list {self.domid}", timeout=30)
        rows = [ln.split() for ln in out.splitlines()[1:] if ln.strip()]
        state = rows[0][4] if rc == 0 and rows and len(rows[0]) >= 5 else None
        if state is not None and not any(c in state for c in "scd"):
            return None
        said = [ln for ln in self.xen_lines() if "upcall vector" not in ln]
        where = (f"xl list shows it {state}" if state is not None
                 else "it no longer exists")
        emulator = self.emulator_fault()
        machine = self.vmcb_note() if state is not None else None
        return (f"unikernel {self.name} (domid {self.domid}) stopped running: {where}; "
                + ("Xen said: " + " / ".join(said[:6]) if said
                   else "Xen printed nothing about it")
                + (f"; {emulator}" if emulator else "")
                + (f"; {machine}" if machine else "")
                + f" (see {self.lab.serial_log})")

    def vmcbs(self) -> list[vmcb.Vmcb]:
        """The domain's VMCBs now, as Xen's 'v' key prints them (:mod:`xreplay.lab.xen.vmcb`)."""
        return vmcb.read(self.lab, self.domid)

    def vmcb_note(self) -> str:
        """The VMCB of a stopped domain in one line (at a triple fault: the exit, the event
        whose delivery it interrupted, RIP, RFLAGS, DR6/DR7, intercepts, IDTR), or why it
        could not be read."""
        try:
            return " / ".join(v.summary() for v in self.vmcbs())
        except XReplayError as exc:
            return f"its VMCB could not be read: {exc}"

    def emulator_fault(self) -> str | None:
        """The one failure of this domain that is named as the emulator's, or None.

        Xen reports a triple fault of the domain (``dNvM Triple fault``) and its dump of
        the vCPU holds Xen's own state: ``cs`` :data:`XEN_CS` (Xen's code selector, which
        no guest runs with) and a RIP inside Xen. Seen 3 times in 8 gdbsx recordings
        under load, identical, within seconds after gdbsx detached (0 times in 6
        never-debugged runs): RIP the instruction after ``vmrun`` in Xen's
        ``svm_asm_do_resume``, CR2 the same address, RSP on Xen's stack: QEMU TCG's
        emulated SVM faulted in its own #VMEXIT (the host state it restored, fetched in
        the guest's context) and reported that as the guest's shutdown. What the debug
        session leaves that triggers it is not known; this only names it."""
        text = self.lab.serial_log.read_bytes()[self._log_offset:].decode(errors="replace")
        lines = text.splitlines()
        for i, ln in enumerate(lines):
            if re.search(rf"\bd{self.domid}v\d+ Triple fault", ln):
                dump = "\n".join(lines[i + 1:i + 20])
                cs = re.search(r"\bcs: ([0-9a-f]{4})", dump)
                rip = re.search(r"RIP:\s+([0-9a-f]{4}):\[<([0-9a-f]+)>\]", dump)
                if cs and cs.group(1) == XEN_CS and rip and rip.group(1) == XEN_CS:
                    return (f"Xen's triple-fault dump of domain {self.domid} holds Xen's own "
                            f"state (cs {XEN_CS}, RIP {rip.group(2)}): QEMU's emulated SVM "
                            "#VMEXIT failed, not the guest (seen after gdbsx sessions only)")
        return None

    def e_dump(self) -> tuple[DomainEvtchnDump, str]:
        """Xen's 'e' dump for this domain (``xl debug-keys e``), with the raw text."""
        text = self.lab.dom0("xl debug-keys e && xl dmesg", timeout=60)
        dumps = latest(parse(text, "xl dmesg"))
        if self.domid not in dumps:
            raise XReplayError(f"Xen's 'e' dump has no section for domain {self.domid}")
        dump = dumps[self.domid]
        raw = _section(text, self.domid)
        return dump, raw

    def destroy(self) -> None:
        """Stop the flood helper and destroy the domain (by domid, and by name: a copy
        xl restarted under another domid must not run on into the next test)."""
        self.stop_flood()
        self.lab.dom0(f"xl destroy {self.domid} 2>/dev/null; xl destroy {self.name} "
                      "2>/dev/null; true", timeout=60)


def _section(text: str, domid: int) -> str:
    """The last 'e' section of ``domid`` in ``xl dmesg`` output, as printed."""
    lines = text.splitlines()
    start = None
    for i, ln in enumerate(lines):
        if f"Event channel information for domain {domid}:" in ln:
            start = i
    if start is None:
        return ""
    out = [lines[start]]
    for ln in lines[start + 1:]:
        if "Event channel information for domain" in ln or not ("port" in ln or "[" in ln
                                                                 or "Polling" in ln):
            break
        out.append(ln)
    return "\n".join(out)


def boot(lab: Lab, variant: str, *, window_us: int = DEFAULT_WINDOW_US,
         period_ms: int = DEFAULT_PERIOD_MS, flood: bool = True,
         flood_interval_us: int = DEFAULT_FLOOD_INTERVAL_US, paused: bool = False,
         cache_dir: Path | None = None, timeout: float = 90.0) -> Unikernel:
    """Create the unikernel ``variant`` in the lab's dom0; wait for LAB-READY, start the
    flood. With ``paused`` the domain is created paused (``xl create -p``) and nothing
    more happens: attach a debugger, unpause, then call :func:`wait_ready`."""
    check_variant(variant)
    elf, flood_bin = build_unikernel(cache_dir), build_flood(cache_dir)
    name = domain_name(variant)
    pidfile = f"{DOM0_DIR}/flood-{name}.pid"  # a helper left by an earlier boot
    lab.dom0(f"mkdir -p {DOM0_DIR}; [ -f {pidfile} ] && kill $(cat {pidfile}) 2>/dev/null; "
             f"rm -f {pidfile}; xl destroy {name} 2>/dev/null; true", timeout=60)
    lab.put(elf, f"{DOM0_DIR}/pvh-unikernel.elf")
    lab.put(flood_bin, f"{DOM0_DIR}/xreplay-flood", 0o755)
    cfg = xl_config(variant, f"{DOM0_DIR}/pvh-unikernel.elf", window_us=window_us,
                    period_ms=period_ms)
    lab.dom0(f"cat > {DOM0_DIR}/{name}.cfg <<'EOF'\n{cfg}EOF", timeout=30)
    offset = len(lab.serial_log.read_bytes())
    out = lab.dom0(f"xl create {'-p ' if paused else ''}{DOM0_DIR}/{name}.cfg && "
                   f"xl domid {name}", timeout=120)
    ids = [ln for ln in out.split() if ln.isdigit()]
    if not ids:
        raise XReplayError(f"xl create {name} printed no domid: {out.strip()}")
    uk = Unikernel(lab=lab, variant=variant, domid=int(ids[-1]), name=name, elf=elf,
                   _log_offset=offset)
    if not paused:
        wait_ready(uk, flood=flood, flood_interval_us=flood_interval_us, timeout=timeout)
    return uk


def wait_ready(uk: Unikernel, *, flood: bool = True,
               flood_interval_us: int = DEFAULT_FLOOD_INTERVAL_US,
               timeout: float = 90.0) -> Unikernel:
    """Wait for LAB-READY (read the ports from it), then start the flood helper."""
    m = _READY.search(uk.wait_for("LAB-READY", timeout))
    assert m is not None
    f = _fields(m.group(1))
    if f.get("layout") != ARCH:
        raise XReplayError(f"unikernel {uk.name}: unexpected LAB-READY {m.group(0)}")
    uk.ports = {k: int(f[k]) for k in ("xenstore", "console", "timer", "flood")}
    if flood:
        uk.start_flood(flood_interval_us)
    return uk


@dataclass(frozen=True)
class Outcome:
    """What the host saw of a unikernel over some seconds."""

    hung: bool
    """The main loop stopped reporting and ``xl list`` shows the domain blocked."""
    xl_state: str
    alive_reports: int
    last_alive: dict[str, str]
    stranded: list[str]
    """``LAB-STRANDED`` lines (unmask-no-reraise: the flood port went deaf)."""
    errors: list[str] = field(default_factory=list)
    """``LAB-ERROR`` lines (a failed hypercall, an exception)."""
    tail: list[str] = field(default_factory=list)
    """The console's last lines, for a report."""
    fate: str | None = None
    """Why the domain stopped running (:meth:`Unikernel.fate`: shut down by a triple
    fault, crashed, gone), None while it runs, blocks or is paused."""


def watch(uk: Unikernel, seconds: float = 10.0, quiet_after: float = 3.0,
          confirm: float = 15.0) -> Outcome:
    """Watch the console for ``seconds``. It looks hung when no LAB-ALIVE came for
    ``quiet_after`` seconds at the end and Xen shows the vCPU blocked; then it is hung only
    if no LAB-ALIVE comes for ``confirm`` seconds more (on a loaded host a vCPU of the
    emulated machine can starve for seconds and come back; a lost upcall never does)."""
    start = time.monotonic()
    last_count, last_change = -1, start
    while time.monotonic() - start < seconds:
        n = len(uk.alive_lines())
        if n != last_count:
            last_count, last_change = n, time.monotonic()
        time.sleep(0.5)
    alive = uk.alive_lines()
    if len(alive) != last_count:
        last_change = time.monotonic()
    state = uk.xl_state()
    hung = time.monotonic() - last_change >= quiet_after and "b" in state
    if hung:
        deadline = time.monotonic() + confirm
        while hung and time.monotonic() < deadline:
            time.sleep(1.0)
            hung = len(uk.alive_lines()) == len(alive)
        alive = uk.alive_lines()
        state = uk.xl_state()
        hung = hung and "b" in state
    lines = uk.console()
    stranded = [ln for ln in lines if "LAB-STRANDED" in ln]
    errors = [ln for ln in lines if "LAB-ERROR" in ln]
    return Outcome(hung=hung and not errors, xl_state=state, alive_reports=len(alive),
                   last_alive=alive[-1] if alive else {}, stranded=stranded, errors=errors,
                   tail=lines[-6:], fate=uk.fate())
