"""Build and launch the lab guests: small C programs that reproduce Xen 2-level event delivery.

One C source tree (``guest/``), two builds:

``process``
    an x86_64 Linux program (``struct shared_info_x86_64``), run under ``gdbserver``. It has no
    real interrupts: the vCPU's IF flag and the LAPIC's IRR/ISR are modelled and delivery
    points are explicit. Thousands of upcalls per second without a debugger.
``baremetal``
    a 32-bit multiboot ELF (``struct shared_info_x86_32``) booted by ``qemu-system-x86_64
    -accel tcg``. Real IDT, real ``sti``/``hlt``; the upcall is a LAPIC self-IPI on vector 32,
    EOI'd by the top half.

Both contain a model of Xen (``evtchn_2l_set_pending``, ``evtchn_2l_unmask``,
``vcpu_mark_events_pending``), a seeded schedule in virtual ticks (no wall clock: a seed
gives the same run on both builds), and a guest modelled on the Solo5/MirageOS code of the
June 2020 xen-devel thread, with one bug per :data:`VARIANTS` entry. See ``guest/guest.c``
and ``guest/hv.c`` for the exact contract.

The guests print ``LAB-START ...`` first, then either ``LAB-DONE ...`` (work finished, exit
0) or, from the hypervisor model once no upcall can ever be injected again, an ``'e'``
debug-key style dump and ``LAB-HUNG ...``; a hung guest stays blocked in ``hlt``/``pause()``
until it is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

from xreplay.errors import XReplayError
from xreplay.lab import cache_root

GuestKind = Literal["process", "baremetal"]
GUEST_KINDS: tuple[str, ...] = get_args(GuestKind)

VARIANTS: tuple[str, ...] = ("correct", "lost-upcall", "unmask-no-reraise", "ffs-off-by-one")
"""``variant=`` values; each has exactly one bug (``correct`` has none)."""

FIFO_VARIANTS: tuple[str, ...] = ("fifo", "fifo-lost-link")
"""Variants on the FIFO event-channel ABI (``lab_event_array``, ``lab_control_block``):
``fifo`` is correct, ``fifo-lost-link`` clears LINKED with a plain store (a lost link)."""

FIFO_REGIONS = {"control_block": "lab_control_block", "event_array": "lab_event_array",
                "page_count": "&lab_event_array_pages"}
"""The FIFO variants' shared memory, by symbol: vCPU 0's block, the event array (its first
page; ``lab_event_pages[i]`` points at page *i*) and how many pages are in use."""

FIFO_PAGES = tuple(f"lab_event_pages[{i}]" for i in range(2))
"""The event-array page pointers (``LAB_FIFO_MAX_PAGES`` of them), as Linux's
``event_array[]``: the ``fifo`` variant adds the second page half way through its run."""

FIFO_HIGH_PORT = 1100
"""The port the ``fifo`` variant binds half way through (``LAB_PORT_HIGH``, page 1)."""

LAB_PROBES: dict[str, str] = {
    "upcall": "evtchn_upcall_handler",
    "bottom-half": "evtchn_demux_pending",
    "block": "evtchn_block_domain",
}
"""Probe kind -> function symbol, the same in both builds."""

LAB_UNMASK_SYMBOL = "evtchn_unmask"
"""The modelled EVTCHNOP_unmask hypercall (not called by ``unmask-no-reraise``)."""

LAB_DATA_SYMBOLS: tuple[str, ...] = (
    "HYPERVISOR_shared_info",  # the 4096-aligned struct shared_info_<arch> itself
    "evtchn_callback_ml",  # uint8_t[NR_PORTS]: the guest's shadow of demuxed ports
    "lab_dispatch_count",  # uint32_t[NR_PORTS]: handler runs per port
)
LAB_COUNTER_SYMBOLS: tuple[str, ...] = ("lab_upcall_count", "lab_demux_count", "lab_block_count")
"""uint32_t counters of top halves, bottom halves and blocks: useful to de-duplicate stops."""

PORT_LABELS: dict[int, str] = {1: "xenstore", 2: "console", 3: "timer", 4: "netfront"}
UPCALL_VECTOR = 32
DEFAULT_SEED = 1
DEFAULT_EVENTS = 2000

ARCH: dict[str, str] = {"process": "x86_64", "baremetal": "x86_32"}
GDB_ARCH = "i386:x86-64"
"""What gdb needs (``set architecture``, before ``target remote``) for both targets.

