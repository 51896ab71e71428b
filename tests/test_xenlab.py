"""The real-Xen lab: Xen 4.17 + PV dom0 + PV domU under QEMU TCG, driven from the host.

One boot per module (about 20-35 s); the whole file takes well under two minutes on two
cores once the stage is cached. Skipped, with the reason, when Debian's packages cannot be
fetched. The helper tests at the top need no QEMU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import boot_xen_lab

from xreplay.errors import XReplayError
from xreplay.lab.xen import Lab, is_dom0, kallsyms_to_system_map, read_system_map
from xreplay.lab.xen.commands import lab as lab_group
from xreplay.lab.xen.initramfs import domu_config
from xreplay.lab.xen.lab import SIF_INITDOMAIN

UPCALLS = ("xen_evtchn_do_upcall", "__xen_evtchn_do_upcall", "xen_hvm_evtchn_do_upcall")


# ---------------------------------------------------------------- no QEMU needed
def test_kallsyms_to_system_map_drops_modules_and_sorts(tmp_path: Path) -> None:
    text = (
        "ffffffff82a25f00 D HYPERVISOR_shared_info\n"
        "ffffffff81665110 t evtchn_2l_handle_events\n"
        "ffffffffc0001000 t evtchn_fops_open\t[xen_evtchn]\n"
        "000000000001e0e0 D xen_vcpu\n"
    )
    path = tmp_path / "System.map"
    path.write_text(kallsyms_to_system_map(text))
    lines = path.read_text().splitlines()
    assert lines[0] == "000000000001e0e0 D xen_vcpu"
    assert "evtchn_fops_open" not in path.read_text()
    assert read_system_map(path)["HYPERVISOR_shared_info"] == 0xFFFFFFFF82A25F00


def test_kallsyms_with_hidden_addresses_is_an_error() -> None:
    with pytest.raises(XReplayError, match="kptr_restrict"):
        kallsyms_to_system_map("0000000000000000 T _text\n0000000000000000 T _stext\n")


def test_domu_config_uses_2level_abi_and_hides_rdtscp_from_pvh() -> None:
    assert "xen.fifo_events=0" in domu_config("pv")
    assert 'type = "pvh"' in domu_config("pvh")
    assert "rdtscp=0" in domu_config("pvh") and "rdtscp" not in domu_config("pv")
    with pytest.raises(XReplayError):
        domu_config("hvm")


def test_qemu_command_uses_given_ports_not_1234(tmp_path: Path) -> None:
    cmd = " ".join(Lab(tmp_path).qemu_command(40001, 40002))
    assert "-gdb tcp:127.0.0.1:40001" in cmd and "hostfwd=tcp:127.0.0.1:40002-:7000" in cmd
    assert "smap=0" in cmd and "xen.fifo_events=0" in cmd and ":1234" not in cmd
    assert is_dom0(0x30B) and not is_dom0(0x8) and SIF_INITDOMAIN == 2
    assert "xreplay.domu_busy" not in cmd
    busy = " ".join(Lab(tmp_path, domu_busy=True).qemu_command(40001, 40002))
    assert "xreplay.domu_busy=1" in busy  # dom0_init.sh adds xreplay.busy=1 to the domU's


# ---------------------------------------------------------------- the booted lab
@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    yield from boot_xen_lab(tmp_path_factory, "xenlab")


@pytest.mark.xenlab
def test_dom0_lists_the_domu(lab: Lab) -> None:
    assert lab.domid is not None and lab.domid > 0
    rows = {line.split()[0]: line.split() for line in lab.dom0("xl list").splitlines()[1:]}
    assert "Domain-0" in rows
    assert rows["domu"][1] == str(lab.domid)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", lab.gdb_address)
    assert lab.gdb_port != 1234 and lab.pid > 0


@pytest.mark.xenlab
def test_symbol_map_has_the_event_channel_symbols(lab: Lab) -> None:
    syms = read_system_map(lab.symbol_map)
    assert lab.symbol_map.parent == lab.serial_log.parent
    for name in ("HYPERVISOR_shared_info", "evtchn_2l_handle_events", "xen_vcpu"):
        assert name in syms, name
    assert any(name in syms for name in UPCALLS)


@pytest.mark.xenlab
def test_both_guests_use_the_2level_abi(lab: Lab) -> None:
    assert "Using 2-level ABI" in lab.dom0("dmesg | grep 'xen:events'")
    console = lab.domu_console()
    assert "XREPLAY-DOMU-BANNER" in console
    assert "Using 2-level ABI" in console


@pytest.mark.xenlab
def test_xen_e_debug_key_dumps_the_domu(lab: Lab) -> None:
    out = lab.dom0("xl debug-keys e; xl dmesg")
    assert f"Event channel information for domain {lab.domid}" in out


@pytest.mark.xenlab
def test_cli_exec_and_status_find_the_running_lab(lab: Lab) -> None:
    runner = CliRunner()
    run_dir = str(lab.serial_log.parent)
    res = runner.invoke(lab_group, ["exec", "--run-dir", run_dir, f"lsevtchn {lab.domid}"])
    assert res.exit_code == 0, res.output
    assert "Virtual IRQ 0" in res.output  # the domU's VIRQ_TIMER
    res = runner.invoke(lab_group, ["exec", "--run-dir", run_dir, "exit 3"])
    assert res.exit_code == 3
    res = runner.invoke(lab_group, ["status", "--run-dir", run_dir, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["pid"] == lab.pid


@pytest.mark.xenlab
def test_gdb_breaks_in_the_2level_handler_and_reads_shared_info(
    lab: Lab, tmp_path: Path
) -> None:
    if shutil.which("gdb") is None:
        pytest.skip("gdb not installed (apt-get install gdb)")
    s = lab.symbols
    # Convenience variables get an xr_ prefix: `$si`, `$di`... would write guest registers.
    script = tmp_path / "evtchn.gdb"
    script.write_text(f"""\
