"""Recording a real Linux guest on Xen 4.17 with the Linux profile, checked against Xen.

The top half needs no QEMU: the profile built from a symbol map, the lsevtchn and 'q'
parsers. The rest boots the lab once for the module (about 20 s), records the PV domU
through QEMU's whole-machine gdbstub (dom0's hits skipped and counted), asserts on what a
Linux 2-level guest must show, compares a paused domU with Xen's 'e' and 'q' keys, and
shows that a FIFO guest is refused. About a minute on two cores with the stage cached;
skipped with the reason when Debian's packages cannot be fetched. The module's lab is
stopped (by PID) before another module can boot its own: pytest tears module fixtures
down at the end of the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import boot_xen_lab

from xreplay.debugkeys import compare, latest, parse
from xreplay.errors import XReplayError
from xreplay.lab.xen import Lab
from xreplay.lab.xen.commands import lab as lab_group
from xreplay.lab.xen.record import (
    VIRQ_TIMER,
    cross_check,
    parse_lsevtchn,
    parse_q_vcpus,
    port_labels,
    record_lab,
)
from xreplay.profiles import LinuxSymbols, apply, inspect_guest, linux_profile
from xreplay.profiles.linux import GDB_HELPERS, GuestFacts, apply_cli, read_system_map
from xreplay.record import RecordOptions
from xreplay.snapshot import SnapshotDecoder
from xreplay.xrr import ProbeSpec, XrrReader

# Addresses of Debian's 6.1.0-56-amd64 (the lab's kernel), as in its /proc/kallsyms.
LAB_SYMBOLS = {
    "xen_vcpu": 0x1E0E0, "__per_cpu_offset": 0xFFFFFFFF8241CB60,
    "HYPERVISOR_shared_info": 0xFFFFFFFF82A25F00, "xen_start_flags": 0xFFFFFFFF8241B1C8,
    "xen_start_info": 0xFFFFFFFF833190C0, "xen_evtchn_do_upcall": 0xFFFFFFFF81661470,
    "evtchn_2l_handle_events": 0xFFFFFFFF81665110, "xen_safe_halt": 0xFFFFFFFF81027750,
    "xen_timer_interrupt": 0xFFFFFFFF8101E8E0,
}


def write_map(path: Path, syms: dict[str, int], filler: int = 120) -> Path:
    """A System.map with ``syms`` and enough unrelated symbols not to look like a stub."""
    rows = dict(syms)
    rows.update({f"filler_{i}": 0xFFFFFFFF81000000 + 16 * i for i in range(filler)})
    path.write_text("".join(f"{a:016x} T {n}\n" for n, a in sorted(rows.items(),
                                                                     key=lambda kv: kv[1])))
    return path


# ---------------------------------------------------------------- no QEMU needed
def test_profile_is_numeric_and_follows_the_live_per_cpu_vcpu_info(tmp_path: Path) -> None:
    kw = linux_profile(write_map(tmp_path / "System.map", LAB_SYMBOLS), vcpus=[0, 1],
                       domain="domu", extra=["xen_timer_interrupt"])
    assert [(p.name, p.location, p.role) for p in kw["probes"]] == [
        ("upcall", "*0xffffffff81661470", "upcall"),
        ("bottom-half", "*0xffffffff81665110", "bottom-half"),
        ("block", "*0xffffffff81027750", "block"),
        ("xen_timer_interrupt", "*0xffffffff8101e8e0", "other")]
    assert kw["shared_info"] == "*(unsigned long *)0xffffffff82a25f00"
    assert kw["vcpu_info"] == {0: "$xr_u64($xr_u64(0xffffffff8241cb60) + 0x1e0e0)",
                               1: "$xr_u64($xr_u64(0xffffffff8241cb68) + 0x1e0e0)"}
    assert kw["extra_gdb_commands"] == [f"source {GDB_HELPERS}"]
    s = LinuxSymbols.load(tmp_path / "System.map")
    assert s.vcpu_info_expr(1) == (
        "*(unsigned long *)(*(unsigned long *)0xffffffff8241cb68 + 0x1e0e0)")
    assert linux_profile(s, shared_info_va=0xFFFFFFFFFF57C000)["shared_info"] == (
        "0xffffffffff57c000")
    assert kw["reeval_vcpu_info"] is True and kw["vcpus"] == [0, 1]
    assert kw["filter"] == "(*(unsigned int *)0xffffffff8241b1c8 & 2) == 0"
    assert kw["gdb_arch"] == "i386:x86-64" and kw["dedupe"] is True
    options = RecordOptions(output=tmp_path / "x.xrr", **kw)  # every key is a field
    assert options.filter == kw["filter"]


def test_profile_prefers_the_pre_6_6_upcall_worker(tmp_path: Path) -> None:
    syms = dict(LAB_SYMBOLS, __xen_evtchn_do_upcall=0xFFFFFFFF81661000,
                xen_hvm_evtchn_do_upcall=0xFFFFFFFF81662000)
    s = LinuxSymbols.load(write_map(tmp_path / "m", syms))
    assert (s.upcall_name, s.upcall) == ("__xen_evtchn_do_upcall", 0xFFFFFFFF81661000)
    del syms["__xen_evtchn_do_upcall"], syms["xen_evtchn_do_upcall"]
    s = LinuxSymbols.load(write_map(tmp_path / "m", syms))
    assert s.upcall_name == "xen_hvm_evtchn_do_upcall"


def test_map_without_the_event_symbols_names_what_is_missing(tmp_path: Path) -> None:
    syms = {k: v for k, v in LAB_SYMBOLS.items()
            if k not in ("evtchn_2l_handle_events", "xen_vcpu")}
    with pytest.raises(XReplayError, match="lacks evtchn_2l_handle_events, xen_vcpu"):
        LinuxSymbols.load(write_map(tmp_path / "m", syms))
    with pytest.raises(XReplayError, match="lacks nosuch"):
        linux_profile(write_map(tmp_path / "m", LAB_SYMBOLS), extra=["nosuch"])


def test_debian_stub_map_and_32_bit_maps_are_refused(tmp_path: Path) -> None:
    stub = tmp_path / "System.map-6.1.0-56-amd64"
    stub.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg"
                    " package\n")
    with pytest.raises(XReplayError, match="-dbg package.*kallsyms"):
        LinuxSymbols.load(stub)
    low = {k: v & 0xFFFFFFFF for k, v in LAB_SYMBOLS.items()}
    with pytest.raises(XReplayError, match="only x86_64"):
        LinuxSymbols.load(write_map(tmp_path / "m32", low))
    with pytest.raises(XReplayError, match="cannot read"):
        LinuxSymbols.load(tmp_path / "absent")


def test_kallsyms_module_symbols_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text("ffffffff82a25f00 D HYPERVISOR_shared_info\n"
                    "ffffffffc0001000 t evtchn_2l_handle_events\t[fake_mod]\n"
                    "ffffffff81665110 t evtchn_2l_handle_events\n")
    assert read_system_map(path) == {"HYPERVISOR_shared_info": 0xFFFFFFFF82A25F00,
                                     "evtchn_2l_handle_events": 0xFFFFFFFF81665110}


def test_domain_filters(tmp_path: Path) -> None:
    s = LinuxSymbols.load(write_map(tmp_path / "m", LAB_SYMBOLS))
    assert s.domain_filter("dom0") == "(*(unsigned int *)0xffffffff8241b1c8 & 2) != 0"
    assert s.domain_filter("domu", shared_info_ma=0x7FBB7000).endswith(
        "*(unsigned long *)(*(unsigned long *)0xffffffff833190c0 + 0x28) == 0x7fbb7000")
    with pytest.raises(XReplayError, match="dom0 or domu"):
        s.domain_filter("domU2")
    no_flags = {k: v for k, v in LAB_SYMBOLS.items() if k != "xen_start_flags"}
    s = LinuxSymbols.load(write_map(tmp_path / "m", no_flags))
    assert linux_profile(s)["filter"] is None
    with pytest.raises(XReplayError, match="cannot tell dom0"):
        linux_profile(s, domain="domu")


def test_apply_cli_keeps_what_the_user_gave(tmp_path: Path) -> None:
    user = RecordOptions(
        output=tmp_path / "x.xrr", probes=[ProbeSpec("upcall", "*0x1234", "upcall"),
                                           ProbeSpec("mine", "*0x5678", "other")],
        vcpu_info={1: "my_vcpu_info"}, vcpus=[0, 1], labels={3: "tick"}, dedupe=False)
    facts = apply_cli(user, write_map(tmp_path / "m", LAB_SYMBOLS), domain="domu",
                      dedupe=False)
    assert facts is None  # no target: nothing to check
    assert [p.name for p in user.probes] == ["bottom-half", "block", "upcall", "mine"]
    assert user.probes[2].location == "*0x1234"
    assert user.vcpu_info[1] == "my_vcpu_info" and "0x1e0e0" in user.vcpu_info[0]
    assert user.labels == {3: "tick"} and user.dedupe is False and user.reeval_vcpu_info


def test_apply_merges_the_guests_labels_under_the_users(tmp_path: Path) -> None:
    facts = GuestFacts(abi="2l", domain_type="pv", start_flags=0x8, shared_info_va=0,
                       shared_info_ma=0x7FBB7000, store_evtchn=1, console_evtchn=2)
    options = apply(RecordOptions(output=tmp_path / "x.xrr", labels={2: "hvc"}),
                    write_map(tmp_path / "m", LAB_SYMBOLS), facts=facts)
    assert options.labels == {1: "xenstore", 2: "hvc"}
    assert options.delivery == {"mechanism": "pv-callback", "block": "schedop_block"}
    dom0 = GuestFacts(abi="2l", domain_type="pv", start_flags=0x30B, shared_info_va=0,
                      shared_info_ma=None, store_evtchn=1, console_evtchn=0)
    assert dom0.labels() == {} and dom0.is_dom0


def test_lsevtchn_and_q_parsers() -> None:
    bindings = parse_lsevtchn(
        "   1: VCPU 0: Interdomain (Connected) - Remote Domain 0, Port 18\n"
        "   3: VCPU 0: Virtual IRQ 0\n   4: VCPU 1: IPI\n   9: VCPU 0: Physical IRQ 9\n"
        "garbage\n")
    assert {p: (b.vcpu, b.label) for p, b in bindings.items()} == {
        1: (0, "dom0:18"), 3: (0, "VIRQ_TIMER"), 4: (1, "IPI"), 9: (0, "Physical IRQ 9")}
    assert bindings[3].virq == VIRQ_TIMER
    facts = GuestFacts(abi="2l", domain_type="pv", start_flags=0x8, shared_info_va=0,
                       shared_info_ma=None, store_evtchn=1, console_evtchn=2)
    assert port_labels(bindings, facts)[1] == "xenstore"
    q = ("(XEN) VCPU information and callbacks for domain 0:\n"
         "(XEN)     VCPU0: CPU0 [has=T] poll=0 upcall_pend=01 upcall_mask=00 dirty_cpu=0\n"
         "(XEN) General information for domain 1:\n"
         "(XEN) VCPU information and callbacks for domain 1:\n"
         "(XEN)   UNIT0 affinities: hard={0-1} soft={0-1}\n"
         "(XEN)     VCPU0: CPU1 [has=F] poll=0 upcall_pend=00 upcall_mask=01 \n"
         "(XEN) Notifying guest 1:0 (virq 1, port 6)\n")
    assert parse_q_vcpus(q, 1) == {0: (0, 1)}
    assert parse_q_vcpus(q, 0) == {0: (1, 0)}
    assert parse_q_vcpus(q, 7) == {}


# ---------------------------------------------------------------- the booted lab
@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    yield from boot_xen_lab(tmp_path_factory, "xenlab-record")


@pytest.fixture(scope="module")
def recorded(lab: Lab, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("rec") / "domu.xrr"
    result, facts = record_lab(lab, path, count=300)
    print(f"recorded {result.snapshots} in {result.elapsed:.2f} s ({result.rate:.0f}/s), "
          f"{result.foreign} foreign, {result.duplicates} duplicates")
    return result, facts, path


@pytest.mark.xenlab
def test_the_domu_is_a_2level_pv_guest(lab: Lab, recorded) -> None:
    _, facts, _ = recorded
    assert (facts.abi, facts.domain_type, facts.is_dom0) == ("2l", "pv", False)
    assert facts.shared_info_va == 0xFFFFFFFFFF57C000  # the fixmap slot
    assert facts.shared_info_ma is not None and facts.shared_info_ma % 4096 == 0
    # per-cpu copy, not shared_info->vcpu_info[0]: in the direct map, at xen_vcpu_info
    assert facts.vcpu_info_va[0] & 0xFFFFF == 0x313C0 and facts.vcpu_info_va[0] >> 47
    assert facts.labels() == {1: "xenstore", 2: "console"}


@pytest.mark.xenlab
def test_recording_shows_a_linux_2level_guest_at_work(recorded) -> None:
    result, _, path = recorded
    assert result.reason == "count" and result.snapshots == 300
    with XrrReader(path) as reader:
        labels = reader.header.labels
        assert reader.header.notify == {p: 0 for p in labels}  # lsevtchn: all on VCPU 0
        timer = next(p for p, name in labels.items() if name == "VIRQ_TIMER")
        snaps = list(reader.snapshots())
    by_probe: dict[str, list] = {}
    for s in snaps:
        by_probe.setdefault(s.probe, []).append(s)
    ups, bhs, ticks = by_probe["upcall"], by_probe["bottom-half"], by_probe["xen_timer_interrupt"]
    assert len(ups) >= 30 and len(bhs) >= 30 and len(ticks) >= 30, {
        k: len(v) for k, v in by_probe.items()}

    def share(items, pred) -> float:
        return sum(1 for s in items if pred(s)) / len(items)

    live = [s.vcpus[0] for s in snaps]
    assert all(v.source == "registered" for v in live)
    # the guest's own vCPU id (xen_vcpu_id), not QEMU's physical CPU (the domU may run on 1)
    assert {s.vcpu for s in snaps} == {0}
    # Xen raised the upcall: evtchn_upcall_pending and selector word 0 set at entry...
    assert share(ups, lambda s: s.vcpus[0].evtchn_upcall_pending == 1) >= 0.9
    assert share(ups, lambda s: s.vcpus[0].evtchn_pending_sel & 1) >= 0.9
    # ... the upcall loop cleared evtchn_upcall_pending before the bottom half ...
    assert share(bhs, lambda s: s.vcpus[0].evtchn_upcall_pending == 0) >= 0.8
    # ... and the timer handler runs after Linux acked (cleared) VIRQ_TIMER.
    assert share(ticks, lambda s: not s.is_pending(timer)) >= 0.8
    assert share(ups, lambda s: s.is_pending(timer)) >= 0.5  # the timer drives this guest
    edges = {"timer 1->0": 0, "timer 0->1": 0, "upcall_pending 0->1": 0,
             "upcall_pending 1->0": 0, "sel 1->0": 0}
    for a, b in zip(snaps, snaps[1:], strict=False):
        pa, pb = a.is_pending(timer), b.is_pending(timer)
        ua, ub = a.vcpus[0].evtchn_upcall_pending, b.vcpus[0].evtchn_upcall_pending
        edges["timer 1->0"] += pa and not pb
        edges["timer 0->1"] += pb and not pa
        edges["upcall_pending 0->1"] += ub > ua
        edges["upcall_pending 1->0"] += ua > ub
        edges["sel 1->0"] += bool(a.vcpus[0].evtchn_pending_sel & ~b.vcpus[0].evtchn_pending_sel)
    assert min(edges.values()) >= 5, edges
    # Only the domU's ports: the guest unmasks exactly what it bound (lsevtchn: 1..8 here).
    unmasked = {p for s in snaps for p in range(1, 64) if not s.is_masked(p)}
    assert labels.keys() <= unmasked | {0} and max(unmasked) < 64


@pytest.mark.xenlab
def test_replay_finds_no_lost_delivery_in_a_healthy_linux_guest(recorded) -> None:
    replay_mod = pytest.importorskip("xreplay.replay")
    _, _, path = recorded
    result = replay_mod.replay(path)
    bugs = [f for f in result.findings
            if f.kind in ("missed-clear", "stranded-port", "lost-pending", "abi-violation")]
    assert not bugs, [f.message for f in bugs]


@pytest.mark.xenlab
def test_shared_info_vcpu_info_copy_is_stale_for_pv_linux(recorded) -> None:
    """Why the profile follows per_cpu(xen_vcpu): Xen no longer updates the legacy copy."""
    _, _, path = recorded
    dec = SnapshotDecoder("x86_64")
    legacy, live = set(), set()
    with XrrReader(path) as reader:
        for rec in reader.records():
            shared, vinfo = rec.regions[0], rec.regions[1]
            assert shared is not None and vinfo is not None
            old = dec.vcpu_state(0, dec.embedded_vcpu_info(shared, 0) or b"", "shared_info")
            new = dec.vcpu_state(0, vinfo, "registered")
            legacy.add((old.evtchn_upcall_pending, old.evtchn_pending_sel))
            live.add((new.evtchn_upcall_pending, new.evtchn_pending_sel))
    assert len(legacy) == 1 and len(live) >= 3, (legacy, live)


@pytest.mark.xenlab
def test_foreign_hits_are_counted_not_recorded(recorded) -> None:
    result, _, path = recorded
    assert result.foreign > 0  # dom0 runs the same kernel addresses on the same stub
    with XrrReader(path) as reader:
        assert len(list(reader.records())) == result.snapshots
        assert reader.trailer is not None and reader.trailer["foreign"] == result.foreign


@pytest.mark.xenlab
def test_paused_domu_agrees_with_xens_e_and_q_keys(lab: Lab, recorded, tmp_path: Path) -> None:
    _, facts, _ = recorded
    check = cross_check(lab, facts=facts, output=tmp_path / "paused.xrr", progress=print)
    print(check.report())
    assert check.agrees, check.report()
    assert [p.port for p in check.dump.ports] == list(range(1, 9))
    assert check.dump.abi == "2l"
    assert {p.port for p in check.ports} == {p.port for p in check.dump.ports}
    assert check.xen_vcpus.keys() == {0}
    # The legacy copy would have given the wrong 's' column whenever the live one has a
    # selector bit (the check catches a recorder that reads the wrong vcpu_info).
    live_sel = check.snapshot.vcpus[0].evtchn_pending_sel
    if live_sel != check.stale_vcpu_info[0].evtchn_pending_sel:
        stale = check.snapshot
        stale.vcpus = dict(check.stale_vcpu_info)
        assert compare(check.dump, stale.port_table([p.port for p in check.dump.ports]))
    with XrrReader(tmp_path / "paused.xrr") as reader:
        (snap,) = list(reader.snapshots())
        assert [n.data["event"] for n in reader.notes] == ["xen-e-dump"]
    assert not compare(check.dump, snap.port_table([p.port for p in check.dump.ports]))


@pytest.mark.xenlab
def test_lab_cli_records_and_cross_checks(lab: Lab, tmp_path: Path) -> None:
    runner = CliRunner()
    run_dir = str(lab.serial_log.parent)
    out = tmp_path / "cli.xrr"
    res = runner.invoke(lab_group, ["record", "--run-dir", run_dir, "--count", "60",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "60 snapshots" in res.output and "pv guest on the 2l ABI" in res.output
    with XrrReader(out) as reader:
        assert len(list(reader.snapshots())) == 60
    res = runner.invoke(lab_group, ["crosscheck", "--run-dir", run_dir, "--json"])
    assert res.exit_code == 0, res.output
    assert '"agrees": true' in res.output


@pytest.mark.xenlab
def test_record_cli_with_symbols(lab: Lab, tmp_path: Path) -> None:
    from xreplay.cli import main

    out = tmp_path / "sym.xrr"
    res = CliRunner().invoke(main, ["record", "--target", lab.gdb_address, "--symbols",
                                    str(lab.symbol_map), "--domain", "domu", "--count", "50",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    with XrrReader(out) as reader:
        snaps = list(reader.snapshots())
    assert len(snaps) == 50 and {s.probe for s in snaps} >= {"upcall", "bottom-half"}
    assert all(s.vcpus[0].source == "registered" for s in snaps)


@pytest.mark.xenlab
def test_hits_of_two_domains_are_refused_not_mixed(lab: Lab, tmp_path: Path) -> None:
    """No --domain on QEMU's whole-machine stub: dom0's and the domU's hits would mix
    into one recording (and a false abi-violation); the recorder stops and says so."""
    from xreplay.cli import main

    out = tmp_path / "mixed.xrr"
    res = CliRunner().invoke(main, ["record", "--target", lab.gdb_address, "--symbols",
                                    str(lab.symbol_map), "--no-guest-check", "--duration",
                                    "60", "-o", str(out)])
    assert res.exit_code == 6, res.output
    assert "hits of more than one domain" in res.output and "--domain" in res.output
    with XrrReader(out) as reader:
        n = len(list(reader.records()))
        assert reader.trailer is not None and reader.trailer["reason"] == "mixed-domains"
    assert n >= 2


@pytest.mark.xenlab
def test_a_fifo_guest_is_refused(lab: Lab) -> None:
    """A second domU without xen.fifo_events=0 (Linux's default ABI is FIFO)."""
    domid = lab.domid
    cfg = ("sed -e 's/name = \"domu\"/name = \"domufifo\"/' -e 's/ xen.fifo_events=0//' "
           "/domu/pv.cfg > /tmp/fifo.cfg")
    lab.dom0(f"{cfg} && xl pause {domid} && xl create /tmp/fifo.cfg", timeout=120)
    try:
        # the 2-level domU is paused, so every domU hit is the FIFO guest's
        with pytest.raises(XReplayError, match="FIFO event-channel ABI.*xen.fifo_events=0"):
            inspect_guest(lab.gdb_address, LinuxSymbols.load(lab.symbol_map), "domu",
                          timeout=90)
        fifo_id = int(lab.dom0("xl domid domufifo").strip())
        dumps = latest(parse(lab.dom0("xl debug-keys e && xl dmesg"), "xl dmesg"))
        assert dumps[fifo_id].abi == "fifo"  # Xen agrees: the s column is FIFO's
        assert dumps[domid].abi == "2l"
    finally:
        lab.dom0(f"xl destroy domufifo; xl unpause {domid}", timeout=60, check=False)
    assert "domufifo" not in lab.dom0("xl list")
    assert read_system_map(lab.symbol_map)["evtchn_ops_fifo"]
    assert parse_lsevtchn(lab.dom0(f"lsevtchn {domid}"))
