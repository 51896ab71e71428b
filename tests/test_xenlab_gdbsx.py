"""Xen's own stub, gdbsx, in the lab: a PV Linux domU recorded and cross-checked through it.

Why: on a real Xen host the stub is gdbsx in dom0, not QEMU's whole-machine stub; it is
per-domain (no dom0 hits to skip), reads guest virtual addresses, reports one thread per
vCPU, answers no Z packets and serves one gdb session. The top tests need no QEMU (the
lab patch, the cache key, the QEMU command line, gdbsx's fingerprint). The rest boot the
gdbsx lab once for the module with a PV domU (the hypervisor build is cached after the
first run, ~5 min on two busy cores), record through gdbsx, assert on what a Linux
2-level guest must show, compare the paused domU with Xen's 'e' and 'q' keys read through
gdbsx, and check the domU runs on afterwards. Skipped with the reason when the Debian
archive (Xen's source) cannot be reached.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from xreplay.errors import XReplayError
from xreplay.gdb.gdbsx import VCPU_EXPR, adapt_options, looks_like_gdbsx
from xreplay.lab.xen import Lab
from xreplay.lab.xen import hypervisor as hv
from xreplay.lab.xen.commands import lab as lab_group
from xreplay.lab.xen.lab import GDBSX_DOM0_PORT
from xreplay.lab.xen.record import VIRQ_TIMER, cross_check, parse_lsevtchn, record_lab
from xreplay.profiles.linux import GuestFacts
from xreplay.record import RecordOptions, RecordResult
from xreplay.replay import replay
from xreplay.snapshot import Snapshot
from xreplay.xrr import RecordingHeader, XrrReader

COUNT = 200
GUARD_SECONDS = 900.0


# ---------------------------------------------------------------- no QEMU needed
def test_the_lab_patch_says_why_and_is_part_of_the_cache_key() -> None:
    text = hv.patch_text("xen-svm-swint-int3.patch")
    header = text.split("\n--- ", 1)[0]
    assert "QEMU" in header and "SWINT" in header and "lab" in header
    assert "+++ b/xen/arch/x86/hvm/svm/svm.c" in text
    assert "CONFIG_GDBSX=y" in hv.CONFIG_LINES and "CONFIG_EXPERT=y" in hv.CONFIG_LINES


def test_the_debugger_irq_patch_says_why_and_is_built_in() -> None:
    text = hv.patch_text("xen-svm-debugger-irq.patch")
    header = text.split("\n--- ", 1)[0]
    for why in ("event_inj", "single", "TF", "interrupted", "Lab only"):
        assert why in header, why
    assert "+++ b/xen/arch/x86/hvm/svm/intr.c" in text and "debugger_attached" in text
    assert "xen-svm-debugger-irq.patch" in hv.PATCHES


def test_cache_key_changes_with_the_config_and_patches(tmp_path: Path, monkeypatch) -> None:
    from xreplay.lab.xen.stage import Stage

    boot = tmp_path / "stage" / "boot"
    boot.mkdir(parents=True)
    (boot / "xen-4.17-amd64.config").write_text("CONFIG_X86_64=y\n")
    stage = Stage(tmp_path, "6.1", {})
    first = hv.build_digest(stage)
    assert hv.cached(stage) is None  # nothing built in this cache
    (boot / "xen-4.17-amd64.config").write_text("CONFIG_X86_64=y\nCONFIG_PV=y\n")
    second = hv.build_digest(stage)
    monkeypatch.setattr(hv, "CONFIG_LINES", (*hv.CONFIG_LINES, "CONFIG_DEBUG=y"))
    third = hv.build_digest(stage)
    assert len({first, second, third}) == 3
    # a build recorded under another digest is not taken for this one
    out = hv.cache_dir(stage) / f"4.17.5-1-{first}"
    out.mkdir(parents=True)
    (out / "xen-4.17").write_bytes(b"\x7fELF")
    (out / hv.META).write_text(f'{{"source_version": "4.17.5-1", "digest": "{first}"}}')
    assert hv.cached(stage) is None
    monkeypatch.setattr(hv, "CONFIG_LINES", hv.CONFIG_LINES[:-1])
    (boot / "xen-4.17-amd64.config").write_text("CONFIG_X86_64=y\n")
    hit = hv.cached(stage)
    assert hit is not None and hit.source_version == "4.17.5-1" and hit.digest == first


def test_a_gdbsx_lab_forwards_a_second_port_and_refuses_unknown_stubs(tmp_path: Path) -> None:
    lab = Lab(tmp_path, stub="gdbsx")
    lab._gdbsx_port = 4321
    cmd = lab.qemu_command(1234, 5678)
    netdev = cmd[cmd.index("-netdev") + 1]
    assert f"hostfwd=tcp:127.0.0.1:4321-:{GDBSX_DOM0_PORT}" in netdev
    assert "4321" not in " ".join(Lab(tmp_path).qemu_command(1234, 5678))
    with pytest.raises(XReplayError, match="unknown stub 'bogus'"):
        Lab(tmp_path, stub="bogus")
    for sub in ("up", "setup", "record", "crosscheck"):
        assert "--stub" in CliRunner().invoke(lab_group, [sub, "--help"]).output


def test_tcg_threading_is_chosen_and_checked(tmp_path: Path) -> None:
    """The PVH unikernel through gdbsx needs single-threaded TCG (README, Limits)."""
    def accel(lab: Lab) -> str:
        cmd = lab.qemu_command(1234, 5678)
        return cmd[cmd.index("-accel") + 1]

    assert accel(Lab(tmp_path)) == "tcg,thread=multi"
    assert accel(Lab(tmp_path, stub="gdbsx", tcg_thread="single")) == "tcg,thread=single"
    with pytest.raises(XReplayError, match="unknown TCG threading 'both'"):
        Lab(tmp_path, tcg_thread="both")
    assert "--tcg-thread [multi|single]" in CliRunner().invoke(lab_group, ["up", "--help"]
                                                               ).output


def test_gdbsx_is_told_apart_by_its_empty_qsupported() -> None:
    assert looks_like_gdbsx("", "T05thread:0;")
    assert looks_like_gdbsx("PacketSize=2400;xreplay-gdbsx+", "T05thread:1;")  # our build
    assert not looks_like_gdbsx("PacketSize=1000;qXfer:features:read+", "T05thread:01;")
    assert not looks_like_gdbsx("", "S05")
    opts = adapt_options(RecordOptions(output=Path("x.xrr"), filter="1", dedupe=False))
    assert (opts.filter, opts.dedupe, opts.vcpu_expr, opts.target_kind) == (
        None, True, VCPU_EXPR, "gdbsx")
    assert opts.gdb_arch == "i386:x86-64"
    assert sum("gdb_gdbsx.py" in c for c in adapt_options(opts).extra_gdb_commands) == 1
    # Debian's gdbsx gets a fixed read size that fits its 4096-character buffer; the
    # project's build announces its own PacketSize
    assert "set remote memory-read-packet-size 4000" in opts.extra_gdb_commands
    own = adapt_options(RecordOptions(output=Path("x.xrr")), own_build=True)
    assert not any("packet-size" in c for c in own.extra_gdb_commands)


def test_a_gdbsx_that_died_is_said_by_its_signal() -> None:
    """start_gdbsx reads gdbsx's exit status from its dom0 shell's ``$?``."""
    from xreplay.lab.xen.gdbsx import _exit_status

    assert _exit_status("1") == "exit status 1"
    assert _exit_status("139") == "killed by signal 11 (SIGSEGV)"
    assert _exit_status("137") == "killed by signal 9 (SIGKILL)"


def test_the_projects_gdbsx_patch_says_why() -> None:
    from xreplay.lab.xen import gdbsx_build

    text = hv.patch_text(gdbsx_build.PATCH)
    header = text.split("\ndiff ", 1)[0]
    for why in ("_wait_domain_pause", "PacketSize", "Z0", "fallback"):
        assert why in header, why
    assert "+++ b/tools/debugger/gdbsx/xg/xg_main.c" in text


# ---------------------------------------------------------------- the booted lab
def boot_gdbsx_lab(tmp_path_factory: pytest.TempPathFactory, name: str, *, domu: str,
                   domu_vcpus: int = 1, evtchn: str = "2l"):
    """Set up the stage and the gdbsx hypervisor (skip with the reason when they cannot be
    had), boot, yield, stop by PID. ``evtchn="fifo"``: the domU on Linux's FIFO ABI."""
    from xreplay.lab.xen import setup

    if shutil.which("gdb") is None:
        pytest.skip("gdb not installed (apt-get install gdb)")
    try:
        stage = setup(progress=print)
        hv.ensure(stage, progress=print)
    except hv.ArchiveUnreachable as exc:
        pytest.skip(f"cannot fetch Xen's source for the gdbsx hypervisor: {exc}")
    except XReplayError as exc:
        pytest.skip(f"cannot set up the gdbsx lab (packages or build tools): {exc}")
    # a generous boot timeout: on a loaded two-core CI machine the PVH domU has taken
    # more than 300 s to come up under TCG
    lab = Lab(tmp_path_factory.mktemp(name), domu=domu, domu_vcpus=domu_vcpus, stub="gdbsx",
              evtchn=evtchn, boot_timeout=900, progress=print)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


