"""The lab unikernel (xreplay/lab/pvh) on the real Xen 4.17 lab: every variant boots with
``xl create`` and does what it should, seen from Xen's side (its console, ``xl list``,
``xl debug-keys e``), with no debugger attached.

One lab boot (stock Xen, no domU) for the module, then about 15 s per variant. The build
tests at the top need no QEMU.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from xreplay.errors import XReplayError
from xreplay.lab import pvh
from xreplay.lab.xen import Lab


# ---------------------------------------------------------------- no QEMU needed
def test_unikernel_build_is_cached_pvh_elf_with_the_probe_symbols(tmp_path) -> None:
    elf = pvh.build_unikernel(tmp_path)
    assert pvh.build_unikernel(tmp_path) == elf  # the same hash-named file, not rebuilt
    assert elf.name.startswith("pvh-unikernel-") and elf.suffix == ".elf"
    notes = subprocess.run(["readelf", "-n", str(elf)], capture_output=True, text=True).stdout
    assert "Xen" in notes and "0x00000012" in notes  # XEN_ELFNOTE_PHYS32_ENTRY
    header = subprocess.run(["readelf", "-h", str(elf)], capture_output=True, text=True).stdout
    assert "ELF64" in header
    syms = dict(
        (ln.split()[2], (ln.split()[0], ln.split()[1]))
        for ln in subprocess.run(["nm", str(elf)], capture_output=True,
                                 text=True).stdout.splitlines() if len(ln.split()) == 3)
    for sym in [*pvh.PROBES.values(), pvh.SHARED_INFO_SYMBOL, pvh.SHADOW_SYMBOL,
                *pvh.COUNTER_SYMBOLS]:
        assert sym in syms, sym
    # Solo5/Mirage names are aliases at the same addresses
    assert syms["solo5__xen_HYPERVISOR_SHARED_INFO"][0] == syms["HYPERVISOR_SHARED_INFO"][0]
    assert int(syms["HYPERVISOR_SHARED_INFO"][0], 16) % 4096 == 0
    assert syms["mirage_xen_evtchn_demux_pending"][0] == syms["evtchn_demux_pending"][0]
    assert syms["evtchn_upcall_handler"][0] == syms["solo5__xen_evtchn_vector_handler"][0]
    flood = pvh.build_flood(tmp_path)
    assert flood.stat().st_size < 64 * 1024


def test_xl_config_and_variant_check() -> None:
    cfg = pvh.xl_config("lost-upcall", "/root/k.elf", window_us=500)
    assert 'type = "pvh"' in cfg and 'kernel = "/root/k.elf"' in cfg
    assert 'cmdline = "variant=lost-upcall window_us=500 period_ms=10"' in cfg
    assert 'name = "uk-lost-upcall"' in cfg and "rdtscp=0" in cfg
    with pytest.raises(XReplayError, match="unknown unikernel variant 'stuck'"):
        pvh.xl_config("stuck", "/root/k.elf")


# ---------------------------------------------------------------- on the real Xen
@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    from xreplay.lab.xen import setup

    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    try:
        setup(progress=print)
    except XReplayError as exc:
        pytest.skip(f"cannot set up the Xen lab (Debian packages or host tools): {exc}")
    the_lab = Lab(tmp_path_factory.mktemp("xenlab-pvh"), domu="none", progress=print)
    try:
        the_lab.start()
        yield the_lab
    finally:
        the_lab.stop()


def _run(lab: Lab, variant: str, seconds: float = 8.0):
    uk = pvh.boot(lab, variant)
    try:
        outcome = pvh.watch(uk, seconds)
        dump, text = uk.e_dump()
        return uk, outcome, dump, text
    finally:
        uk.destroy()


def _pms(dump, port: int) -> str:
    st = dump.port(port)
    assert st is not None, f"port {port} not in Xen's 'e' dump"
    return st.pms


@pytest.mark.xenlab
def test_lost_upcall_hangs_with_the_seeds_e_dump(lab: Lab) -> None:
    uk, out, dump, text = _run(lab, "lost-upcall")
    assert uk.ports == {"xenstore": 1, "console": 2, "timer": 3, "flood": 64}
    assert out.hung and not out.errors and "b" in out.xl_state, (out, text)
    assert _pms(dump, 3) == "[1/0/1]" and _pms(dump, 64) == "[1/0/1]", text
    assert _pms(dump, 2) == "[0/1/1]", text  # the console: masked, its word's selector set


@pytest.mark.xenlab
def test_correct_keeps_running_under_the_flood(lab: Lab) -> None:
    uk, out, dump, text = _run(lab, "correct")
    assert not out.hung and not out.errors and out.alive_reports >= 4, out
    # (a loaded host slows both; ~70 timer and ~250 flood events/s on a quiet one)
    assert int(out.last_alive["timer"]) > 20 and int(out.last_alive["flood"]) > 0, out
    assert {p.port for p in dump.ports} >= {1, 2, 3, 64}, text
    assert _pms(dump, 2)[3] == "1", text  # the console stays masked
    # (a running guest's dump may catch the timer just raised: [1/0/1] for an instant)


@pytest.mark.xenlab
def test_unmask_no_reraise_strands_the_flood_port(lab: Lab) -> None:
    import time

    uk = pvh.boot(lab, "unmask-no-reraise")
    try:
        # a kick must land between the bottom half's mask and the guest's own unmask: on a
        # loaded host the flood is slower, so give it time; Xen's 'e' key is the witness
        deadline, text, dump = time.monotonic() + 120, "", None
        while time.monotonic() < deadline:
            time.sleep(5)
            dump, text = uk.e_dump()
            if _pms(dump, 64) == "[1/0/0]":
                break
        out = pvh.watch(uk, 4.0)
        dump2, text2 = uk.e_dump()
    finally:
        uk.destroy()
    assert dump is not None and _pms(dump, 64) == "[1/0/0]", text
    assert _pms(dump2, 64) == "[1/0/0]", text2  # and it stays deaf
    assert not out.hung and not out.errors, out  # while the timer runs on
    first, last = uk.alive_lines()[0], uk.alive_lines()[-1]
    assert int(last["timer"]) > int(first["timer"]) + 20, (first, last)


@pytest.mark.xenlab
def test_callback_irq_races_but_does_not_hang(lab: Lab) -> None:
    uk, out, dump, text = _run(lab, "callback-irq")
    assert not out.hung and not out.errors and out.alive_reports >= 4, out
    last = out.last_alive
    # the race happens (upcalls taken with no bottom half in between) and is survived
    assert int(last["upcalls"]) > int(last["bottom_halves"]), last
    assert int(last["timer"]) > 20, last


# ---------------------------------------------------------------- the bundled recordings
REC = __import__("pathlib").Path(__file__).parent.parent / "recordings"


def test_bundled_real_xen_recordings_keep_their_verdicts() -> None:
    from xreplay.debugkeys import parse_file
    from xreplay.replay import replay
    from xreplay.replay.diff import check_debugkeys, diff_recordings, pick_domain
    from xreplay.xrr import XrrReader

    hung = REC / "xenlab-pvh-unikernel-lost-upcall.xrr"
    good = REC / "xenlab-pvh-unikernel-correct.xrr"
    missed = replay(hung).by_kind("missed-clear")
    assert len(missed) == 1 and missed[0].ports == [3, 64]
    assert missed[0].block_snapshot is not None and missed[0].upcall_snapshot is not None
    with XrrReader(hung) as r:
        assert r.header.target.get("kind") == "gdbsx"
        last = list(r.snapshots())[-1]
    assert last.hang
    dump = pick_domain(parse_file(hung.with_name(hung.name + ".e.txt")), None)
    assert {p.port for p in dump.ports if p.pms == "[1/0/1]"} == {3, 64}
    assert check_debugkeys(last, dump).agree
    assert not replay(good).failed
    # among the divergences: after a block the hung run has only its hang snapshot
    d = diff_recordings(good, hung)
    assert d.diverged and any("hang" in x.message for x in d.divergences)