QEMU's x86_64 gdbstub sends the 64-bit register file even while the guest runs 32-bit code;
without it gdb fails with "Remote 'g' packet reply is too long". It is also right for the
x86_64 process under gdbserver.
"""

QEMU_EXIT_OK = 1
"""qemu's exit status when the bare-metal guest finishes: isa-debug-exit exits with
``(code << 1) | 1`` and the guest writes 0."""

GUEST_DIR = Path(__file__).with_name("guest")
_COMMON = ("lab.h", "guest.c", "hv.c")
_SOURCES: dict[str, tuple[str, ...]] = {
    "process": (*_COMMON, "plat_process.c"),
    "baremetal": (*_COMMON, "boot.S", "plat_baremetal.c", "link.ld"),
}
# -fno-optimize-sibling-calls: keep every frame (evtchn_block_domain stays in the backtrace of
# a vCPU blocked in hlt instead of being replaced by a tail call).
_CFLAGS: dict[str, tuple[str, ...]] = {
    "process": ("-O2", "-g", "-fno-optimize-sibling-calls", "-std=gnu11", "-Wall", "-Wextra",
                "-fno-pie", "-no-pie"),
    "baremetal": (
        "-m32", "-O2", "-g", "-fno-optimize-sibling-calls", "-std=gnu11", "-Wall", "-Wextra",
        "-ffreestanding", "-fno-pie",
        "-no-pie", "-nostdlib", "-static", "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables", "-mgeneral-regs-only", "-Wl,--build-id=none",
    ),
}
_READY_TIMEOUT = 15.0

#: How the guest declares shared_info and names its probes (see lab.h): the same program
#: written the way each kind of guest is, so every ``--profile`` is tested on its own names.
STYLES: dict[str, tuple[str, ...]] = {
    "lab": (),
    "solo5": ("-DLAB_STYLE_SOLO5",
              "-Devtchn_upcall_handler=solo5__xen_evtchn_vector_handler",
              "-Devtchn_demux_pending=mirage_xen_evtchn_demux_pending",
              "-Devtchn_block_domain=mirage_xen_evtchn_block_domain"),
    "minios": ("-DLAB_STYLE_MINIOS", "-Devtchn_upcall_handler=hypervisor_callback",
               "-Devtchn_demux_pending=do_hypervisor_callback",
               "-Devtchn_block_domain=block_domain"),
}
STYLES["minios-static"] = (*STYLES["minios"], "-DLAB_SHINFO_STATIC")
#: the ``--profile`` that fits each style
STYLE_PROFILE = {"lab": "xreplay-lab", "solo5": "mirage", "minios": "minios",
                 "minios-static": "minios"}


@dataclass(frozen=True)
class GuestBuild:
    """One build of the lab guest: target kind, declaration style, word size, PIE."""

    kind: str = "process"
    style: str = "lab"
    m32: bool = False  # process only: a 32-bit program (the x86_32 ABI)
    pie: bool = False  # process only

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if self.style not in STYLES:
            raise XReplayError(f"unknown lab guest style {self.style!r}: use one of "
                               f"{', '.join(STYLES)}")
        if self.kind == "baremetal" and (self.m32 or self.pie):
            raise XReplayError("the bare-metal lab guest is always 32-bit and not a PIE")

    @property
    def arch(self) -> str:
        return "x86_32" if self.m32 else ARCH[self.kind]

    @property
    def name(self) -> str:
        parts = [self.kind] + ([self.style] if self.style != "lab" else [])
        parts += (["m32"] if self.m32 else []) + (["pie"] if self.pie else [])
        return "-".join(parts)

    def cflags(self) -> tuple[str, ...]:
        flags = list(_CFLAGS[self.kind])
        if self.pie:
            flags = [f for f in flags if f not in ("-fno-pie", "-no-pie")] + ["-fpie", "-pie"]
        if self.m32:
            flags.insert(0, "-m32")
        return (*flags, *STYLES[self.style])


def _check_kind(kind: str) -> None:
    if kind not in GUEST_KINDS:
        raise XReplayError(f"unknown guest kind {kind!r}: use one of {', '.join(GUEST_KINDS)}")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS + FIFO_VARIANTS:
        raise XReplayError(f"unknown lab variant {variant!r}: use one of "
                           f"{', '.join(VARIANTS + FIFO_VARIANTS)}")


def default_cache_dir() -> Path:
    """``$XREPLAY_CACHE/lab``, else ``~/.cache/xreplay/lab``."""
    return cache_root() / "lab"


# -- building -------------------------------------------------------------------------------


def _build(kind: GuestKind | GuestBuild) -> GuestBuild:
    return kind if isinstance(kind, GuestBuild) else GuestBuild(kind)


def compile_command(kind: GuestKind | GuestBuild, out: Path) -> list[str]:
    """The gcc command line that builds ``kind`` into ``out`` (run it in :data:`GUEST_DIR`)."""
    b = _build(kind)
    units = [s for s in _SOURCES[b.kind] if s.endswith((".c", ".S"))]
    cmd = ["gcc", *b.cflags()]
    if b.kind == "baremetal":
        cmd.append("-Wl,-T," + str(GUEST_DIR / "link.ld"))
    cmd += ["-o", str(out), *(str(GUEST_DIR / u) for u in units)]
    if b.kind == "baremetal":
        cmd.append("-lgcc")  # 64-bit division for the virtual clock's printing
    return cmd


def _source_digest(b: GuestBuild) -> str:
    h = hashlib.sha256()
    h.update(b.kind.encode())
    h.update("\0".join(b.cflags()).encode())
    for name in _SOURCES[b.kind]:
        path = GUEST_DIR / name
        if not path.is_file():
            raise XReplayError(f"lab guest source missing: {path} (broken xreplay install?)")
        h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _check_toolchain(b: GuestBuild) -> None:
    if shutil.which("gcc") is None:
        raise XReplayError("gcc not found: install the Debian package gcc (apt-get install gcc)")
    if b.kind == "baremetal" or b.m32:
        # Without multilib, gcc -m32 has no 32-bit libgcc.a to give back.
        res = subprocess.run(["gcc", "-m32", "-print-libgcc-file-name"], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0 or not Path(res.stdout.strip()).is_file():
            raise XReplayError("gcc cannot build 32-bit code: install the Debian package "
                               "gcc-multilib (apt-get install gcc-multilib)")


def build_guest(kind: GuestKind | GuestBuild, cache_dir: Path | None = None) -> Path:
    """Compile the ``kind`` guest (with ``-g``) and return the ELF path.

    The output name carries a hash of the sources and flags, so an unchanged tree is not
    rebuilt and a changed one never reuses a stale binary. The write is atomic (build to a
    temporary name, then rename), so concurrent builders are safe.
    """
    b = _build(kind)
    kind = b.kind  # type: ignore[assignment]
    digest = _source_digest(b)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / f"guest-{b.name}-{digest}.elf"
    if out.is_file():
        return out
    _check_toolchain(b)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".guest-{kind}-", suffix=".tmp", dir=cache)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        res = subprocess.run(compile_command(b, tmp), cwd=GUEST_DIR, capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            err = res.stderr.strip()
            if "xen/foreign" in err:
                raise XReplayError("Xen's public headers are missing: install the Debian "
                                   f"package libxen-dev (apt-get install libxen-dev)\n{err}")
            if (kind == "baremetal" or b.m32) and (
                    "-lgcc" in err or ("32" in err and "cannot find" in err)):
                raise XReplayError("32-bit toolchain incomplete: install the Debian package "
                                   f"gcc-multilib (apt-get install gcc-multilib)\n{err}")
            raise XReplayError(f"building the {b.name} lab guest failed:\n{err}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- running --------------------------------------------------------------------------------


def guest_args(variant: str = "correct", seed: int = DEFAULT_SEED,
               events: int = DEFAULT_EVENTS) -> list[str]:
    """The guest's ``key=value`` arguments (argv for the process, ``-append`` for QEMU)."""
    _check_variant(variant)
    if seed < 0 or not 0 < events <= 100_000_000:
        raise XReplayError(f"bad lab parameters: seed={seed} events={events}")
    return [f"variant={variant}", f"seed={seed}", f"events={events}"]


