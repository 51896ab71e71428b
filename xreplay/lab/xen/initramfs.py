"""Build the lab's two busybox-static initramfs images (domU, and dom0 embedding the domU).

Why busybox and not Debian's initramfs-tools: the images must boot in seconds under TCG,
need no root filesystem, and must carry the Xen toolstack taken from the extracted .debs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from xreplay.errors import XReplayError
from xreplay.lab.xen.stage import XEN_VERSION, Stage, find_busybox

#: Modules dom0 loads: the Xen device drivers the toolstack opens, and the NIC for hostfwd.
DOM0_MODULES = ("xen-evtchn", "xenfs", "xen-privcmd", "xen-gntdev", "xen-gntalloc", "e1000")
#: Xen tools dom0 carries (from ``usr/lib/xen-4.17/bin`` of the stage).
DOM0_XEN_TOOLS = (
    "xl",
    "xenstored",
    "xenconsoled",
    "xenconsole",
    "xen-init-dom0",
    "lsevtchn",
    "xenctx",
)
#: Tools from ``usr/sbin`` of the stage: Debian's gdbsx (xen-utils-common), Xen's
#: per-domain gdbstub, 31 KB, libc only; usable with a hypervisor built with CONFIG_GDBSX.
DOM0_USR_SBIN = ("gdbsx",)
#: Extra tools from ``usr/bin`` of the stage (``xenstore`` is the multi-call one).
DOM0_USR_BIN = ("xenstore", "xenstore-ls", "xenstore-read", "xenstore-write", "xenstore-list")

#: Linux 6.1 picks the FIFO ABI by default; the 2-level bitmaps are only used with this.
DOMU_EXTRA = "console=hvc0 quiet xen.fifo_events=0"
DOMU_MEMORY_MB = 128
DOMU_NAME = "domu"
#: Where the dom0 command server listens (inside dom0; the host reaches it by hostfwd).
DOM0_CMD_PORT = 7000


def domu_config(kind: str) -> str:
    """The ``xl`` config of the lab's domU; ``kind`` is ``pv`` or ``pvh``."""
    if kind not in ("pv", "pvh"):
        raise XReplayError(f"unknown domU type {kind!r}: use pv or pvh")
    lines = [
        f'name = "{DOMU_NAME}"',
        f'type = "{kind}"',
        'kernel = "/domu/vmlinuz"',
        'ramdisk = "/domu/initrd.gz"',
        f'extra = "{DOMU_EXTRA}"',
        f"memory = {DOMU_MEMORY_MB}",
        "vcpus = 1",  # dom0_init.sh overrides it from xreplay.domu_vcpus=N (xl key=value)
        'on_crash = "preserve"',
    ]
    if kind == "pvh":
        # TCG's emulated SVM gives Xen no NRIP for an intercepted RDTSCP: hide RDTSCP.
        lines.append('cpuid = "host,rdtscp=0"')
    return "\n".join(lines) + "\n"


def script_text(name: str) -> str:
    """One of the shell scripts shipped next to this module (``dom0_init.sh`` etc.)."""
    return resources.files("xreplay.lab.xen").joinpath(name).read_text()


