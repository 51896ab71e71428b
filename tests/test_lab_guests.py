"""The lab guests, built and run for real: symbols, end states, reproducibility, and the hang
state read back through gdb (gdbserver for the process build, QEMU's stub for bare metal).

Every started process is stopped by its own PID in a ``finally``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from xreplay.errors import XReplayError
from xreplay.lab.guests import (
    LAB_DATA_SYMBOLS,
    LAB_PROBES,
    LAB_UNMASK_SYMBOL,
    VARIANTS,
    LabGuest,
    build_guest,
    parse_summary,
    run_guest,
    start_guest,
)

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
needs_gdbserver = pytest.mark.skipif(
    shutil.which("gdb") is None or shutil.which("gdbserver") is None,
    reason="gdb/gdbserver not installed")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86 not installed")

KINDS = [pytest.param("process", marks=[needs_gcc]),
         pytest.param("baremetal", marks=[needs_gcc, needs_qemu, pytest.mark.qemu])]
SHARED_INFO = {"process": ("struct shared_info_x86_64", 3136),
               "baremetal": ("struct shared_info_x86_32", 2344)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lab-cache")


def _nm(elf: Path) -> dict[str, tuple[int, int | None, str]]:
    out = subprocess.run(["nm", "-S", str(elf)], capture_output=True, text=True,
                         check=True).stdout
    syms: dict[str, tuple[int, int | None, str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            syms[parts[3]] = (int(parts[0], 16), int(parts[1], 16), parts[2])
        elif len(parts) == 3:
            syms[parts[2]] = (int(parts[0], 16), None, parts[1])
    return syms


def _gdb_batch(elf: Path, *commands: str) -> str:
    argv = ["gdb", "-batch", "-nx", str(elf)]
    for c in commands:
        argv += ["-ex", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.parametrize("kind", KINDS)
def test_build_symbols_and_layout(kind: str, cache: Path) -> None:
    elf = build_guest(kind, cache)  # type: ignore[arg-type]
    assert elf.read_bytes()[4] == (2 if kind == "process" else 1)  # ELFCLASS64 / ELFCLASS32
    syms = _nm(elf)
    for fn in [*LAB_PROBES.values(), LAB_UNMASK_SYMBOL]:
        assert syms[fn][2] == "T", fn  # global, out of line
    for data in LAB_DATA_SYMBOLS:
        assert syms[data][2] in "BD", data
    addr, size, _ = syms["HYPERVISOR_shared_info"]
    type_name, expected = SHARED_INFO[kind]
    assert addr % 4096 == 0
    assert size == expected
    out = _gdb_batch(elf, "print sizeof(HYPERVISOR_shared_info)",
                     f"print sizeof({type_name})", "ptype evtchn_callback_ml",
                     "print sizeof(lab_dispatch_count[0])")
    assert re.findall(r"\$\d+ = (\d+)", out)[:2] == [str(expected)] * 2
    assert "type = uint8_t [" in out or "type = unsigned char [" in out
    assert re.findall(r"\$\d+ = (\d+)", out)[2] == "4"


@needs_gcc
def test_build_is_cached_by_source_hash(cache: Path, tmp_path: Path) -> None:
    first = build_guest("process", cache)
    mtime = first.stat().st_mtime_ns
    assert build_guest("process", cache) == first
    assert first.stat().st_mtime_ns == mtime
    other = build_guest("process", tmp_path)
    assert other.name == first.name and other.parent == tmp_path


def test_missing_gcc_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no compiler on it
    with pytest.raises(XReplayError, match="Debian package gcc"):
        build_guest("process", tmp_path / "cache")


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (a killed inferior whose parent, gdbserver, was
    killed too waits for init to reap it; some container inits never do)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("kind", KINDS)
def test_launcher_attributes_and_stop_by_pid(kind: str, cache: Path) -> None:
    if kind == "process" and shutil.which("gdbserver") is None:
        pytest.skip("gdbserver not installed")
    with start_guest(kind, "correct", cache_dir=cache) as guest:  # type: ignore[arg-type]
        assert re.fullmatch(r"127\.0\.0\.1:\d+", guest.address or "")
        assert guest.arch == ("x86_64" if kind == "process" else "x86_32")
        assert guest.gdb_arch == "i386:x86-64" and guest.elf.is_file()
        assert guest.alive() and guest.output() == ""  # frozen until a debugger continues
        pids = [p for p in (guest.pid, guest.guest_pid) if p is not None]
    assert all(_gone(p) for p in pids)
    assert not guest.output_path.exists()  # its scratch directory went with it


@pytest.mark.parametrize("kind", KINDS)
def test_correct_finishes(kind: str, cache: Path) -> None:
    run = run_guest(kind, "correct", seed=1, events=2000, timeout=30,  # type: ignore[arg-type]
                    cache_dir=cache)
    assert run.finished_ok, run.output
    summary = parse_summary(run.output)
    assert summary is not None and summary["tag"] == "LAB-DONE"
    assert summary["handled"] == "2000" and summary["outstanding"] == "1:0,3:0,4:0"
    assert run.output.startswith("LAB-START variant=correct seed=1 events=2000")


@pytest.mark.parametrize("kind", KINDS)
def test_lost_upcall_hangs(kind: str, cache: Path) -> None:
    run = run_guest(kind, "lost-upcall", seed=1, timeout=30, hang_grace=2.0,  # type: ignore[arg-type]
                    cache_dir=cache)
    assert run.hung and run.returncode is None, run.output
    assert "LAB-DONE" not in run.output
    summary = parse_summary(run.output)
    assert summary is not None and summary["tag"] == "LAB-HUNG"
    assert 100 <= int(summary["upcalls"]) < 400  # within a few hundred upcalls
    assert "(XEN)        1 [1/0/1]" in run.output and "(XEN)        4 [1/0/1]" in run.output


@needs_gcc
def test_reproducible_from_seed(cache: Path) -> None:
    runs = [run_guest("process", v, seed=s, timeout=20, hang_grace=0.2, cache_dir=cache)
            for v, s in [("lost-upcall", 7), ("lost-upcall", 7), ("lost-upcall", 8)]]
    assert runs[0].output == runs[1].output
    assert runs[0].output != runs[2].output


@needs_gcc
@needs_qemu
@pytest.mark.qemu
def test_same_seed_same_run_on_both_builds(cache: Path) -> None:
    """The bare-metal guest's real interrupts give the run the process build models."""
    for variant in ("correct", "ffs-off-by-one"):
        a, b = (run_guest(k, variant, seed=3, events=1500, timeout=30, hang_grace=0.2,
                          cache_dir=cache) for k in ("process", "baremetal"))
        assert a.output.replace("arch=x86_64", "arch=x86_32") == b.output