def gdbserver_command(elf: Path, args: list[str], port: int) -> list[str]:
    """``gdbserver --once`` on 127.0.0.1:port; the guest starts stopped at its entry."""
    return ["gdbserver", "--once", f"127.0.0.1:{port}", str(elf), *args]


def qemu_command(elf: Path, args: list[str], serial: Path, gdb_port: int | None) -> list[str]:
    """qemu-system-x86_64 for the bare-metal guest; with ``gdb_port`` frozen (``-S``) on a stub.

    ``-nodefaults`` leaves COM1 (``-serial``) and isa-debug-exit as the only devices the guest
    talks to.
    """
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "32M", "-nodefaults",
        "-no-user-config", "-display", "none", "-no-reboot", "-serial", f"file:{serial}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    if gdb_port is not None:
        cmd += ["-gdb", f"tcp:127.0.0.1:{gdb_port}", "-S"]
    return [*cmd, "-kernel", str(elf), "-append", " ".join(args)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? (Read from /proc: connecting to QEMU's
    gdbstub would use up its one connection.)"""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            return any(p[1] in want and p[3] == "0A" for p in (ln.split() for ln in f))
    except OSError:
        return False


_SUMMARY = re.compile(r"^(LAB-DONE|LAB-HUNG) (.*)$", re.M)


def parse_summary(output: str) -> dict[str, str] | None:
    """The last ``LAB-DONE``/``LAB-HUNG`` line as a dict (``tag`` plus its key=value fields)."""
    found = _SUMMARY.findall(output)
    if not found:
        return None
    tag, rest = found[-1]
    fields = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    return {"tag": tag, **fields}


@dataclass
class LabGuest:
    """A running lab guest (under a debugger stub or free-running). Stop it with :meth:`stop`
    or use it as a context manager; processes are only ever killed by their own PIDs."""

    kind: GuestKind
    variant: str
    seed: int
    events: int
    elf: Path
    argv: list[str]
    pid: int
    """PID of what was started: gdbserver, qemu, or the guest process itself."""
    output_path: Path
    """The guest's stdout (process) or COM1 serial log (baremetal)."""
    log_path: Path
    """stderr of gdbserver/qemu (or of the process)."""
    address: str | None = None
    """``127.0.0.1:PORT`` of the gdb stub, or None without a debugger."""
    guest_pid: int | None = None
    """The guest process under gdbserver (None for QEMU)."""
    gdb_arch: str = GDB_ARCH
    build: GuestBuild | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _workdir: Path | None = field(default=None, repr=False)
    _final_output: str | None = field(default=None, repr=False)

    @property
    def arch(self) -> str:
        """xreplay arch name of the guest's shared_info: ``x86_64`` or ``x86_32``."""
        return self.build.arch if self.build is not None else ARCH[self.kind]

    def gdb_connect_commands(self) -> list[str]:
        """gdb commands that load symbols and attach to the stub."""
        if self.address is None:
            raise XReplayError("this lab guest was started without a debugger stub")
        return [f"file {self.elf}", f"set architecture {self.gdb_arch}",
                f"target remote {self.address}"]

    def output(self) -> str:
        """Everything the guest printed so far."""
        if self._final_output is not None:
            return self._final_output
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log(self) -> str:
        """What gdbserver/qemu printed on stderr."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def poll(self) -> int | None:
        """Exit status of the started process, or None while it runs."""
        return self._popen.poll() if self._popen is not None else None

    def alive(self) -> bool:
        return self.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the started process to exit; None if it still runs after ``timeout``."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def finished_ok(self) -> bool:
        """Did the guest finish its work and exit cleanly?"""
        ok = QEMU_EXIT_OK if self.kind == "baremetal" else 0
        return self.poll() == ok and "LAB-DONE" in self.output()

    def wait_for_output(self, text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the guest's output; return the output."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if text in out:
                return out
            if self.poll() is not None:
                out = self.output()
                if text in out:
                    return out
                raise XReplayError(f"lab guest exited ({self.poll()}) before printing {text!r}:"
                                   f"\n{out}{self.log()}")
            if time.monotonic() > deadline:
                raise XReplayError(f"lab guest did not print {text!r} within {timeout} s:\n{out}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the guest (by PID), then the stub or emulator (by PID); wait for them."""
        if self.guest_pid is not None and self.guest_pid != self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.guest_pid, 9)
        if self._popen is not None:
            if self._popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, 9)
            self._popen.wait()
        if self._final_output is None:
            self._final_output = self.output()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> LabGuest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _wait_ready(guest: LabGuest, port: int, kind: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if guest.poll() is not None:
            break
        if kind == "process":
            m = re.search(r"created; pid = (\d+)", guest.log())
            if m and "Listening on port" in guest.log():
                guest.guest_pid = int(m.group(1))
                return
        elif _listening(port):
            return
        time.sleep(0.01)
    log = guest.log()
    guest.stop()
    raise XReplayError(f"{'gdbserver' if kind == 'process' else 'qemu'} did not come up on "
                       f"127.0.0.1:{port}:\n{log}")


def start_guest(kind: GuestKind | GuestBuild, variant: str = "correct", *,
                seed: int = DEFAULT_SEED, events: int = DEFAULT_EVENTS, debugger: bool = True,
                port: int | None = None, elf: Path | None = None,
                cache_dir: Path | None = None) -> LabGuest:
    """Build (if needed) and start a lab guest.

    With ``debugger=True`` the guest waits, frozen, for gdb on ``.address``: the process under
    ``gdbserver --once``, the bare-metal guest under ``qemu ... -gdb tcp:... -S``. Without it,
    the process runs directly and QEMU runs without stub and without ``-S``.
    """
    build = _build(kind)
    kind = build.kind  # type: ignore[assignment]
    args = guest_args(variant, seed, events)
    if elf is None:
        elf = build_guest(build, cache_dir)
    tool = "gdbserver" if kind == "process" and debugger else (
        "qemu-system-x86_64" if kind == "baremetal" else None)
    if tool and shutil.which(tool) is None:
        pkg = "gdbserver" if tool == "gdbserver" else "qemu-system-x86"
        raise XReplayError(f"{tool} not found: install the Debian package {pkg}")

    attempts = 3 if debugger and port is None else 1
    for attempt in range(attempts):
        workdir = Path(tempfile.mkdtemp(prefix=f"xreplay-lab-{kind}-"))
        out_path, log_path = workdir / "guest.out", workdir / "launcher.err"
        gdb_port = (port or free_port()) if debugger else None
        if kind == "process":
            argv = gdbserver_command(elf, args, gdb_port) if gdb_port else [str(elf), *args]
        else:
            argv = qemu_command(elf, args, out_path, gdb_port)
        with open(out_path, "wb") as out, open(log_path, "wb") as err:
            # Without a stub the process prints to guest.out itself; gdbserver's inferior
            # inherits its stdout; QEMU writes the serial log to guest.out via -serial file:.
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=out if kind == "process" else err, stderr=err,
                                     start_new_session=True)
        guest = LabGuest(kind=kind, variant=variant, seed=seed, events=events, elf=elf,
                         argv=argv, pid=popen.pid, output_path=out_path, log_path=log_path,
                         address=f"127.0.0.1:{gdb_port}" if gdb_port else None,
                         guest_pid=popen.pid if kind == "process" and not debugger else None,
                         gdb_arch="i386" if build.m32 else GDB_ARCH, build=build,
                         _popen=popen, _workdir=workdir)
        if gdb_port is None:
            return guest
        try:
            _wait_ready(guest, gdb_port, kind)
            return guest
        except XReplayError:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class GuestRun:
    """Outcome of :func:`run_guest`."""

    kind: str
    variant: str
    returncode: int | None
    """Exit status, or None if the guest was still running (hung) and was killed."""
    output: str
    hung: bool
    """The hypervisor model reported LAB-HUNG and the guest was still alive afterwards."""

    @property
    def summary(self) -> dict[str, str] | None:
        return parse_summary(self.output)

    @property
    def finished_ok(self) -> bool:
        ok = QEMU_EXIT_OK if self.kind == "baremetal" else 0
        return self.returncode == ok and "LAB-DONE" in self.output


def run_guest(kind: GuestKind, variant: str = "correct", *, seed: int = DEFAULT_SEED,
              events: int = DEFAULT_EVENTS, timeout: float = 30.0, hang_grace: float = 1.0,
              cache_dir: Path | None = None) -> GuestRun:
    """Run a guest without a debugger until it exits, or until it has reported LAB-HUNG and
    stayed alive for ``hang_grace`` seconds (then it is killed by PID)."""
    guest = start_guest(kind, variant, seed=seed, events=events, debugger=False,
                        cache_dir=cache_dir)
    try:
        deadline = time.monotonic() + timeout
        hung_at: float | None = None
        while time.monotonic() < deadline:
            if guest.wait(0.02) is not None:
                break
            if hung_at is None and "LAB-HUNG" in guest.output():
                hung_at = time.monotonic()
            if hung_at is not None and time.monotonic() - hung_at >= hang_grace:
                break
        rc = guest.poll()
        hung = rc is None and hung_at is not None
    finally:
        guest.stop()
    return GuestRun(kind=kind, variant=variant, returncode=rc, output=guest.output(), hung=hung)
