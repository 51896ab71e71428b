"""The recorder against a real gdbserver and a small target: content, hang, detach, errors.

Every test starts its own gdbserver through ``--launch`` (the recorder stops it by PID) or
by hand (stopped by PID in ``finally``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from xreplay.cli import main
from xreplay.errors import XReplayError
from xreplay.record import Recorder, RecordOptions, WatchSpec
from xreplay.xrr import ProbeSpec, XrrReader

HERE = Path(__file__).parent
pytestmark = pytest.mark.gdbserver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def counter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("counter") / "counter"
    subprocess.run(["gcc", "-O2", "-g", "-no-pie", "-DXEN_HAVE_PV_UPCALL_MASK=1", "-o",
                    str(out), str(HERE / "targets" / "counter.c")], check=True)
    return out


def options(counter: Path, out: Path, *args: str, **kw) -> RecordOptions:
    port = free_port()
    return RecordOptions(
        output=out, target=f"127.0.0.1:{port}",
        launch=["gdbserver", "--once", f"127.0.0.1:{port}", str(counter), *args],
        elf=counter, probes=[ProbeSpec("upcall", "evtchn_upcall_handler", "upcall")],
        watch=[WatchSpec("shadow", "&shadow", 64)], **kw)


def test_every_hit_is_recorded_in_order(counter: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.xrr"
    result = Recorder(options(counter, out, "300", kill_target=True)).run()
    assert result.reason == "target-exited" and result.snapshots == 300
    with XrrReader(out) as r:
        for i, snap in enumerate(r.snapshots()):
            assert snap.index == i and snap.probe == "upcall"
            assert snap.evtchn_pending == i  # word 0 holds the counter
            assert snap.vcpus[0].evtchn_upcall_pending == i & 1
            assert snap.watch["shadow"][i % 64] == i & 0xFF
            assert snap.interrupts_enabled is not None
        assert r.trailer is not None and r.problems == []  # known after a full pass


def test_hang_is_detected_and_snapshotted(counter: Path, tmp_path: Path) -> None:
    out = tmp_path / "h.xrr"
    result = Recorder(options(counter, out, "50", "spin", hang_after=3.0,
                              kill_target=True)).run()
    assert result.reason == "hang" and result.hang_snapshot == 50
    with XrrReader(out) as r:
        last = r.snapshot(50)
        assert last.hang and last.probe == "hang" and last.evtchn_pending == 49


def test_count_then_detach_leaves_the_guest_running(counter: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.xrr"
    marker = tmp_path / "finished"
    opts = options(counter, out, "400", "slow", str(marker), count=20, kill_target=False)
    rec = Recorder(opts)
    result = rec.run()
    assert result.reason == "count" and result.snapshots == 20
    # detached, not killed: the target finishes its 400 iterations by itself
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.read_text() == "done 400\n"
    assert rec.launched is not None and rec.launched.wait(10) == 0


def test_killed_target_leaves_a_readable_file(counter: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.xrr"
    opts = options(counter, out, "100000", "slow", kill_target=True)
    rec = Recorder(opts)
    done: list = []
    t = threading.Thread(target=lambda: done.append(rec.run()))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while rec.sink.count < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.launched is not None
        os.killpg(rec.launched.pid, signal.SIGKILL)  # the target dies mid-recording
        t.join(30)
    finally:
        if rec.launched is not None and rec.launched.alive():
            os.killpg(rec.launched.pid, signal.SIGKILL)
    assert done and done[0].reason in ("target-lost", "target-exited")
    with XrrReader(out) as r:
        snaps = list(r.snapshots())
        assert len(snaps) >= 10
        assert [s.evtchn_pending for s in snaps] == list(range(len(snaps)))


def test_interrupt_request_stops_cleanly(counter: Path, tmp_path: Path) -> None:
    out = tmp_path / "i.xrr"
    rec = Recorder(options(counter, out, "100000", "slow", kill_target=True))

    def stop_once_recording() -> None:
        deadline = time.monotonic() + 60  # set-up is slow on a loaded machine
        while rec.sink.count < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        rec.request_stop()

    threading.Thread(target=stop_once_recording, daemon=True).start()
    result = rec.run()
    assert result.reason == "interrupted" and result.snapshots > 0
    assert result.stopped_at is None  # asked for: nothing to explain
    with XrrReader(out) as r:
        assert len(list(r.records())) == result.snapshots and r.trailer is not None


def test_a_stop_nobody_asked_for_says_where_it_was(counter: Path, tmp_path: Path) -> None:
    """A SIGTRAP outside the probes ends the run as "interrupted"; the result and the end
    note say which signal, where, in which function (through gdbsx: a stray step trap)."""
    out = tmp_path / "t.xrr"
    result = Recorder(options(counter, out, "20", "trap", kill_target=True,
                              hit_loop="agent")).run()
    assert result.reason == "interrupted" and result.snapshots == 20
    assert result.stopped_at is not None and result.stopped_at.startswith("SIGTRAP at 0x")
    with XrrReader(out) as r:
        assert r.trailer is not None and r.trailer["stopped_at"] == result.stopped_at


def test_dead_gdbstub_is_one_clear_error(tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = CliRunner().invoke(main, ["record", "--target", f"127.0.0.1:{free_port()}",
                                    "--upcall", "f", "-o", str(tmp_path / "x.xrr")])
    assert res.exit_code == 2 and "cannot attach to the gdbstub" in res.output
    assert res.output.count("\n") == 1 and time.monotonic() - t0 < 15


def test_missing_symbol_is_one_clear_error(counter: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(["gdbserver", "--once", f"127.0.0.1:{port}", str(counter), "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        res = CliRunner().invoke(main, [
            "record", "--target", f"127.0.0.1:{port}", "--elf", str(counter),
            "--upcall", "no_such_upcall", "-o", str(tmp_path / "x.xrr")])
        assert res.exit_code == 2, res.output
        assert "no_such_upcall" in res.output and res.output.count("\n") == 1
    finally:
        proc.kill()
        proc.wait()


def test_missing_gdb_is_one_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["record", "--target", "127.0.0.1:1", "--upcall", "f",
                                    "--gdb", "/nonexistent/gdb", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not found: install GDB" in res.output


def test_bad_watch_spec() -> None:
    with pytest.raises(XReplayError, match=r"NAME=EXPR\[:LEN\]"):
        WatchSpec.parse("shadow&x")


def test_an_arch_that_contradicts_the_elf_is_one_clear_error(counter: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "w.xrr"
    opts = options(counter, out, "5", arch="x86_32")
    with pytest.raises(XReplayError, match=r"--arch x86_32 contradicts .*ELF64 x86-64, the "
                                           r"x86_64 ABI"):
        Recorder(opts).run()
    assert not out.exists()


def test_arch_comes_from_the_elf(counter: Path, tmp_path: Path) -> None:
    opts = options(counter, tmp_path / "a.xrr", "5", arch=None)
    result = Recorder(opts).run()
    assert result.arch == "x86_64" and result.stub == "gdbserver" and result.snapshots == 5


def test_a_listener_that_is_no_gdbstub_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        res = CliRunner().invoke(main, ["record", "--target", f"127.0.0.1:{port}",
                                        "--upcall", "f", "-o", str(tmp_path / "x.xrr")])
    assert res.exit_code == 2
    assert "no GDB remote-protocol answer" in res.output and res.output.count("\n") == 1
