"""Boot Xen 4.17 + PV dom0 + a PV/PVH Linux domU under QEMU TCG, with QEMU's gdbstub.

QEMU's gdbstub is a whole-machine stub: a breakpoint on a kernel address fires in
whichever domain runs it (tell them apart by ``xen_start_flags`` & SIF_INITDOMAIN, by
``cr3``, or by the shared_info machine address in ``xen_start_info``). dom0 is reached from
the host through a small command server (busybox ``nc`` in dom0, QEMU user-net hostfwd to
a free host port), so command output never mixes with Xen's serial log.

dom0 commands need the machine running: while gdb holds it stopped at a breakpoint, dom0
cannot answer and :meth:`Lab.dom0` times out.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from xreplay.errors import XReplayError
from xreplay.lab.xen.initramfs import DOM0_CMD_PORT, EVTCHN_ABIS, build_images
from xreplay.lab.xen.stage import Progress, Stage, default_cache_dir, quiet
from xreplay.profiles.linux import read_system_map

STATE_FILE = "lab.json"
#: ``smap=0``: without it Debian's Xen 4.17 under QEMU 7.2 TCG crashes PV dom0 on its first
#: exception (fault in create_bounce_frame). A larger console ring keeps 'e' dumps whole.
XEN_ARGS = (
    "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 "
    "loglvl=all guest_loglvl=all noreboot smap=0 conring_size=256k"
)
#: ``xen.fifo_events=0``: Linux 6.1 would otherwise use the FIFO ABI, not the 2-level one.
DOM0_ARGS = "console=hvc0 earlyprintk=xen ignore_loglevel xen.fifo_events=0"
DOMU_KINDS = ("pv", "pvh", "none")
#: The gdbstubs a lab can offer: QEMU's whole-machine stub (always there), and Xen's
#: per-domain gdbsx in dom0 (needs the hypervisor rebuilt with CONFIG_GDBSX, see
#: :mod:`.hypervisor`; QEMU's stub stays available next to it).
STUB_KINDS = ("qemu", "gdbsx")
#: QEMU TCG threading (``-accel tcg,thread=...``): one host thread per vCPU, or one in all.
TCG_THREADS = ("multi", "single")
#: The scheduler the gdbsx lab boots Xen with (see ``Lab.__init__``).
GDBSX_SCHED = "sched=credit"
#: Where gdbsx listens inside dom0 (the host reaches it by a second hostfwd).
GDBSX_DOM0_PORT = 9999
#: The domU's vCPUs may outnumber QEMU's CPUs (Xen time-slices them), but every extra one
#: slows TCG down; 8 is plenty for event-channel work and keeps a typo from booting 64.
MAX_DOMU_VCPUS = 8
#: Serial-log lines that mean the boot cannot succeed.
FATAL_PATTERNS = (
    "XREPLAY-DOMU-FAILED",
    "XREPLAY-ERROR",
    "Panic on CPU",
    "Hardware Dom0 crashed",
    "Kernel panic",
)
#: Symbols whose absence means the map is not a usable Xen PV Linux map.
REQUIRED_SYMBOLS = ("HYPERVISOR_shared_info", "xen_start_flags", "evtchn_2l_handle_events")
SIF_INITDOMAIN = 0x2  # xen/include/public/xen.h: start_info.flags bit of the initial domain
_RC_MARK = "\n__XREPLAY_RC__ "
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")



def default_run_dir() -> Path:
    """``$XREPLAY_LAB_DIR``, else ``<cache>/run``: where ``lab up/exec/down`` meet."""
    env = os.environ.get("XREPLAY_LAB_DIR")
    return Path(env) if env else default_cache_dir() / "run"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (QEMU binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists": treat it as gone
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_lab_qemu(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is the QEMU of this run dir (guards against a reused PID)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return bool(cmd) and b"qemu-system" in cmd[0] and cwd == run_dir.resolve()


def stop_pid(pid: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM ``pid`` (QEMU exits cleanly on it), wait, then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.1)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)


def is_dom0(start_flags: int) -> bool:
    """Whether ``xen_start_flags`` read at a breakpoint is dom0's (SIF_INITDOMAIN set).

    Measured: dom0 ``0x30b``, PV domU ``0x8``.
    """
    return bool(start_flags & SIF_INITDOMAIN)


def kallsyms_to_system_map(text: str) -> str:
    """Keep the core-kernel symbols of ``/proc/kallsyms``, sorted by address, System.map style.

    Module symbols are dropped: modules load at different addresses in dom0 and the domU,
    while the core kernel (PV Linux has no KASLR) sits at the same addresses in both.
    """
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and len(parts[0]) == 16:
            rows.append((int(parts[0], 16), parts[1], parts[2]))
    if not rows or all(addr == 0 for addr, _, _ in rows):
        raise XReplayError("dom0's /proc/kallsyms shows no addresses (kptr_restrict?)")
    rows.sort()
    return "".join(f"{addr:016x} {kind} {name}\n" for addr, kind, name in rows)


@dataclass
class LabState:
    """What separate ``xreplay lab`` invocations need to find and drive a running lab."""

    run_dir: str
    pid: int
    gdb_port: int
    cmd_port: int
    domu: str
    kver: str
    serial_log: str
    serial_socket: str
    monitor_socket: str
    qemu_log: str
    symbol_map: str | None = None
    domid: int | None = None
    domu_vcpus: int = 1  # the default keeps state files of older labs loadable
    domu_evtchn: str = "2l"  # the domU's event-channel ABI: 2l or fifo (lab up --evtchn)
    started_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    stub: str = "qemu"  # "gdbsx": Xen built with gdbsx, gdbsx reachable on gdbsx_port
    gdbsx_port: int | None = None
    xen_image: str | None = None
    gdbsx_binary: str | None = None  # host path of the project's gdbsx, put into dom0
    domu_busy: bool = False  # the domU spins a busy loop (lab up --domu-busy)

    def save(self) -> None:
        path = Path(self.run_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, run_dir: Path) -> LabState:
        path = Path(run_dir) / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise XReplayError(f"no lab in {run_dir}: start one with `xreplay lab up`") from exc
        except (ValueError, TypeError) as exc:
            raise XReplayError(f"unreadable lab state {path}: {exc}") from exc


class Lab:
    """A running Xen lab: QEMU PID, gdbstub address, dom0 shell, the guest kernel's symbols.

    Use as a context manager (``with Lab() as lab:``) so QEMU is stopped even on errors, or
    call :meth:`start` / :meth:`stop`; :meth:`attach` drives a lab started by another process.
    """

    def __init__(
        self,
        run_dir: Path | None = None,
        *,
        cache_dir: Path | None = None,
        domu: str = "pv",
        domu_vcpus: int = 1,
        evtchn: str = "2l",
        smp: int = 2,
        memory_mb: int = 2048,
        boot_timeout: float = 300.0,
        xen_args: str = XEN_ARGS,
        dom0_args: str = DOM0_ARGS,
        progress: Progress = quiet,
        stub: str = "qemu",
        domu_busy: bool = False,
        tcg_thread: str = "multi",
    ) -> None:
        if stub not in STUB_KINDS:
            raise XReplayError(f"unknown stub {stub!r}: use one of {', '.join(STUB_KINDS)}")
        if domu not in DOMU_KINDS:
            raise XReplayError(f"unknown domU type {domu!r}: use one of {', '.join(DOMU_KINDS)}")
        if not 1 <= domu_vcpus <= MAX_DOMU_VCPUS:
            raise XReplayError(f"domU vCPUs must be 1..{MAX_DOMU_VCPUS}, not {domu_vcpus}")
        if tcg_thread not in TCG_THREADS:
            raise XReplayError(f"unknown TCG threading {tcg_thread!r}: use one of "
                               f"{', '.join(TCG_THREADS)}")
        # "single": QEMU runs all of Xen's pCPUs in one host thread. Measured with the lab
        # unikernel through gdbsx (tests/test_xenlab_pvh_gdbsx.py): multi-threaded TCG gave
        # 4 triple faults right after a detach in 3 of 4 module runs (QEMU's walk of the
        # guest's page tables found its present IDT page not present), single-threaded
        # none in 4 (README, Limits)
        self.tcg_thread = tcg_thread
        if evtchn not in EVTCHN_ABIS:
            raise XReplayError(f"unknown event-channel ABI {evtchn!r}: use 2l or fifo")
        self.evtchn = evtchn
        self.run_dir = Path(run_dir) if run_dir else default_run_dir()
        self.cache_dir = cache_dir
        self.domu = domu
        self.domu_vcpus = domu_vcpus
        self.smp = smp
        self.memory_mb = memory_mb
        self.boot_timeout = boot_timeout
        if stub == "gdbsx" and "sched=" not in xen_args:
            # Xen's default credit2 scheduler lost a wakeup in the gdbsx lab: with a 2-vCPU
            # PVH domU paused and unpaused at every hit, dom0's vCPU sat runnable in the
            # run queue while both pCPUs idled, untickled ('r' key), and recording and
            # dom0 stopped (3 of 4 runs, 2026-11). Under credit (credit1) 6 of 6 runs of
            # 400 snapshots completed.
            xen_args = f"{xen_args} {GDBSX_SCHED}"
        self.xen_args = xen_args
        self.dom0_args = dom0_args
        self.progress = progress
        self.stub = stub
        self.domu_busy = domu_busy
        self._gdbsx_port: int | None = None
        self._gdbsx_binary: Path | None = None
        self.state: LabState | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._symbols: dict[str, int] | None = None

    # ------------------------------------------------------------------ properties
    def _st(self) -> LabState:
        if self.state is None:
            raise XReplayError("the lab is not running: call start() or use `with Lab() as lab`")
        return self.state

    @property
    def pid(self) -> int:
        """QEMU's PID (stop it with :meth:`stop`, or ``kill PID``)."""
        return self._st().pid

    @property
    def gdb_address(self) -> str:
        """``127.0.0.1:PORT`` of QEMU's gdbstub, for gdb's ``target remote``."""
        return f"127.0.0.1:{self._st().gdb_port}"

    @property
    def gdb_port(self) -> int:
        return self._st().gdb_port

    @property
    def gdbsx_address(self) -> str:
        """``127.0.0.1:PORT`` forwarded to gdbsx in dom0 (a lab booted with stub="gdbsx").

        Nothing listens there until :func:`xreplay.lab.xen.gdbsx.start_gdbsx` starts one
        gdbsx for one gdb session (it exits when gdb detaches).
        """
        st = self._st()
        if st.stub != "gdbsx" or st.gdbsx_port is None:
            raise XReplayError("this lab has no gdbsx: boot it with `xreplay lab up --stub gdbsx`")
        return f"127.0.0.1:{st.gdbsx_port}"

    @property
    def serial_log(self) -> Path:
        """Xen's serial console (Xen, dom0 kernel and XREPLAY- progress lines)."""
        return Path(self._st().serial_log)

    @property
    def domid(self) -> int | None:
        """Domain id of the lab's domU (``None`` when booted with ``domu="none"``)."""
        return self._st().domid

    @property
    def vcpus(self) -> list[int]:
        """The domU's vCPU ids (``0..domu_vcpus-1``; Linux brings them all online at boot)."""
        return list(range(self._st().domu_vcpus))

    @property
    def symbol_map(self) -> Path:
        """System.map-style file of the guest kernel, read from dom0's ``/proc/kallsyms``.

        PV Linux has no KASLR, so the same addresses hold in the domU (same kernel image).
        """
        st = self._st()
        if st.symbol_map is None:
            raise XReplayError("the lab has no symbol map yet (boot did not finish)")
        return Path(st.symbol_map)

    @property
    def symbols(self) -> dict[str, int]:
        """``name -> address`` of :attr:`symbol_map`."""
        if self._symbols is None:
            self._symbols = read_system_map(self.symbol_map)
        return self._symbols

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise XReplayError(f"symbol {name} not in {self.symbol_map}") from None

    @property
    def timings(self) -> dict[str, float]:
        """Seconds from QEMU start to each milestone (``dom0_ready``, ``domu_up``...)."""
        return dict(self._st().timings)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def attach(cls, run_dir: Path | None = None) -> Lab:
        """The lab another process started in ``run_dir`` (error when it is not running)."""
        run_dir = Path(run_dir) if run_dir else default_run_dir()
        state = LabState.load(run_dir)
        if not (pid_alive(state.pid) and is_lab_qemu(state.pid, run_dir)):
            raise XReplayError(
                f"the lab in {run_dir} is not running (QEMU pid {state.pid} is gone): "
                "`xreplay lab up` starts one"
            )
        lab = cls(run_dir, domu=state.domu, domu_vcpus=state.domu_vcpus,
                  evtchn=state.domu_evtchn, stub=state.stub)
        lab.state = state
        return lab

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Lab:
        """Boot and wait until dom0 answers and the domU is up; QEMU is stopped on failure."""
        self._check_not_running()
        stage = Stage.load(self.cache_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress("building initramfs images")
        dom0_img, _ = build_images(stage)
        xen_image = stage.xen_image
        if self.stub == "gdbsx":
            from xreplay.lab.xen.hypervisor import ensure

            xen_image = ensure(stage, progress=self.progress).image
            self._gdbsx_binary = self._own_gdbsx(stage)
        for name, target in (("xen", xen_image), ("vmlinuz", stage.vmlinuz),
                             ("dom0.cpio.gz", dom0_img)):
            link = self.run_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        for stale in ("serial.log", "serial.sock", "monitor.sock", "System.map", STATE_FILE):
            (self.run_dir / stale).unlink(missing_ok=True)
        try:
            self._launch(stage)
            self._boot()
        except BaseException:
            self.stop()
            raise
        return self

    def _own_gdbsx(self, stage: Stage) -> Path | None:
        """The project's faster gdbsx (:mod:`.gdbsx_build`); None (Debian's gdbsx is used)
        when it cannot be built, which is said, not fatal."""
        from xreplay.lab.xen.gdbsx_build import ensure as ensure_gdbsx

        try:
            return ensure_gdbsx(stage, progress=self.progress).binary
        except XReplayError as exc:
            self.progress(f"the project's gdbsx could not be built ({exc}): "
                          "Debian's gdbsx will be used")
            return None

    def _check_not_running(self) -> None:
        try:
            old = LabState.load(self.run_dir)
        except XReplayError:
            return
        if pid_alive(old.pid) and is_lab_qemu(old.pid, self.run_dir):
            raise XReplayError(
                f"a lab is already running in {self.run_dir} (QEMU pid {old.pid}): "
                "`xreplay lab down` stops it"
            )

    def qemu_command(self, gdb_port: int, cmd_port: int) -> list[str]:
        """QEMU's command line; paths are relative to the run dir (QEMU's cwd), which keeps
        unix socket paths short and the multiboot module string free of commas."""
        dom0_args = (f"{self.dom0_args} xreplay.domu={self.domu} "
                     f"xreplay.domu_vcpus={self.domu_vcpus} xreplay.domu_evtchn={self.evtchn}"
                     + (" xreplay.domu_busy=1" if self.domu_busy else ""))
        return [
            "qemu-system-x86_64",
            "-accel", f"tcg,thread={self.tcg_thread}", "-cpu", "max", "-machine", "q35",
            "-smp", str(self.smp), "-m", str(self.memory_mb),
            "-display", "none", "-no-reboot",
            "-chardev", "socket,id=ser0,path=serial.sock,server=on,wait=off,logfile=serial.log",
            "-serial", "chardev:ser0",
            "-monitor", "unix:monitor.sock,server=on,wait=off",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{cmd_port}-:{DOM0_CMD_PORT}"
            + (f",hostfwd=tcp:127.0.0.1:{self._gdbsx_port}-:{GDBSX_DOM0_PORT}"
               if self._gdbsx_port else ""),
            "-device", "e1000,netdev=n0",
            "-gdb", f"tcp:127.0.0.1:{gdb_port}",
            "-kernel", "xen", "-append", self.xen_args,
            "-initrd", f"vmlinuz {dom0_args},dom0.cpio.gz",
        ]

    def _launch(self, stage: Stage) -> None:
        if shutil.which("qemu-system-x86_64") is None:
            raise XReplayError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
        qemu_log = self.run_dir / "qemu.log"
        for attempt in range(3):
            gdb_port, cmd_port = free_port(), free_port()
            while cmd_port == gdb_port:
                cmd_port = free_port()
            if self.stub == "gdbsx":
                self._gdbsx_port = free_port()
                while self._gdbsx_port in (gdb_port, cmd_port):
                    self._gdbsx_port = free_port()
            with open(qemu_log, "wb") as log:
                proc = subprocess.Popen(
                    self.qemu_command(gdb_port, cmd_port), cwd=self.run_dir,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # survives the CLI that started it (`lab up`)
                )
            started = time.time()
            time.sleep(0.5)
            if proc.poll() is None:
                break
            err = qemu_log.read_text(errors="replace").strip()
            if attempt < 2 and ("in use" in err or "host forwarding" in err or "bind" in err):
                continue  # a port was taken between free_port() and QEMU's bind: retry
            last = err.splitlines()[-1] if err else "no output"
            raise XReplayError(f"QEMU exited at once: {last} (see {qemu_log})")
        self._proc = proc
        self.state = LabState(
            run_dir=str(self.run_dir.resolve()), pid=proc.pid, gdb_port=gdb_port,
            cmd_port=cmd_port, domu=self.domu, kver=stage.kver, domu_vcpus=self.domu_vcpus,
            domu_evtchn=self.evtchn,
            serial_log=str((self.run_dir / "serial.log").resolve()),
            serial_socket=str((self.run_dir / "serial.sock").resolve()),
            monitor_socket=str((self.run_dir / "monitor.sock").resolve()),
            qemu_log=str(qemu_log.resolve()), started_at=started,
            stub=self.stub, gdbsx_port=self._gdbsx_port,
            gdbsx_binary=str(self._gdbsx_binary) if self._gdbsx_binary else None,
            xen_image=str((self.run_dir / "xen").resolve()),
            domu_busy=self.domu_busy,
        )
        self.state.save()
        self.progress(f"QEMU pid {proc.pid}, gdbstub 127.0.0.1:{gdb_port}, "
                      f"dom0 commands via 127.0.0.1:{cmd_port}"
                      + (f", gdbsx via 127.0.0.1:{self._gdbsx_port}" if self._gdbsx_port else ""))

    def _boot(self) -> None:
        st = self._st()
        deadline = st.started_at + self.boot_timeout
        self._wait_marker("XREPLAY-DOM0-READY", deadline, "dom0_ready")
        self._wait_dom0(deadline)
        if self.domu != "none":
            line = self._wait_marker("XREPLAY-DOMU-UP", deadline, "domu_up")
            m = re.search(r"domid=(\d+)", line)
            st.domid = int(m.group(1)) if m else None
            # xl list's VCPUs column counts the *online* ones: a guest that failed to bring
            # a secondary vCPU up (VCPUOP_up) would otherwise be recorded as if it had
            m = re.search(r"vcpus=(\d+)", line)
            if m is None or int(m.group(1)) != self.domu_vcpus:
                raise XReplayError(
                    f"the domU has {m.group(1) if m else '?'} of {self.domu_vcpus} vCPUs "
                    f"online: {line} (see {st.serial_log})")
        self._fetch_symbol_map(st)
        st.timings["ready"] = round(time.time() - st.started_at, 1)
        st.save()

    def _wait_marker(self, marker: str, deadline: float, key: str) -> str:
        """Wait for a serial-log line containing ``marker``; fail fast on fatal lines."""
        st = self._st()
        log = Path(st.serial_log)
        while True:
            try:
                text = log.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                if marker in line:
                    st.timings[key] = round(time.time() - st.started_at, 1)
                    st.save()
                    self.progress(f"{key} after {st.timings[key]:.1f} s")
                    return line.strip()
            for line in text.splitlines():
                if any(p in line for p in FATAL_PATTERNS):
                    raise XReplayError(f"lab boot failed: {line.strip()} (see {log})")
            if not self._alive():
                qlog = Path(st.qemu_log).read_text(errors="replace").strip().splitlines()
                raise XReplayError(
                    f"QEMU exited while waiting for {marker}: "
                    f"{qlog[-1] if qlog else 'no output'} (see {log})"
                )
            if time.time() > deadline:
                raise XReplayError(
                    f"timed out waiting for {marker} after {time.time() - st.started_at:.0f} s "
                    f"(see {log})"
                )
            time.sleep(0.25)

    def _wait_dom0(self, deadline: float) -> None:
        """Wait until the command server answers (slirp accepts before dom0 listens)."""
        last = ""
        while time.time() < deadline:
            try:
                rc, out = self.dom0_run("echo xreplay-ok", timeout=10)
                if rc == 0 and "xreplay-ok" in out:
                    return
                last = out.strip()
            except XReplayError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise XReplayError(f"dom0's command server did not answer: {last}")

    def _fetch_symbol_map(self, st: LabState) -> None:
        """Save dom0's ``/proc/kallsyms`` (core kernel only) as ``System.map`` in the run dir."""
        t0 = time.monotonic()
        rc, text = self.dom0_run("grep -v '\\[' /proc/kallsyms", timeout=120)
        if rc != 0:
            raise XReplayError(f"reading dom0's /proc/kallsyms failed (rc={rc})")
        path = self.run_dir / "System.map"
        path.write_text(kallsyms_to_system_map(text))
        syms = read_system_map(path)
        missing = [s for s in REQUIRED_SYMBOLS if s not in syms]
        if missing:
            raise XReplayError(f"symbol map {path} lacks {', '.join(missing)}")
        st.symbol_map = str(path.resolve())
        self._symbols = syms
        self.progress(f"symbol map {path} ({len(syms)} symbols, {time.monotonic() - t0:.1f} s)")

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.state is not None and pid_alive(self.state.pid)

    def running(self) -> bool:
        """Whether this lab's QEMU is still running."""
        return self.state is not None and self._alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop QEMU by PID (SIGTERM, wait, SIGKILL) and remove the run dir's state file."""
        st = self.state
        if st is None:
            return
        run_dir = Path(st.run_dir)
        if self._proc is not None:
            stop_pid(self._proc.pid, timeout, self._proc)
        elif pid_alive(st.pid) and is_lab_qemu(st.pid, run_dir):
            stop_pid(st.pid, timeout)
        self._proc = None
        with contextlib.suppress(FileNotFoundError):
            (run_dir / STATE_FILE).unlink()
        self.state = None

    # ------------------------------------------------------------------ dom0
    def dom0_run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run a shell command in dom0; ``(exit code, stdout+stderr)``.

        The machine must be running: while gdb has it stopped, this times out.
        """
        st = self._st()
        secs = max(1, int(timeout))
        payload = f"{secs} {base64.b64encode(cmd.encode()).decode()}\n".encode()
        deadline = time.monotonic() + secs + 10
        chunks: list[bytes] = []
        try:
            with socket.create_connection(("127.0.0.1", st.cmd_port), timeout=10) as sock:
                sock.sendall(payload)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                    data = sock.recv(1 << 16)
                    if not data:
                        break
                    chunks.append(data)
        except TimeoutError:
            raise XReplayError(
                f"dom0 did not answer {cmd!r} within {secs + 10} s "
                "(dom0 commands need the machine running, not stopped in gdb)"
            ) from None
        except OSError as exc:
            raise XReplayError(f"cannot reach dom0 on 127.0.0.1:{st.cmd_port}: {exc}") from exc
        text = b"".join(chunks).decode(errors="replace")
        out, sep, rc = text.rpartition(_RC_MARK)
        if not sep:
            raise XReplayError(f"dom0 closed the connection without an exit code for {cmd!r}"
                               + (f": {text.strip()[-200:]}" if text.strip() else ""))
        return int(rc.split()[0]), out

    def dom0(self, cmd: str, timeout: float = 60.0, *, check: bool = True) -> str:
        """Output of a shell command run in dom0 (e.g. ``xl list``, ``lsevtchn 1``).

        With ``check`` a non-zero exit raises :class:`XReplayError`.
        """
        rc, out = self.dom0_run(cmd, timeout)
        if check and rc != 0:
            tail = out.strip().splitlines()[-1:] or ["no output"]
            raise XReplayError(f"dom0 command {cmd!r} failed (rc={rc}): {tail[0]}")
        return out

    def put(self, local: Path, dom0_path: str, mode: int = 0o644,
            chunk: int = 48 * 1024) -> None:
        """Copy a host file into dom0 (base64 through the command server, in chunks so no
        request line grows large; a file already there with the same MD5 is kept). The
        copy is renamed into place, so a running program of that name is not in the way."""
        data = Path(local).read_bytes()
        md5 = hashlib.md5(data).hexdigest()
        have = self.dom0(f"md5sum {dom0_path} 2>/dev/null; true", timeout=30).split()
        if have[:1] == [md5]:
            self.dom0(f"chmod {mode:o} {dom0_path}", timeout=30)
            return
        tmp = f"{dom0_path}.xreplay-tmp"
        self.dom0(f": > {tmp}.b64", timeout=30)
        encoded = base64.b64encode(data).decode()
        for i in range(0, len(encoded), chunk):
            self.dom0(f"printf %s '{encoded[i:i + chunk]}' >> {tmp}.b64", timeout=60)
        out = self.dom0(f"base64 -d {tmp}.b64 > {tmp} && rm -f {tmp}.b64 && chmod {mode:o} "
                        f"{tmp} && mv -f {tmp} {dom0_path} && md5sum {dom0_path}", timeout=60)
        if out.split()[:1] != [md5]:
            raise XReplayError(f"copying {local} to dom0:{dom0_path} failed: {out.strip()}")

    def domu_console(self) -> str:
        """The domU's console so far, as xenconsoled logged it in dom0."""
        return self.dom0("cat /var/log/xen/guest-domu.log", timeout=30)
