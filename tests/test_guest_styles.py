"""Guests declared the way users declare them, recorded with the presets, right or loud.

The lab guest is built in the Solo5/Mirage style (``uint8_t HYPERVISOR_SHARED_INFO[4096]``
and its alias), the Mini-OS style (a ``shared_info_t *`` set at boot, or statically
initialised, which a PIE relocates only when it starts), 64- and 32-bit, PIE and not, and
recorded through real gdbserver and QEMU with ``--profile`` and no ``--arch``: the arch
comes from the ELF, QEMU is recognised by itself, and the verdicts are the right ones.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from xreplay.cli import main
from xreplay.elf import read_elf
from xreplay.gdb.session import GdbSession
from xreplay.lab.guests import STYLE_PROFILE, GuestBuild, free_port, start_guest
from xreplay.record import Recorder
from xreplay.record.build import RecordChoices, build_options
from xreplay.replay import replay
from xreplay.xrr import XrrReader

QEMU_RESET_PC = 0xFFF0  # where an x86 CPU held by -S still is: the reset vector


def record_build(build: GuestBuild, variant: str, out: Path, profile: str | None = None,
                 **choices):
    with start_guest(build, variant) as guest:
        opts = build_options(RecordChoices(
            output=out, target=guest.address, elf=guest.elf,
            profile=profile or STYLE_PROFILE[build.style], hang_after=2.0, kill_target=True,
            **choices))
        return Recorder(opts).run()


def serious(path: Path) -> list[tuple[str, list[int] | None]]:
    result = replay(path)
    assert result.incomplete() is None
    return [(f.kind, f.ports) for f in result.findings if f.severity != "info"]


LOST = [("missed-clear", [1, 3, 4])]


@pytest.mark.gdbserver
@pytest.mark.parametrize("build", [
    GuestBuild("process", "solo5"),
    GuestBuild("process", "solo5", pie=True),
    GuestBuild("process", "solo5", m32=True),
    GuestBuild("process", "minios", pie=True),
    GuestBuild("process", "minios", m32=True),
    GuestBuild("process", "minios-static", pie=True),
    GuestBuild("process", "minios-static", m32=True, pie=True),
], ids=lambda b: b.name)
def test_lost_upcall_is_found_in_every_declaration(build: GuestBuild, tmp_path: Path) -> None:
    out = tmp_path / "run.xrr"
    result = record_build(build, "lost-upcall", out)
    assert result.reason == "hang" and result.arch == build.arch
    assert result.stub == "gdbserver" and not result.unreadable
    assert result.readable_shared_info == result.snapshots > 100
    assert serious(out) == LOST
    with XrrReader(out) as r:
        assert r.header.arch == build.arch
        hang = r.snapshot(result.hang_snapshot)
        assert [p.pms for p in hang.port_table([1, 2, 3, 4])] == [
            "[1/0/1]", "[1/1/1]", "[1/0/1]", "[1/0/1]"]
        if build.style.startswith("minios"):
            # the pointer was NULL (or not yet relocated) at attach and followed after
            list(r.records())
            assert any(n.data.get("event") == "region-moved" for n in r.notes)


@pytest.mark.gdbserver
@pytest.mark.parametrize("build", [GuestBuild("process", "solo5", pie=True),
                                   GuestBuild("process", "minios-static", m32=True, pie=True)],
                         ids=lambda b: b.name)
def test_correct_guest_replays_clean(build: GuestBuild, tmp_path: Path) -> None:
    out = tmp_path / "ok.xrr"
    result = record_build(build, "correct", out, count=600)
    assert result.reason == "count" and result.snapshots == 600 and not result.unreadable
    assert serious(out) == []


@pytest.mark.gdbserver
def test_solo5_preset_with_only_the_vector_handler(tmp_path: Path) -> None:
    """Solo5's preset probes only the vector handler: the hang snapshot is the evidence."""
    out = tmp_path / "s.xrr"
    result = record_build(GuestBuild("process", "solo5"), "lost-upcall", out, profile="solo5")
    assert result.reason == "hang"
    with XrrReader(out) as r:
        assert [p.location for p in r.header.probes][:1] == ["solo5__xen_evtchn_vector_handler"]
        assert r.header.regions[0].expr == "HYPERVISOR_SHARED_INFO"
    assert serious(out) == LOST


@pytest.mark.qemu
@pytest.mark.parametrize("style", ["solo5", "minios"])
def test_qemu_is_recognised_without_being_told(style: str, tmp_path: Path) -> None:
    out = tmp_path / "q.xrr"
    result = record_build(GuestBuild("baremetal", style), "lost-upcall", out)
    assert result.stub == "qemu" and result.arch == "x86_32" and result.reason == "hang"
    assert serious(out) == LOST
    with XrrReader(out) as r:
        assert r.header.target["kind"] == "qemu"


