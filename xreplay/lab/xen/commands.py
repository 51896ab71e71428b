"""``xreplay lab``: set up, boot, drive and stop the real-Xen lab from the shell.

A thin layer over :mod:`xreplay.lab.xen`: separate invocations meet through the run dir's
``lab.json`` (QEMU PID, ports, paths), so ``up`` can return while QEMU keeps running.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from xreplay.errors import XReplayError
from xreplay.lab.pvh import VARIANTS as PVH_VARIANTS
from xreplay.lab.xen.lab import (
    DOMU_KINDS,
    MAX_DOMU_VCPUS,
    STATE_FILE,
    STUB_KINDS,
    TCG_THREADS,
    Lab,
    LabState,
    default_run_dir,
)
from xreplay.lab.xen.stage import setup as stage_setup

_run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the lab keeps its state, logs and symbol map "
    "[default: $XREPLAY_LAB_DIR or <cache>/run].",
)
_cache_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where Xen and the kernel are extracted [default: $XREPLAY_CACHE/xenlab "
    "or ~/.cache/xreplay/xenlab].",
)


def _say(msg: str) -> None:
    click.echo(f"lab: {msg}", err=True)


@click.group("lab")
def lab() -> None:
    """A real Xen 4.17 lab (Xen + PV dom0 + PV/PVH Linux domU) under QEMU TCG.

    QEMU's gdbstub sees the whole machine: breakpoints on guest kernel addresses fire in
    dom0 and in the domU. dom0 commands (`lab exec`) need the machine running, not
    stopped in gdb.
    """


@lab.command("setup")
@_cache_option
@click.option("--refresh", is_flag=True, help="Download and extract again even if cached.")
@click.option(
    "--no-install", is_flag=True, help="Fail instead of apt-get installing missing host tools."
)
@click.option("--stub", type=click.Choice(STUB_KINDS), default="qemu", show_default=True,
              help="gdbsx: also build (once, cached) Xen with CONFIG_GDBSX from Debian's "
              "Xen source, for `lab up --stub gdbsx`.")
def setup_cmd(cache_dir: Path | None, refresh: bool, no_install: bool, stub: str) -> None:
    """Install host tools; download and extract Debian's Xen 4.17 and kernel (cached)."""
    t0 = time.monotonic()
    stage = stage_setup(cache_dir, refresh=refresh, install_tools=not no_install, progress=_say)
    click.echo(f"stage {stage.cache_dir} kernel {stage.kver} ({time.monotonic() - t0:.1f} s)")
    if stub == "gdbsx":
        from xreplay.lab.xen.hypervisor import ensure

        xen = ensure(stage, progress=_say, install_tools=not no_install, refresh=refresh)
        click.echo(f"gdbsx hypervisor {xen.image} (Xen source {xen.source_version}, "
                   f"build {xen.digest})")
        from xreplay.lab.xen.gdbsx_build import ensure as ensure_gdbsx

        try:
            tool = ensure_gdbsx(stage, progress=_say)
            click.echo(f"the project's gdbsx {tool.binary}")
        except XReplayError as exc:  # Debian's gdbsx is the fallback: say so, go on
            click.echo(f"the project's gdbsx was not built ({exc}); Debian's will be used")


@lab.command("up")
@_run_dir_option
@_cache_option
@click.option(
    "--domu",
    type=click.Choice(DOMU_KINDS),
    default="pv",
    show_default=True,
    help="Guest to create next to dom0 (pvh: gdbstub cannot read its memory under TCG).",
)
@click.option("--domu-vcpus", type=click.IntRange(1, MAX_DOMU_VCPUS), default=1,
              show_default=True, help="vCPUs of the domU (dom0 keeps one; QEMU has two CPUs).")
@click.option("--evtchn", type=click.Choice(["2l", "fifo"]), default="2l", show_default=True,
              help="The domU's event-channel ABI: 2l boots it with xen.fifo_events=0, fifo "
                   "on Linux's default FIFO ABI.")
@click.option("--stub", type=click.Choice(STUB_KINDS), default="qemu", show_default=True,
              help="gdbsx: boot Xen built with CONFIG_GDBSX (built and cached on first use) "
              "and forward a host port to gdbsx in dom0; QEMU's stub stays available.")
@click.option("--domu-busy", is_flag=True,
              help="The domU spins a busy loop, so its tick (a timer VIRQ per 1/HZ s) never "
                   "stops: a steady event rate for measuring a stub.")