# -- gdb against hung guests --------------------------------------------------------------

STATE = [
    ('upcall_pending=%d\\n', "HYPERVISOR_shared_info.vcpu_info[0].evtchn_upcall_pending"),
    ("sel=%llu\\n", "(unsigned long long)HYPERVISOR_shared_info.vcpu_info[0].evtchn_pending_sel"),
    ("pending=%llu\\n", "(unsigned long long)HYPERVISOR_shared_info.evtchn_pending[0]"),
    ("mask=%llu\\n", "(unsigned long long)HYPERVISOR_shared_info.evtchn_mask[0]"),
    ("ml4=%d\\n", "evtchn_callback_ml[4]"),
    ("ml5=%d\\n", "evtchn_callback_ml[5]"),
    ("disp5=%u\\n", "lab_dispatch_count[5]"),
    ("owed4=%u\\n", "lab_backend_prod[4] - lab_guest_cons[4]"),
    ("upcalls=%u\\n", "lab_upcall_count"),
]


def _hang_state_via_gdb(guest: LabGuest, extra: tuple[str, ...] = ()) -> tuple[dict[str, int],
                                                                               str]:
    """Attach gdb, let the guest run until the hypervisor model reports LAB-HUNG, interrupt
    it, and read the state. Returns the printed values and gdb's whole output."""
    after = [f'printf "{fmt}", {expr}' for fmt, expr in STATE]
    argv = ["gdb", "-batch", "-nx", "-ex", "set pagination off"]
    for c in [*guest.gdb_connect_commands(), "continue", "bt 8", *after, *extra]:
        argv += ["-ex", c]
    gdb = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        guest.wait_for_output("LAB-HUNG", timeout=30)
        time.sleep(0.5)
        assert guest.alive() and gdb.poll() is None  # blocked, not exited
        os.kill(gdb.pid, signal.SIGINT)  # gdb interrupts the target through the stub
        out, _ = gdb.communicate(timeout=30)
    finally:
        if gdb.poll() is None:
            os.kill(gdb.pid, signal.SIGKILL)
            gdb.wait()
    values = {k: int(v) for k, v in re.findall(r"^(\w+)=(\d+)$", out, re.M)}
    assert set(values) == {fmt.split("=")[0] for fmt, _ in STATE}, out
    return values, out


