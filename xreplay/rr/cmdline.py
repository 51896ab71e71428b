"""QEMU command lines for record/replay: what is refused, what is added, what is rewritten.

QEMU's record/replay (docs/devel/replay.rst) is deterministic only under TCG with
``-icount``, with the same command line on record and replay, and with every source of
non-determinism routed through its log: disks through the ``blkreplay`` driver, network
backends through a ``filter-replay`` object.  A command line that cannot meet that is
refused with one line naming the option and what to do instead; network backends get
their ``filter-replay`` added.  On top of ``../shared/qemu-rr.md``'s measurements on QEMU
7.2: ``sleep=off`` with ``rr=`` hangs, and a debugger in the recording (``-gdb``/``-s``)
is what this mode exists to avoid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from xreplay.errors import XReplayError

DEFAULT_SHIFT = "4"

# QEMU options that take no argument (qemu-options.hx); every other option takes one.
_NO_ARG = {
    "s", "S", "enable-kvm", "nographic", "no-reboot", "no-shutdown", "snapshot", "daemonize",
    "nodefaults", "no-user-config", "no-hpet", "no-acpi", "usb", "full-screen", "singlestep",
    "version", "help", "no-fd-bootchk", "win2k-hack", "preconfig", "only-migratable",
    "no-quit", "semihosting", "old-param", "enable-fips", "alt-grab", "ctrl-grab",
    "no-frame", "rtc-td-hack", "no-kvm", "no-kvm-irqchip", "no-kvm-pit",
    "no-kvm-pit-reinjection", "enable-sync-profile",
}
_DISK = {"drive", "blockdev", "hda", "hdb", "hdc", "hdd", "cdrom", "fda", "fdb", "sd",
         "mtdblock", "pflash"}
_IMAGES = ("kernel", "initrd", "bios", "dtb")


@dataclass
class Opt:
    """One option of a QEMU command line: ``-name value`` (value None for flags)."""

    name: str  # without leading dashes
    value: str | None
    spelling: str  # as written: "-kernel" or "--kernel"


def parse(argv: list[str]) -> list[Opt]:
    """The options of ``argv[1:]`` (argv[0] is the QEMU binary). A lone word is QEMU's
    legacy disk image argument (``qemu IMAGE``), kept as option ``hda``."""
    out: list[Opt] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-") or a == "-":
            out.append(Opt("hda", a, a))
            i += 1
            continue
        name = a.lstrip("-")
        if name in _NO_ARG:
            out.append(Opt(name, None, a))
            i += 1
            continue
        if i + 1 >= len(argv):
            raise XReplayError(f"QEMU option {a} needs an argument")
        out.append(Opt(name, argv[i + 1], a))
        i += 2
    return out


def unparse(binary: str, opts: list[Opt]) -> list[str]:
    argv = [binary]
    for o in opts:
        if o.spelling == o.value:  # a legacy positional image
            argv.append(o.value)
            continue
        argv.append(o.spelling)
        if o.value is not None:
            argv.append(o.value)
    return argv


def _keys(value: str) -> dict[str, str]:
    """``a=1,b,c=2`` -> {a: 1, b: "", c: 2} (QEMU's ``,,`` escapes are not expected here)."""
    out = {}
    for part in value.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip()
    return out


def _refuse(opt: str, why: str) -> XReplayError:
    return XReplayError(f"QEMU option {opt} cannot be recorded: {why}")


def check(argv: list[str]) -> list[Opt]:
    """Parse and refuse what breaks determinism or replay; returns the parsed options."""
    if not argv:
        raise XReplayError("no QEMU command line: write 'xreplay rr record -o RUN.rr -- "
                           "qemu-system-x86_64 ARGS...'")
    if not os.path.basename(argv[0]).startswith("qemu-system-"):
        raise XReplayError(f"{argv[0]}: not a qemu-system-* binary; record/replay here is "
                           "QEMU's (write -- qemu-system-x86_64 ARGS...)")
    opts = parse(argv)
    for o in opts:
        n, v = o.name, o.value or ""
        if n in ("enable-kvm", "no-kvm-irqchip"):
            raise _refuse(o.spelling, "record/replay needs TCG; drop it (or use -accel tcg)")
        if n == "accel" and v.split(",")[0] != "tcg":
            raise _refuse(f"{o.spelling} {v}", "record/replay needs TCG; use -accel tcg")
        if n in ("machine", "M") and "accel" in _keys(v) and \
                not all(a == "tcg" for a in _keys(v)["accel"].split(":")):
            raise _refuse(f"{o.spelling} {v}", "record/replay needs TCG; use accel=tcg")
        if n == "cpu" and v.split(",")[0] == "host":
            raise _refuse(f"{o.spelling} {v}", "-cpu host needs KVM; use -cpu max or a named "
                          "model")
        if n in ("gdb", "s"):
            raise _refuse(o.spelling, "the recording runs without a debugger (that is the "
                          "point); attach on the replay: xreplay record --from-rr RUN.rr")
        if n == "S":
            raise _refuse(o.spelling, "the recording starts the guest at once; drop it")
        if n == "daemonize":
            raise _refuse(o.spelling, "xreplay must own the QEMU process; drop it")
        if n in ("incoming", "loadvm"):
            raise _refuse(o.spelling, "a recording starts from power-on; boot the guest "
                          "fresh")
        if n == "icount":
            keys = _keys(v if "=" in v else f"shift={v}")
            if keys.get("sleep") == "off":
                raise _refuse(f"{o.spelling} {v}", "sleep=off with rr= hangs QEMU 7.2 "
                              "(measured); drop sleep=off")
            if "rr" in keys or "rrfile" in keys or "rrsnapshot" in keys:
                raise _refuse(f"{o.spelling} {v}", "xreplay adds rr=record,rrfile=... "
                              "itself; give at most -icount shift=N")
        if n in _DISK:
            raise _refuse(o.spelling, "disk images need QEMU's blkreplay driver, which "
                          "xreplay does not set up; boot with -kernel/-initrd (an initramfs)")
        if n == "nic" and v.split(",")[0] != "none":
            raise _refuse(f"{o.spelling} {v}", "write it as -netdev TYPE,id=ID plus -device "
                          "(each -netdev gets QEMU's filter-replay), or -nic none")
        if n == "net" and v.split(",")[0] != "none":
            raise _refuse(f"{o.spelling} {v}", "write it as -netdev TYPE,id=ID plus -device "
                          "(each -netdev gets QEMU's filter-replay), or -net none")
        if n == "smp" and _cpus(v) > 1:
            raise _refuse(f"{o.spelling} {v}", "QEMU 7.2's record/replay refuses more than one "
                          "vCPU ('not supported for smp'); use -smp 1 (a Xen guest may still "
                          "have several vCPUs, time-sliced by Xen)")
        if n == "netdev" and not _keys(v).get("id"):
            raise _refuse(f"{o.spelling} {v}", "give the netdev an id=")
    return opts


def _cpus(value: str) -> int:
    """CPUs of an ``-smp`` value: ``N``, ``cpus=N``, or sockets*dies*cores*threads."""
    keys = _keys(value if "=" in value.split(",")[0] else f"cpus={value}")
    try:
        if keys.get("cpus"):
            return int(keys["cpus"])
        n = 1
        for k in ("sockets", "dies", "clusters", "cores", "threads"):
            n *= int(keys.get(k) or 1)
        return n
    except ValueError:
        return 1  # QEMU itself rejects it


def icount_shift(opts: list[Opt], default: str = DEFAULT_SHIFT) -> tuple[str, str]:
    """(shift, the user's other -icount keys as ``,k=v...``) from the command line."""
    for o in opts:
        if o.name == "icount":
            v = o.value or ""
            keys = _keys(v if "=" in v else f"shift={v}")
            shift = keys.pop("shift", default) or default
            rest = "".join(f",{k}={val}" if val else f",{k}" for k, val in keys.items() if k)
            return shift, rest
    return default, ""


def _icount(opts: list[Opt], mode: str, rrfile: Path, shift: str | None) -> list[Opt]:
    user_shift, rest = icount_shift(opts)
    value = f"shift={shift or user_shift}{rest},rr={mode},rrfile={rrfile}"
    out = [o for o in opts if o.name != "icount"]
    filters = [Opt("object", f"filter-replay,id=xreplay-rr{i},netdev={_keys(o.value or '')['id']}",
                   "-object")
               for i, o in enumerate(x for x in opts if x.name == "netdev")]
    return [*out, Opt("icount", value, "-icount"), *filters]


def record_argv(argv: list[str], rrfile: Path, qmp_socket: Path,
                shift: str | None = None) -> list[str]:
    """The user's line + ``-icount shift=N,rr=record,rrfile=`` + a QMP socket for xreplay
    (to read the final instruction count and quit cleanly, which flushes the log)."""
    opts = _icount(check(argv), "record", rrfile, shift)
    opts.append(Opt("qmp", f"unix:{qmp_socket},server=on,wait=off", "-qmp"))
    return unparse(argv[0], opts)


def replay_argv(argv: list[str], rrfile: Path, shift: str, gdb_port: int,
                out_dir: Path, tag: str = "replay") -> list[str]:
    """The same line with ``rr=replay``, frozen (``-S``) on a gdbstub at 127.0.0.1:port.

    Output files of the recording (``-serial file:``, file chardevs, chardev logfiles) are
    redirected into ``out_dir`` so a replay never overwrites what the recording wrote.
    """
    opts = _icount(check(argv), "replay", rrfile, shift)
    n = 0

    def redirect() -> str:
        nonlocal n
        n += 1
        return str(out_dir / f"{tag}-out{n}.log")

    for o in opts:
        if o.name == "serial" and o.value and o.value.startswith("file:"):
            o.value = "file:" + redirect()
        elif o.name == "chardev" and o.value:
            parts = o.value.split(",")
            kind = parts[0]
            for i, part in enumerate(parts):
                if part.startswith("logfile=") or (kind == "file" and part.startswith("path=")):
                    parts[i] = part.split("=", 1)[0] + "=" + redirect()
            o.value = ",".join(parts)
    opts += [Opt("gdb", f"tcp:127.0.0.1:{gdb_port}", "-gdb"), Opt("S", None, "-S")]
    return unparse(argv[0], opts)


def image_paths(opts: list[Opt], cwd: Path) -> list[tuple[str, Path]]:
    """(option, absolute path) of each file the guest boots from."""
    out: list[tuple[str, Path]] = []
    for o in opts:
        if o.name not in _IMAGES or not o.value:
            continue
        # -initrd for multiboot kernels: "mod1 args,mod2 args" (",," escapes a comma)
        values = re.split(r"(?<!,),(?!,)", o.value) if o.name == "initrd" else [o.value]
        for v in values:
            path = v.replace(",,", ",").split(" ")[0] if o.name == "initrd" else v
            p = Path(path) if os.path.isabs(path) else cwd / path
            out.append((o.spelling, p))
    return out


def serial_files(opts: list[Opt], cwd: Path) -> list[Path]:
    """Files the guest's serial ports (and file chardevs/logfiles) write to."""
    out = []
    for o in opts:
        v = o.value or ""
        if o.name == "serial" and v.startswith("file:"):
            out.append(v[5:])
        elif o.name == "chardev":
            keys = _keys(v)
            if "logfile" in keys:
                out.append(keys["logfile"])
            elif v.split(",")[0] == "file" and "path" in keys:
                out.append(keys["path"])
    return [Path(p) if os.path.isabs(p) else cwd / p for p in out]


def elf_kernel(opts: list[Opt], cwd: Path) -> Path | None:
    """The ``-kernel`` image if it is an ELF (a multiboot guest with symbols): the default
    ``--elf`` of a recording taken on the replay."""
    for spelling, p in image_paths(opts, cwd):
        if spelling.lstrip("-") == "kernel":
            try:
                with open(p, "rb") as f:
                    return p if f.read(4) == b"\x7fELF" else None
            except OSError:
                return None
    return None
