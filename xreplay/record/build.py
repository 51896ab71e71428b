"""From what a user chose (``xreplay record``'s options) and a guest preset to
:class:`~xreplay.record.RecordOptions`: the one place that knows which choice wins.

Precedence, highest first: an option the user gave; the profile (``--profile``, or the
Linux profile that ``--symbols`` implies); what the stub needs once identified (QEMU's
architecture and de-duplication, decided in the recorder when left ``None`` here).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from xreplay.abi.fifo import MAX_EVENT_ARRAY_PAGES
from xreplay.errors import XReplayError
from xreplay.profiles.presets import preset
from xreplay.record.options import RecordOptions, WatchSpec
from xreplay.xrr import ProbeSpec

SHADOW_REGION = "shadow"


@dataclass
class RecordChoices:
    """``xreplay record``'s options as given: None (or empty) is "not given"."""

    output: Path
    target: str | None = None
    launch: str | None = None
    elf: Path | None = None
    arch: str | None = None
    profile: str | None = None
    upcall: str | None = None
    bottom_half: str | None = None
    block: str | None = None
    probes: dict[str, str] = field(default_factory=dict)
    shared_info: str | None = None
    vcpu_info: list[str] = field(default_factory=list)  # [VCPU=]EXPR
    fifo_control_block: list[str] = field(default_factory=list)  # [VCPU=]EXPR
    fifo_event_pages: list[str] = field(default_factory=list)  # EXPR per page, in order
    fifo_page_count: str | None = None  # EXPR: the guest's count of pages in use
    watch: list[str] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    notify: dict[int, int] = field(default_factory=dict)
    vcpus: str | None = None
    count: int | None = None
    duration: float | None = None
    hang_after: float | None = None
    kill_target: bool | None = None
    dedupe: bool | None = None
    qemu: bool = False
    filter: str | None = None
    vcpu_expr: str | None = None
    symbols: Path | None = None
    domain: str | None = None
    guest_check: bool = True
    gdb: str = "gdb"
    hit_loop: str = "agent"