def _bit(word: int, port: int) -> bool:
    return bool(word >> port & 1)


@needs_gcc
@needs_gdbserver
@pytest.mark.gdbserver
def test_gdb_reads_lost_upcall_hang(cache: Path) -> None:
    guest = start_guest("process", "lost-upcall", seed=1, cache_dir=cache)
    try:
        v, out = _hang_state_via_gdb(guest)
    finally:
        guest.stop()
    assert "evtchn_block_domain" in out  # stopped while blocked in the sleep point
    assert v["upcall_pending"] == 1
    assert _bit(v["sel"], 0)  # ports 1-4 live in selector word 0
    for port in (1, 3, 4):  # [1/0/1]: pending, unmasked, selector bit set
        assert _bit(v["pending"], port) and not _bit(v["mask"], port), port
    assert _bit(v["pending"], 2) and _bit(v["mask"], 2)  # console [1/1/1]
    assert v["upcalls"] == int(parse_summary(guest.output())["upcalls"])  # type: ignore[index]


@needs_gcc
@needs_gdbserver
@pytest.mark.gdbserver
def test_gdb_reads_stranded_port(cache: Path) -> None:
    guest = start_guest("process", "unmask-no-reraise", seed=1, cache_dir=cache)
    try:
        v, _ = _hang_state_via_gdb(guest)
    finally:
        guest.stop()
    # netfront stranded: pending, unmasked, selector bit clear, no upcall; items owed.
    assert _bit(v["pending"], 4) and not _bit(v["mask"], 4)
    assert v["sel"] == 0 and v["upcall_pending"] == 0
    assert v["owed4"] > 0


@needs_gcc
@needs_gdbserver
@pytest.mark.gdbserver
def test_gdb_reads_ffs_lost_pending(cache: Path) -> None:
    guest = start_guest("process", "ffs-off-by-one", seed=1, cache_dir=cache)
    try:
        v, _ = _hang_state_via_gdb(guest)
    finally:
        guest.stop()
    # Port 4 was demuxed in a pass after port 1: its pending bit cleared and its mask set,
    # but the shadow mark went to the unbound port 5. Nobody unmasks 4 again.
    assert v["ml5"] == 1 and v["disp5"] == 0 and v["ml4"] == 0
    assert _bit(v["mask"], 4) and v["owed4"] > 0
    assert v["upcall_pending"] == 0


@needs_gcc
@needs_qemu
@needs_gdbserver
@pytest.mark.qemu
def test_gdb_reads_lost_upcall_hang_on_qemu(cache: Path) -> None:
    guest = start_guest("baremetal", "lost-upcall", seed=1, cache_dir=cache)
    try:
        v, out = _hang_state_via_gdb(guest, ("x/i $pc - 1",))
    finally:
        guest.stop()
    assert re.search(r":\s+hlt\b", out), out  # halted: the instruction before $pc is hlt
    assert v["upcall_pending"] == 1 and _bit(v["sel"], 0)
    for port in (1, 3, 4):
        assert _bit(v["pending"], port) and not _bit(v["mask"], port), port


def test_variants_and_probe_names() -> None:
    assert VARIANTS == ("correct", "lost-upcall", "unmask-no-reraise", "ffs-off-by-one")
    assert LAB_PROBES == {"upcall": "evtchn_upcall_handler",
                          "bottom-half": "evtchn_demux_pending",
                          "block": "evtchn_block_domain"}