@dataclass
class Recorded:
    result: RecordResult
    facts: GuestFacts
    path: Path
    header: RecordingHeader
    snaps: list[Snapshot]


def record_through_gdbsx(lab: Lab, path: Path, count: int = COUNT) -> Recorded:
    t0 = time.monotonic()
    # the duration is a guard, not the goal: a 2-vCPU PVH recording through gdbsx once
    # stopped taking hits (dom0 stopped answering too); the test then fails on the count
    result, facts = record_lab(lab, path, count=count, duration=GUARD_SECONDS)
    print(f"recorded {result.snapshots} through gdbsx in {result.elapsed:.2f} s "
          f"({result.rate:.1f}/s; {time.monotonic() - t0:.1f} s with the check)")
    with XrrReader(path) as reader:
        header, snaps = reader.header, list(reader.snapshots())
        assert reader.problems == [] and reader.trailer is not None
    return Recorded(result, facts, path, header, snaps)


def domu_ticks(lab: Lab) -> int:
    """The last ``domu tick N`` the domU's init printed (it prints one a second)."""
    ticks = re.findall(r"domu tick (\d+)", lab.domu_console())
    assert ticks, "the domU printed no tick"
    return int(ticks[-1])


def assert_runs_on(lab: Lab) -> None:
    """No gdbsx left, the domU not paused, and its tick counter advancing."""
    assert lab.dom0("pidof gdbsx || echo none", timeout=30).strip() == "none"
    state = lab.dom0("xl list domu", timeout=30).splitlines()[-1].split()[4]
    assert "p" not in state, state
    before = domu_ticks(lab)
    deadline = time.monotonic() + 30
    while domu_ticks(lab) <= before:
        assert time.monotonic() < deadline, f"the domU's ticks stopped at {before}"
        time.sleep(1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    yield from boot_gdbsx_lab(tmp_path_factory, "xenlab-gdbsx-pv", domu="pv")


@pytest.fixture(scope="module")
def recorded(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    return record_through_gdbsx(lab, tmp_path_factory.mktemp("rec") / "pv-gdbsx.xrr")


@pytest.mark.xenlab
def test_status_json_names_the_gdbsx_address(lab: Lab) -> None:
    import json

    res = CliRunner().invoke(lab_group, ["status", "--json", "--run-dir", str(lab.run_dir)])
    assert res.exit_code == 0, res.output
    state = json.loads(res.output)
    assert state["stub"] == "gdbsx" and state["gdbsx_address"] == lab.gdbsx_address
    assert Path(state["xen_image"]).parent.parent.name == "gdbsx-xen"


@pytest.mark.xenlab
def test_the_pv_domu_is_recorded_through_gdbsx_with_real_content(recorded: Recorded) -> None:
    snaps, header = recorded.snaps, recorded.header
    assert recorded.result.reason == "count" and len(snaps) == COUNT
    assert recorded.result.foreign == 0  # a per-domain stub: no dom0 hits to skip
    assert header.target["kind"] == "gdbsx" and "gdbsx" in header.target["description"]
    assert (recorded.facts.abi, recorded.facts.domain_type) == ("2l", "pv")
    assert {s.vcpu for s in snaps} == {0}
    assert all(s.vcpus[0].source == "registered" for s in snaps)
    by_probe = {p: [s for s in snaps if s.probe == p]
                for p in ("upcall", "bottom-half", "xen_timer_interrupt")}
    assert all(len(v) >= 20 for v in by_probe.values()), {k: len(v) for k, v in
                                                          by_probe.items()}
    (timer,) = [p for p, name in header.labels.items() if name == "VIRQ_TIMER"]
    # Xen sets the timer port (and upcall_pending, and the selector bit) before the
    # upcall; Linux's bottom half clears the port before its handler runs
    rises = [b for a, b in zip(snaps, snaps[1:], strict=False)
             if not a.is_pending(timer) and b.is_pending(timer)]
    falls = [b for a, b in zip(snaps, snaps[1:], strict=False)
             if a.is_pending(timer) and not b.is_pending(timer)]
    assert len(rises) >= 10 and len(falls) >= 10, (len(rises), len(falls))
    ups = by_probe["upcall"]
    assert sum(s.vcpus[0].evtchn_upcall_pending == 1 for s in ups) / len(ups) >= 0.9
    assert sum(bool(s.vcpus[0].evtchn_pending_sel >> (timer // 64) & 1) for s in ups
               if s.is_pending(timer)) >= 10
    handled = by_probe["xen_timer_interrupt"]
    assert sum(not s.is_pending(timer) for s in handled) / len(handled) >= 0.9
    # upcall_pending edges: set by Xen, cleared by the guest's upcall
    edges = sum(a.vcpus[0].evtchn_upcall_pending != b.vcpus[0].evtchn_upcall_pending
                for a, b in zip(snaps, snaps[1:], strict=False))
    assert edges >= 20, edges
    errors = [f for f in replay(recorded.path).findings if f.severity == "error"]
    assert not errors, [f.message for f in errors]


@pytest.mark.xenlab
def test_paused_pv_domu_agrees_with_xen_through_gdbsx(lab: Lab, recorded: Recorded,
                                                       tmp_path: Path) -> None:
    check = cross_check(lab, facts=recorded.facts, output=tmp_path / "paused.xrr",
                        progress=print)
    print(check.report())
    assert check.agrees, check.report()
    bindings = parse_lsevtchn(lab.dom0(f"lsevtchn {lab.domid}", timeout=30))
    assert [p.port for p in check.dump.ports] == sorted(bindings)
    assert any(b.virq == VIRQ_TIMER for b in bindings.values())
    with XrrReader(tmp_path / "paused.xrr") as reader:
        assert "gdbsx" in reader.header.regions[0].expr
    assert_runs_on(lab)


@pytest.mark.xenlab
def test_the_domu_runs_on_after_the_recording(lab: Lab, recorded: Recorded) -> None:
    assert_runs_on(lab)


@pytest.mark.xenlab
def test_a_qemu_lab_has_no_gdbsx(lab: Lab, tmp_path: Path) -> None:
    """A lab booted without gdbsx says how to get it, instead of hanging on the port."""
    from xreplay.lab.xen.record import lab_stub

    other = Lab.attach(lab.run_dir)
    assert other.stub == "gdbsx" and lab_stub(other) == "gdbsx"
    assert other.state is not None
    other.state.stub = "qemu"
    with pytest.raises(XReplayError, match="boot it with `xreplay lab up --stub gdbsx`"):
        lab_stub(other, "gdbsx")
    with pytest.raises(XReplayError, match="boot it with `xreplay lab up --stub gdbsx`"):
        _ = other.gdbsx_address