class _Tree:
    """A directory being filled as an initramfs root, then packed as gzip'ed newc cpio."""

    def __init__(self, root: Path, busybox: Path) -> None:
        self.root = root
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root",
                  "lib/modules", "lib64", "lib/x86_64-linux-gnu", "usr/bin", "usr/sbin",
                  "var/run", "var/log/xen", "var/lib/xen", "var/lib/xenstored"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            link = root / "bin" / applet
            if applet != "busybox" and not link.exists():
                link.symlink_to("busybox")

    def write(self, dst: str, text: str | bytes, mode: int = 0o644) -> None:
        path = self.root / dst.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, str):
            path.write_text(text)
        else:
            path.write_bytes(text)
        path.chmod(mode)

    def copy(self, src: Path, dst: str, mode: int | None = None) -> None:
        path = self.root / dst.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        path.chmod(mode if mode is not None else src.stat().st_mode & 0o777)

    def copy_elf(self, src: Path, dst: str, lib_dirs: list[Path]) -> None:
        """Copy an executable and the shared libraries ``ldd`` resolves for it."""
        self.copy(src, dst)
        env = {"LD_LIBRARY_PATH": ":".join(str(d) for d in lib_dirs), "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(["ldd", str(src)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise XReplayError(f"ldd {src} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        for line in proc.stdout.splitlines():
            words = line.split()
            if "=>" in words:
                target = words[words.index("=>") + 1]
                if target == "not":
                    raise XReplayError(f"{src.name} needs {words[0]}, found neither in the "
                                       "stage nor on the host: install the package that has it")
            elif words and words[0].startswith("/"):
                target = words[0]  # the program interpreter (ld-linux)
            else:
                continue
            lib = Path(target)
            if not lib.is_file():
                continue
            dest = "lib64" if "ld-linux" in lib.name else "lib/x86_64-linux-gnu"
            if not (self.root / dest / lib.name).exists():
                self.copy(lib.resolve(), f"{dest}/{lib.name}", 0o755)

    def pack(self, out: Path) -> Path:
        """Write the tree as a gzip'ed newc cpio (all files owned by root)."""
        names = sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*")
        )
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "--null", "-R", "0:0"],
            cwd=self.root, input=b"\0".join(n.encode() for n in [".", *names]) + b"\0",
            capture_output=True,
        )
        if proc.returncode != 0:
            raise XReplayError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # concurrent builds don't clash
        with gzip.open(tmp, "wb", compresslevel=6) as fh:
            fh.write(proc.stdout)
        tmp.replace(out)
        return out


def _busybox() -> Path:
    bb = find_busybox()
    if bb is None:
        raise XReplayError("no static busybox: apt-get install busybox-static")
    return bb


def _modules_in_load_order(stage: Stage, names: tuple[str, ...]) -> list[str]:
    """Module paths (relative to the modules dir) with each one's deps before it."""
    dep_file = stage.modules_dir / "modules.dep"
    deps: dict[str, list[str]] = {}
    for line in dep_file.read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {}
    for mod in deps:
        base = Path(mod).name.split(".ko")[0]
        by_name[base] = mod
        by_name.setdefault(base.replace("_", "-"), mod)
    order: list[str] = []
    for name in names:
        mod = by_name.get(name)
        if mod is None:
            raise XReplayError(f"kernel module {name} not in {dep_file}")
        # modules.dep lists a module's deps so that loading them last-first works
        for m in [*reversed(deps[mod]), mod]:
            if m not in order:
                order.append(m)
    return order


def _copy_module(tree: _Tree, stage: Stage, mod: str) -> str:
    """Copy one module, decompressing ``.ko.xz``/``.ko.zst``: busybox insmod wants a ``.ko``."""
    src = stage.modules_dir / mod
    if mod.endswith(".ko"):
        tree.copy(src, f"lib/modules/{mod}", 0o644)
        return mod
    plain = mod.rsplit(".ko", 1)[0] + ".ko"
    tool = {".xz": ["xz", "-dc"], ".zst": ["zstd", "-dc"], ".gz": ["gzip", "-dc"]}
    cmd = tool.get(src.suffix)
    if cmd is None:
        raise XReplayError(f"cannot unpack kernel module {src.name}")
    data = subprocess.run([*cmd, str(src)], capture_output=True, check=True).stdout
    tree.write(f"lib/modules/{plain}", data)
    return plain


def build_domu_initramfs(out: Path) -> Path:
    """The domU image: busybox and an /init that reports its ABI and keeps events flowing."""
    with tempfile.TemporaryDirectory(prefix="xenlab-domu.") as tmp:
        tree = _Tree(Path(tmp), _busybox())
        tree.write("init", script_text("domu_init.sh"), 0o755)
        return tree.pack(out)