set pagination off
set confirm off
set architecture i386:x86-64
target remote {lab.gdb_address}
hbreak *{s["evtchn_2l_handle_events"]:#x}
set $xr_n = 0
set $xr_dom0 = 0
set $xr_domu = 0
while $xr_n < 40 && ($xr_dom0 == 0 || $xr_domu == 0)
  continue
  set $xr_flags = *(unsigned int *){s["xen_start_flags"]:#x}
  set $xr_shinfo = *(unsigned long *){s["HYPERVISOR_shared_info"]:#x}
  set $xr_pend = *(unsigned long *)($xr_shinfo + 0x800)
  printf "XR flags=%#x shinfo=%#lx pending0=%#lx\\n", $xr_flags, $xr_shinfo, $xr_pend
  if $xr_flags & {SIF_INITDOMAIN}
    set $xr_dom0 = $xr_dom0 + 1
  else
    set $xr_domu = $xr_domu + 1
  end
  set $xr_n = $xr_n + 1
end
delete
detach
""")
    proc = subprocess.run(
        ["gdb", "-q", "-batch", "-nx", "-x", str(script)],
        capture_output=True, text=True, timeout=180,
    )
    hits = re.findall(r"XR flags=(0x[0-9a-f]+) shinfo=(0x[0-9a-f]+) pending0=(0x[0-9a-f]+|0)",
                      proc.stdout)
    assert hits, proc.stdout + proc.stderr
    for flags, shinfo, _pending in hits:
        addr = int(shinfo, 16)
        assert addr >= 0xFFFF800000000000 and addr % 4096 == 0, (flags, shinfo)
    kinds = {is_dom0(int(flags, 16)) for flags, _, _ in hits}
    assert kinds == {True, False}, f"hits only in {'dom0' if True in kinds else 'domU'}"
    # gdb detached: the machine runs again and dom0 answers
    assert "domu" in lab.dom0("xl list")