@click.option("--tcg-thread", type=click.Choice(TCG_THREADS), default="multi",
              show_default=True,
              help="QEMU's TCG threading. single: all of Xen's CPUs in one host thread, which "
                   "the PVH unikernel through gdbsx needs (multi-threaded, QEMU 7.2 has "
                   "triple-faulted it right after a detach: README, Limits).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Boot timeout (s).")
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the lab.")
@click.option("--json", "as_json", is_flag=True, help="Print the lab state as JSON.")
def up_cmd(
    run_dir: Path | None,
    cache_dir: Path | None,
    domu: str,
    domu_vcpus: int,
    evtchn: str,
    stub: str,
    domu_busy: bool,
    tcg_thread: str,
    timeout: float,
    foreground: bool,
    as_json: bool,
) -> None:
    """Boot the lab and leave it running; print the gdb address, symbol map and PID."""
    stage_setup(cache_dir, install_tools=False, progress=_say)
    the_lab = Lab(run_dir, cache_dir=cache_dir, domu=domu, domu_vcpus=domu_vcpus,
                  evtchn=evtchn, boot_timeout=timeout, progress=_say, stub=stub,
                  domu_busy=domu_busy, tcg_thread=tcg_thread)
    the_lab.start()
    st = the_lab.state
    assert st is not None
    if as_json:
        click.echo(json.dumps(_state_json(st), indent=2))
    else:
        _print_state(st)
    if foreground:
        try:
            while the_lab.running():
                time.sleep(1)
            _say("QEMU exited")
        except KeyboardInterrupt:
            _say("stopping")
        finally:
            the_lab.stop()


def _state_json(st: LabState) -> dict[str, object]:
    """The state file's fields, plus ``gdbsx_address`` for a lab booted with gdbsx."""
    out: dict[str, object] = asdict(st)
    out["gdbsx_address"] = (f"127.0.0.1:{st.gdbsx_port}"
                            if st.stub == "gdbsx" and st.gdbsx_port else None)
    return out


def _print_state(st: LabState) -> None:
    rd = st.run_dir
    default = Path(rd) == default_run_dir().resolve()
    down = "xreplay lab down" + ("" if default else f" --run-dir {rd}")
    rows = [
        ("gdbstub", f"127.0.0.1:{st.gdb_port}  (gdb -ex 'set architecture i386:x86-64' "
                    f"-ex 'target remote 127.0.0.1:{st.gdb_port}')"),
        *([("gdbsx", f"127.0.0.1:{st.gdbsx_port}  (one gdb session per gdbsx: "
                     "`xreplay lab gdbsx` starts one; it exits when gdb detaches)")]
          if st.stub == "gdbsx" else []),
        ("symbol map", st.symbol_map or "-"),
        ("QEMU pid", f"{st.pid}  (stop: {down}, or kill {st.pid})"),
        ("domU", f"domid {st.domid} ({st.domu}, {st.domu_vcpus} vCPU"
                 f"{'s' if st.domu_vcpus > 1 else ''}, {st.domu_evtchn} event channels"
                 f"{', busy' if st.domu_busy else ''})"
                 if st.domid is not None else st.domu),
        ("dom0 shell", "xreplay lab exec 'xl list'  (needs the machine running, not in gdb)"),
        ("serial log", st.serial_log),
        ("serial in", f"{st.serial_socket}  (unix socket: Xen's console, input goes to dom0)"),
        ("timings", ", ".join(f"{k} {v:.1f} s" for k, v in st.timings.items())),
    ]
    for key, val in rows:
        click.echo(f"{key:<11} {val}")


@lab.command("exec")
@_run_dir_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds.")
@click.argument("command")
def exec_cmd(run_dir: Path | None, timeout: float, command: str) -> None:
    """Run COMMAND in the running lab's dom0; print its output, exit with its code."""
    rc, out = Lab.attach(run_dir).dom0_run(command, timeout)
    click.echo(out, nl=False)
    sys.exit(rc)


@lab.command("status")
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the lab state as JSON.")
def status_cmd(run_dir: Path | None, as_json: bool) -> None:
    """Show the running lab's gdb address, PID and paths."""
    st = Lab.attach(run_dir).state
    assert st is not None
    if as_json:
        click.echo(json.dumps(_state_json(st), indent=2))
    else:
        _print_state(st)


@lab.command("gdbsx")
@_run_dir_option
@click.option("--domid", type=int, default=None, help="Domain to attach [default: the domU].")
def gdbsx_cmd(run_dir: Path | None, domid: int | None) -> None:
    """Start gdbsx in dom0 for one gdb session; print the host address to attach to.

    gdbsx pauses the domain until gdb attaches and exits when gdb detaches.
    """
    from xreplay.lab.xen.gdbsx import start_gdbsx

    click.echo(start_gdbsx(Lab.attach(run_dir), domid))