def build_dom0_initramfs(stage: Stage, out: Path, domu_initrd: Path) -> Path:
    """The dom0 image: toolstack, modules, command server, and the domU kernel + image."""
    with tempfile.TemporaryDirectory(prefix="xenlab-dom0.") as tmp:
        tree = _Tree(Path(tmp), _busybox())
        loaded = [_copy_module(tree, stage, m) for m in _modules_in_load_order(stage, DOM0_MODULES)]
        tree.write("lib/modules/load.order", "\n".join(loaded) + "\n")
        xbin = f"usr/lib/xen-{XEN_VERSION}/bin"
        for tool in DOM0_XEN_TOOLS:
            src = stage.xen_bin_dir / tool
            if not src.exists():
                raise XReplayError(f"{src} missing: run `xreplay lab setup --refresh`")
            tree.copy_elf(src, f"{xbin}/{tool}", stage.lib_dirs)
            (tree.root / "usr/sbin" / tool).symlink_to(f"/{xbin}/{tool}")
        for tool in DOM0_USR_SBIN:
            src = stage.root / "usr" / "sbin" / tool
            if src.exists():
                tree.copy_elf(src, f"usr/sbin/{tool}", stage.lib_dirs)
        for tool in DOM0_USR_BIN:
            src = stage.root / "usr" / "bin" / tool
            if src.is_symlink() and src.resolve().name == "xenstore":
                (tree.root / "usr/bin" / tool).symlink_to("xenstore")
            elif src.exists():
                tree.copy_elf(src, f"usr/bin/{tool}", stage.lib_dirs)
        # glibc dlopen()s libgcc_s for pthread_cancel: without it `xl create` aborts (rc 134)
        libgcc = _host_lib("libgcc_s.so.1", "libgcc-s1")
        tree.copy(libgcc, "lib/x86_64-linux-gnu/libgcc_s.so.1", 0o755)
        xl_conf = stage.root / "etc" / "xen" / "xl.conf"
        if xl_conf.exists():
            tree.copy(xl_conf, "etc/xen/xl.conf", 0o644)
        for d in ("var/lib/xen/dump", "var/run/xen", "run/xen"):
            (tree.root / d).mkdir(parents=True, exist_ok=True)
        tree.copy(stage.vmlinuz, "domu/vmlinuz", 0o644)
        tree.copy(domu_initrd, "domu/initrd.gz", 0o644)
        tree.write("domu/pv.cfg", domu_config("pv"))
        tree.write("domu/pvh.cfg", domu_config("pvh"))
        tree.write("bin/xreplay-cmd", script_text("dom0_cmd.sh"), 0o755)
        tree.write("init", script_text("dom0_init.sh"), 0o755)
        return tree.pack(out)


def _host_lib(name: str, package: str) -> Path:
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        p = Path(d) / name
        if p.exists():
            return p.resolve()
    raise XReplayError(f"{name} not found on the host: apt-get install {package}")


def inputs_digest(stage: Stage) -> str:
    """A key for cached images: changes with the stage, the scripts and this module."""
    h = hashlib.sha256()
    h.update(stage.kver.encode())
    h.update(repr(sorted(stage.packages.items())).encode())
    for name in ("dom0_init.sh", "dom0_cmd.sh", "domu_init.sh"):
        h.update(script_text(name).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def build_images(stage: Stage, out_dir: Path | None = None) -> tuple[Path, Path]:
    """(dom0, domU) images, built once per set of inputs under ``<cache>/images/<digest>``."""
    out_dir = out_dir or stage.cache_dir / "images" / inputs_digest(stage)
    dom0, domu = out_dir / "dom0.cpio.gz", out_dir / "domu.cpio.gz"
    if not domu.exists():
        build_domu_initramfs(domu)
    if not dom0.exists():
        build_dom0_initramfs(stage, dom0, domu)
    return dom0, domu