def _vcpu_info(texts: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for text in texts:
        key, sep, expr = text.partition("=")
        if sep and key.strip().isdigit():
            out[int(key)] = expr
        else:
            out[0] = text
    return out


def _vcpu_list(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise XReplayError(f"bad --vcpus {text!r}: write e.g. 0,1") from None


def build_options(c: RecordChoices) -> RecordOptions:
    """RecordOptions for ``c``; the Linux profile's live guest check (it stops the guest
    once) runs in the recorder's gdb session, once attached, unless ``c.guest_check`` is
    False."""
    if c.launch and not c.target:
        raise XReplayError("--launch needs --target HOST:PORT (where the launched stub listens)")
    if c.domain and not c.symbols:
        raise XReplayError("--domain needs --symbols (or write the gdb expression: --filter)")
    profile = c.profile or ("linux" if c.symbols else None)
    if profile == "linux" and c.symbols is None:
        raise XReplayError("--profile linux needs --symbols System.map (or the guest's "
                           "/proc/kallsyms)")
    g = preset(profile) if profile and profile != "linux" else None
    roles = {"upcall": c.upcall or (g and g.upcall), "bottom-half": c.bottom_half
             or (g and g.bottom_half), "block": c.block or (g and g.block)}
    probes = [ProbeSpec(role, loc, role) for role, loc in roles.items() if loc]
    extra = {**(g.probes if g else {}), **c.probes}
    probes += [ProbeSpec(k, v, "other") for k, v in extra.items()]
    watch = [WatchSpec.parse(w) for w in c.watch]
    if g and g.shadow and not any(w.name == SHADOW_REGION for w in watch):
        watch.insert(0, WatchSpec(SHADOW_REGION, f"&{g.shadow}", 0))
    vinfo = _vcpu_info(c.vcpu_info)
    vcpus = _vcpu_list(c.vcpus)
    blocks = _vcpu_info(c.fifo_control_block)
    if bool(blocks) != bool(c.fifo_event_pages):
        raise XReplayError("a FIFO guest needs both --fifo-control-block (one per vCPU) and "
                           "--fifo-event-page (each event-array page in use)")
    if c.fifo_page_count and not c.fifo_event_pages:
        raise XReplayError("--fifo-page-count counts the pages --fifo-event-page names: "
                           "give both (and --fifo-control-block)")
    if len(c.fifo_event_pages) > MAX_EVENT_ARRAY_PAGES:
        raise XReplayError(f"{len(c.fifo_event_pages)} --fifo-event-page: the FIFO event "
                           f"array has at most {MAX_EVENT_ARRAY_PAGES} pages")
    options = RecordOptions(
        output=c.output, arch=c.arch, target=c.target,
        launch=shlex.split(c.launch) if c.launch else None, elf=c.elf, probes=probes,
        shared_info=c.shared_info or (g.shared_info if g else "HYPERVISOR_shared_info"),
        vcpu_info=vinfo, watch=watch, labels=dict(c.labels), notify=dict(c.notify),
        fifo_control_block=blocks, fifo_event_pages=list(c.fifo_event_pages),
        fifo_page_count=c.fifo_page_count,
        vcpus=sorted(set(vcpus or [0]) | set(vinfo) | set(blocks)), count=c.count,
        duration=c.duration,
        hang_after=c.hang_after, kill_target=c.kill_target, gdb=c.gdb, dedupe=c.dedupe,
        filter=c.filter, vcpu_expr=c.vcpu_expr, hit_loop=c.hit_loop,
        target_kind="qemu" if c.qemu else None,
        description=f"{g.name} guest ({g.summary})" if g else "")
    if profile == "linux":
        from xreplay.profiles.linux import apply_cli, check_on_attach

        assert c.symbols is not None
        kw = {"domain": c.domain, "shared_info_given": c.shared_info is not None,
              "dedupe": c.dedupe}
        if c.guest_check and c.target and not c.launch:
            # the check runs in the recorder's own gdb session: gdbsx serves only one
            check_on_attach(options, c.symbols, **kw)
        else:
            apply_cli(options, c.symbols, check=False, **kw)
        if c.arch:
            options.arch = c.arch
        if c.filter:
            options.filter = c.filter
        if c.vcpu_expr:
            options.vcpu_expr = c.vcpu_expr
    return options


def command_line(o: RecordOptions) -> str:
    """An ``xreplay record`` command that asks for what ``o`` does (to print, paste and
    adapt: the demo shows the one it ran)."""
    q = shlex.quote
    args = ["xreplay", "record"]
    if o.launch:
        args += ["--launch", q(shlex.join(o.launch))]
    if o.target:
        args += ["--target", o.target]
    if o.elf:
        args += ["--elf", q(str(o.elf))]
    if o.arch:
        args += ["--arch", o.arch]
    for p in o.probes:
        if p.role in ("upcall", "bottom-half", "block"):
            args += [f"--{p.role}", q(p.location)]
        else:
            args += ["--probe", q(f"{p.name}={p.location}")]
    args += ["--shared-info", q(o.shared_info)]
    for vcpu, expr in sorted(o.vcpu_info.items()):
        args += ["--vcpu-info", q(f"{vcpu}={expr}")]
    for vcpu, expr in sorted(o.fifo_control_block.items()):
        args += ["--fifo-control-block", q(f"{vcpu}={expr}")]
    for expr in o.fifo_event_pages:
        args += ["--fifo-event-page", q(expr)]
    if o.fifo_page_count:
        args += ["--fifo-page-count", q(o.fifo_page_count)]
    for w in o.watch:
        args += ["--watch", q(f"{w.name}={w.expr}" + (f":{w.size}" if w.size else ""))]
    args += [a for port, name in sorted(o.labels.items()) for a in ("--label", q(f"{port}={name}"))]
    args += [a for port, v in sorted(o.notify.items()) for a in ("--bind", f"{port}={v}")]
    if o.vcpus != [0]:
        args += ["--vcpus", ",".join(map(str, o.vcpus))]
    for flag, value in (("--count", o.count), ("--duration", o.duration),
                        ("--hang-after", o.hang_after), ("--filter", o.filter),
                        ("--vcpu-expr", o.vcpu_expr)):
        if value is not None:
            args += [flag, q(str(value))]
    if o.kill_target is not None:
        args.append("--kill" if o.kill_target else "--detach")
    if o.hit_loop != "agent":
        args += ["--hit-loop", o.hit_loop]
    args += ["-o", q(str(o.output))]
    return " ".join(args)
