"""``xreplay record`` is safe to run again: bad outputs refused first, failures explained,
a full disk stops the run cleanly with every complete snapshot kept, Ctrl-C on a hung
guest still takes the hang snapshot.  Real gdbserver and the lab guest; no mocks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from xreplay.cli import main
from xreplay.lab.guests import GuestBuild, build_guest, free_port, start_guest
from xreplay.record import EXIT_CODES, EndReason, Recorder
from xreplay.record.build import RecordChoices, build_options
from xreplay.replay import replay
from xreplay.xrr import XrrReader

pytestmark = pytest.mark.gdbserver


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1, res.output
    for n in needles:
        assert n in res.output, res.output


@pytest.mark.parametrize("output,needle", [
    ("/nonexistent-dir/x.xrr", "does not exist"),
    ("/proc/xreplay.xrr", "cannot create files in /proc"),
    ("-", "a recording is a binary file"),
])
def test_unwritable_output_is_refused_before_anything_is_launched(tmp_path: Path, output: str,
                                                                  needle: str) -> None:
    marker = tmp_path / "launched"
    res = cli("record", "--launch", f"touch {marker}", "--target", "127.0.0.1:1",
              "--upcall", "f", "-o", output)
    one_line_error(res, needle)
    assert not marker.exists()


def test_export_to_an_unwritable_path_is_one_line(tmp_path: Path) -> None:
    rec = Path(__file__).parent.parent / "recordings" / "correct-process.xrr"
    one_line_error(cli("export", str(rec), "-o", "/nonexistent-dir/x.vcd"), "does not exist")


def test_a_stub_that_fails_to_start_is_explained_with_its_own_words(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "x.xrr"
    res = cli("record", "--launch", f"gdbserver --once 127.0.0.1:{port} /nonexistent/guest",
              "--target", f"127.0.0.1:{port}", "--upcall", "f", "-o", str(out))
    one_line_error(res, "the launched command exited", "/nonexistent/guest",
                   f"{out}.launch.log")
    assert not out.exists() and Path(f"{out}.launch.log").is_file()


def test_bad_filter_and_ports_are_set_up_errors(tmp_path: Path) -> None:
    with start_guest("process", "correct") as guest:
        base = ["record", "--target", guest.address, "--elf", str(guest.elf),
                "--profile", "xreplay-lab", "-o", str(tmp_path / "x.xrr")]
        one_line_error(cli(*base, "--label", "5000=nope"), "--label port 5000",
                       "ports 0-4095")
        one_line_error(cli(*base, "--bind", "3=1"), "--bind names vCPU 1")
        one_line_error(cli(*base, "--vcpus", "40"), "--vcpus 40")
        one_line_error(cli(*base, "--filter", "no_such_variable == 1"),
                       "--filter 'no_such_variable == 1': gdb cannot evaluate it")
    assert not (tmp_path / "x.xrr").exists()


@pytest.mark.parametrize("hit_loop", ["auto", "trace"])
def test_ctrl_c_on_a_hung_guest_takes_the_hang_snapshot(tmp_path: Path, hit_loop: str) -> None:
    """Also through gdbserver's tracepoints (Solo5's uint8_t[4096] page): the batch in the
    buffer is fetched first, then the hang snapshot."""
    out = tmp_path / "c.xrr"
    with start_guest(GuestBuild("process", "solo5"), "lost-upcall") as guest:
        rec = Recorder(build_options(RecordChoices(
            output=out, target=guest.address, elf=guest.elf, profile="mirage",
            kill_target=True, hit_loop=hit_loop)))

        def stop_when_hung() -> None:
            guest.wait_for_output("LAB-HUNG", 30)
            time.sleep(1.5)
            rec.request_stop("interrupted")

        threading.Thread(target=stop_when_hung, daemon=True).start()
        result = rec.run()
    assert result.reason == "interrupted" and result.hang_snapshot is not None
    assert [(f.kind, f.ports) for f in replay(out).findings if f.severity != "info"] == [
        ("missed-clear", [1, 3, 4])]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 192 KiB tmpfs (root only: the test mounts it, and unmounts it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_cleanly_and_keeps_every_complete_snapshot(small_disk: Path) -> None:
    out = small_disk / "full.xrr"
    elf = build_guest("process")
    port = free_port()
    # a 4 KiB shadow watch that changes at every hit fills 192 KiB within a few hundred hits
    res = cli("record", "--launch", f"gdbserver --once 127.0.0.1:{port} {elf} variant=correct "
              "events=100000", "--target", f"127.0.0.1:{port}", "--elf", str(elf),
              "--profile", "xreplay-lab", "--watch", "stack=$sp:4096", "--duration", "60",
              "-o", str(out))
    assert res.exit_code == EXIT_CODES[EndReason.WRITE_ERROR], res.output
    assert "ended by write-error" in res.output
    line = next(ln for ln in res.output.splitlines() if "disk full writing" in ln)
    n = int(line.split(" after ")[1].split()[0])
    assert n > 10
    with XrrReader(out) as r:
        records = list(r.records())
        assert r.trailer is None  # not "closed cleanly"
    assert len(records) >= n - 1 and [rec.seq for rec in records] == list(range(len(records)))


def test_nothing_readable_is_loud_in_record_show_and_replay(tmp_path: Path) -> None:
    """A shared_info expression that never points at mapped memory: record says so and
    exits 5, show lists the snapshots, replay refuses a verdict (exit 2)."""
    out = tmp_path / "empty.xrr"
    with start_guest("process", "lost-upcall") as guest:
        res = cli("record", "--target", guest.address, "--elf", str(guest.elf),
                  "--profile", "xreplay-lab", "--shared-info",
                  "(struct shared_info_x86_64 *)lab_upcall_count", "--count", "50",
                  "--kill", "-o", str(out))
    assert res.exit_code == 5, res.output
    assert "shared_info could not be read in 50 of 50 snapshots" in res.output
    assert "no snapshot could read shared_info" in res.output
    shown = cli("show", str(out))
    assert shown.exit_code == 0 and "UNREADABLE shared_info in 50 of 50 snapshots: #0, #1" in (
        shown.output)
    verdict = cli("replay", str(out))
    assert verdict.exit_code == 2
    assert "no verdict: shared_info could not be read in 50 of 50 snapshots, so only 0 could " \
           "be judged" in verdict.output
