"""Xen's 'v' key (the SVM VMCB dump) as the lab reads it back around a gdbsx session.

The data are real: the lab's Xen 4.17 under QEMU TCG, the lab unikernel (callback-irq)
30 s after a 40-hit gdbsx recording, and the same guest never debugged, each with a guest
console line after the dump as the serial log interleaves them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xreplay.errors import XReplayError
from xreplay.lab.xen import vmcb

DATA = Path(__file__).parent / "data" / "vmcb"


def load(name: str) -> dict[tuple[int, int], vmcb.Vmcb]:
    return vmcb.parse((DATA / name).read_text())


def test_parses_the_fields_the_leftover_check_reads() -> None:
    (key, v), = load("xen417-detached.txt").items()
    assert key == (1, 0)
    assert v.fields["exception_intercepts"] == 0x60082  # #DB, #NM, #AC, #MC: no #BP
    assert v.fields["general1_intercepts"] == 0xBD44400F
    assert v.fields["RIP"] == 0x1000DF and v.fields["RFLAGS"] == 0x202
    assert v.fields["DR6"] == 0x4000 and v.fields["DR7"] == 0
    assert v.fields["exitcode"] == 0x78 and v.exit_int_info == (0, 0, 0)
    assert v.event_inj == (0, 0, 0)
    assert v.segments["CS"][0] == 0x18 and v.segments["IDTR"][2:] == (0xFFF, 0x1122D0)
    # the guest's console line after the dump is not read as VMCB fields
    assert "upcalls" not in v.fields
    assert "HLT" in v.summary() and "DR6 0x4000" in v.summary()


def test_a_detached_session_left_dr6_bs_and_nothing_else() -> None:
    before = load("xen417-never-debugged.txt")[(2, 0)]
    after = load("xen417-detached.txt")[(1, 0)]
    before.vcpu = after.vcpu = 0
    assert vmcb.left_behind([before], [after]) == [
        "v0 DR6.BS set (a single step's status; DR6 0x4000)"]
    assert vmcb.left_behind([before], [before]) == []


def test_intercepts_tf_and_a_latched_event_are_named() -> None:
    before = load("xen417-never-debugged.txt")[(2, 0)]
    after = load("xen417-never-debugged.txt")[(2, 0)]
    after.fields["exception_intercepts"] |= 1 << vmcb.TRAP_INT3
    after.fields["general1_intercepts"] |= vmcb.GENERAL1_INTERCEPT_SWINT
    after.fields["RFLAGS"] |= vmcb.RFLAGS_TF
    after.event_inj = (1, 0, 0xF3)
    left = vmcb.left_behind([before], [after])
    assert "v0 #BP still intercepted" in left
    assert "v0 INTn (SWINT) still intercepted" in left
    assert "v0 RFLAGS.TF set" in left
    assert "v0 event_inj pending: interrupt vector 0xf3" in left
    assert any(s.startswith("v0 exception_intercepts 0x60082 -> 0x6008a") for s in left)


def test_intercepts_that_follow_the_guest_are_not_leftovers() -> None:
    """Measured right after a callback-irq session: Xen had armed the VINTR intercept
    (general1 bit 4) for the guest's upcall waiting on its sti, and lazy FPU toggles #NM."""
    before = load("xen417-never-debugged.txt")[(2, 0)]
    after = load("xen417-never-debugged.txt")[(2, 0)]
    after.fields["general1_intercepts"] = 0xBD44401F
    after.fields["exception_intercepts"] &= ~(1 << 7)
    assert vmcb.left_behind([before], [after]) == []


def test_text_without_a_dump_is_an_error() -> None:
    with pytest.raises(XReplayError, match="VMCB Areas"):
        vmcb.parse("(XEN) 'e' pressed -> dumping event-channel info\n")