@pytest.mark.gdbserver
def test_hang_snapshot_alone_is_a_missed_clear(tmp_path: Path) -> None:
    """Attached after the guest hung: one snapshot, and it is enough for the verdict."""
    out = tmp_path / "late.xrr"
    with start_guest(GuestBuild("process", "solo5"), "lost-upcall", debugger=False) as guest:
        guest.wait_for_output("LAB-HUNG", 30)
        port = free_port()
        stub = subprocess.Popen(["gdbserver", "--once", "--attach", f"127.0.0.1:{port}",
                                 str(guest.pid)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            opts = build_options(RecordChoices(
                output=out, target=f"127.0.0.1:{port}", elf=guest.elf, profile="mirage",
                hang_after=1.0, kill_target=False))
            result = Recorder(opts).run()
        finally:
            stub.kill()
            stub.wait()
    assert result.reason == "hang" and result.snapshots == 1
    assert serious(out) == LOST


@pytest.mark.gdbserver
def test_raw_runtime_address_of_a_32bit_guest_is_decoded_as_x86_32(tmp_path: Path) -> None:
    """No --elf, no --arch: gdbserver reports the 32-bit process, and that decides."""
    build = GuestBuild("process", "solo5", m32=True)
    with start_guest(build, "lost-upcall") as guest:
        nm = subprocess.run(["nm", str(guest.elf)], capture_output=True, text=True,
                            check=True).stdout
        syms = {f[2]: int(f[0], 16) for f in map(str.split, nm.splitlines()) if len(f) == 3}
        out = tmp_path / "raw.xrr"
        opts = build_options(RecordChoices(
            output=out, target=guest.address, shared_info=f"{syms['HYPERVISOR_SHARED_INFO']:#x}",
            upcall=f"*{syms['solo5__xen_evtchn_vector_handler']:#x}",
            bottom_half=f"*{syms['mirage_xen_evtchn_demux_pending']:#x}",
            block=f"*{syms['mirage_xen_evtchn_block_domain']:#x}",
            hang_after=2.0, kill_target=True))
        result = Recorder(opts).run()
    assert result.arch == "x86_32" and result.reason == "hang" and not result.unreadable
    assert serious(out) == LOST


@pytest.mark.gdbserver
def test_nm_address_of_a_pie_is_explained(tmp_path: Path) -> None:
    build = GuestBuild("process", "solo5", pie=True)
    with start_guest(build, "correct") as guest:
        nm = subprocess.run(["nm", str(guest.elf)], capture_output=True, text=True, check=True)
        addr = next(int(line.split()[0], 16) for line in nm.stdout.splitlines()
                    if line.endswith(" HYPERVISOR_SHARED_INFO"))
        out = tmp_path / "pie.xrr"
        res = CliRunner().invoke(main, [
            "record", "--target", guest.address, "--elf", str(guest.elf), "--profile",
            "mirage", "--shared-info", hex(addr), "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert f"{addr:#x} is not mapped" in res.output and "is a PIE loaded at offset" in res.output
    assert res.output.count("\n") == 1 and not out.exists()


@pytest.mark.qemu
def test_failed_setup_leaves_a_qemu_guest_held_at_reset(tmp_path: Path) -> None:
    """-S: the guest waits for the debugger; a failed attempt must not let it run."""
    existing = tmp_path / "keep.xrr"
    existing.write_bytes(b"an earlier recording")
    with start_guest(GuestBuild("baremetal"), "correct") as guest:
        res = CliRunner().invoke(main, [
            "record", "--target", guest.address, "--elf", str(guest.elf),
            "--upcall", "no_such_function", "-o", str(existing)])
        assert res.exit_code == 2 and "no_such_function" in res.output
        assert res.output.count("\n") == 1
        time.sleep(1.0)
        assert guest.output() == ""  # it printed nothing: it never ran
        gdb = GdbSession()
        try:
            gdb.mi("-gdb-set architecture i386:x86-64")
            gdb.mi(f"-target-select remote {guest.address}")
            seen = len(gdb.console)
            gdb.console_command("p/x $pc")
            assert f"= {QEMU_RESET_PC:#x}" in "".join(gdb.console[seen:])
        finally:
            gdb.exit()
    assert existing.read_bytes() == b"an earlier recording"
    assert read_elf(guest.elf).arch == "x86_32"