@lab.command("down")
@_run_dir_option
def down_cmd(run_dir: Path | None) -> None:
    """Stop the lab's QEMU by its PID (does nothing when no lab is running)."""
    rd = run_dir or default_run_dir()
    try:
        the_lab = Lab.attach(rd)
    except XReplayError as exc:
        (rd / STATE_FILE).unlink(missing_ok=True)  # stale state of a QEMU that is gone
        click.echo(f"no lab running in {rd} ({exc})")
        return
    pid = the_lab.pid
    the_lab.stop()
    click.echo(f"stopped QEMU pid {pid}")


@lab.command("record")
@_run_dir_option
@click.option("--domain", type=click.Choice(["domu", "dom0"]), default="domu",
              show_default=True, help="Which guest to record; the other's hits are skipped.")
@click.option("--count", type=click.IntRange(1), default=300, show_default=True,
              help="Stop after N snapshots.")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop after S seconds instead.")
@click.option("--no-block", "no_block", is_flag=True, help="No probe at xen_safe_halt.")
@click.option("--no-timer", "no_timer", is_flag=True,
              help="No probe at xen_timer_interrupt (where Linux has cleared VIRQ_TIMER).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Recording file to write.")
@click.option("--stub", type=click.Choice(STUB_KINDS), default=None,
              help="Record through QEMU's stub or gdbsx in dom0 [default: the one the lab "
              "was booted for (`lab up --stub`)]. gdbsx records the domU only.")
def record_cmd(run_dir: Path | None, domain: str, count: int, duration: float | None,
               no_block: bool, no_timer: bool, output: Path, stub: str | None) -> None:
    """Record a guest of the running lab (Linux profile from the lab's symbol map).

    Every vCPU of the domU is recorded (its live vcpu_info each); dom0 has one.
    """
    from xreplay.lab.xen.record import LAB_EXTRA_PROBES, record_lab

    the_lab = Lab.attach(run_dir)
    result, facts = record_lab(the_lab, output, domain=domain, block=not no_block,
                               extra=() if no_timer else LAB_EXTRA_PROBES,
                               count=None if duration else count, duration=duration,
                               stub=stub)
    click.echo(f"{result.output}: {result.snapshots} snapshots in {result.elapsed:.2f} s "
               f"({result.rate:.0f}/s), ended by {result.reason}; {result.foreign} hits in "
               f"other domains skipped, {result.duplicates} duplicate hits dropped; "
               f"{facts.domain_type} guest on the {facts.abi or '?'} ABI")


@lab.command("crosscheck")
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the paused state as a one-snapshot recording.")
@click.option("--stub", type=click.Choice(STUB_KINDS), default=None,
              help="Read the paused domU through QEMU's stub (machine addresses) or gdbsx "
              "(virtual addresses) [default: the lab's].")
def crosscheck_cmd(run_dir: Path | None, as_json: bool, output: Path | None,
                   stub: str | None) -> None:
    """Pause the domU, compare Xen's 'e'/'q' keys with its memory port by port, unpause.

    Exit status 1 when they disagree.
    """
    from xreplay.lab.xen.record import cross_check

    check = cross_check(Lab.attach(run_dir), output=output, progress=_say, stub=stub)
    if as_json:
        click.echo(json.dumps(check.to_json(), indent=2))
    else:
        click.echo(check.report())
    sys.exit(0 if check.agrees else 1)


@lab.command("demo")
@_run_dir_option
@click.option("--variant", type=click.Choice(PVH_VARIANTS),
              default="lost-upcall", show_default=True, help="Lab unikernel variant.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Recording to write [default: ./unikernel-VARIANT.xrr]; "
              "Xen's 'e' dump goes next to it as FILE.e.txt.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="End after N snapshots instead of at the hang (what `correct` needs: "
              "it does not hang) [default: 60 for variants that do not hang].")
@click.option("--keep", is_flag=True, help="Leave a lab this command booted running.")
def demo_cmd(run_dir: Path | None, variant: str, output: Path | None, count: int | None,
             keep: bool) -> None:
    """The seed's hang on the real Xen: the lab unikernel through gdbsx until it hangs.

    Boots the gdbsx lab (or uses one running in --run-dir), creates the PVH unikernel
    (xreplay/lab/pvh), records it from its first instruction, then prints Xen's 'e' dump
    for the domain next to xreplay's hang snapshot, the port-by-port cross-check and the
    replay verdict. Exit status as `xreplay replay`: 1 when a lost delivery is found.
    """
    from xreplay.lab.pvh import HANGING_VARIANTS
    from xreplay.lab.pvh.demo import demo

    if count is None and variant not in HANGING_VARIANTS:
        count = 60
    out = output or Path(f"unikernel-{variant}.xrr")
    sys.exit(demo(variant, out, run_dir=run_dir, keep=keep, count=count, progress=_say,
                  say=click.echo))
