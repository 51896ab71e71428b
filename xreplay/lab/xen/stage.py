"""Fetch Debian's Xen 4.17 and Linux kernel into a cache, without installing them.

The packages are only *extracted* (``dpkg-deb -x``) into ``<cache>/stage``: installing
``xen-hypervisor-*`` would run grub hooks and change the host's own boot entries. The
result is described by ``<cache>/stage.json``; when it is present and its files exist,
:func:`setup` does nothing, so the lab works offline after the first run.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xreplay.errors import XReplayError
from xreplay.lab import cache_root

Progress = Callable[[str], None]

XEN_VERSION = "4.17"

#: Debian packages extracted into the stage (the kernel package is added by name).
XEN_PACKAGES: tuple[str, ...] = (
    f"xen-hypervisor-{XEN_VERSION}-amd64",
    f"xen-utils-{XEN_VERSION}",
    "xen-utils-common",
    f"libxenmisc{XEN_VERSION}",
    "libxen-dev",  # Xen's public headers: the ground truth for struct layouts
    "libxencall1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenstore4",
    "libxentoollog1",
    "libxendevicemodel1",
    "libxenhypfs1",
    "libxentoolcore1",
    "libyajl2",
    "xenstore-utils",
)

#: Host commands the lab runs, and the Debian package that provides each.
HOST_TOOLS: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "cpio": "cpio",
    "depmod": "kmod",
    "xz": "xz-utils",
}
BUSYBOX_PACKAGE = "busybox-static"
STATE_FILE = "stage.json"


def default_cache_dir() -> Path:
    """``$XREPLAY_CACHE/xenlab``, else ``~/.cache/xreplay/xenlab``."""
    return cache_root() / "xenlab"


def quiet(msg: str) -> None:
    """The default progress callback of the lab's steps: say nothing."""
    del msg


@dataclass(frozen=True)
class Stage:
    """Where the extracted Xen and kernel live; everything a boot needs from the cache."""

    cache_dir: Path
    kver: str
    packages: dict[str, str]

    @property
    def root(self) -> Path:
        """The tree the .debs were extracted into (``usr/``, ``boot/``, ``lib/modules``...)."""
        return self.cache_dir / "stage"

    @property
    def xen_image(self) -> Path:
        """Xen as an ELF32 multiboot image: QEMU's ``-kernel`` cannot load the ``.gz``."""
        return self.cache_dir / f"xen-{XEN_VERSION}"

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.kver

    @property
    def xen_bin_dir(self) -> Path:
        return self.root / "usr" / "lib" / f"xen-{XEN_VERSION}" / "bin"

    @property
    def lib_dirs(self) -> list[Path]:
        """Where the stage's shared libraries are, for resolving the Xen tools' needs."""
        return [
            self.root / "usr" / "lib" / "x86_64-linux-gnu",
            self.root / "usr" / "lib" / f"xen-{XEN_VERSION}" / "lib",
        ]

    @property
    def include_dir(self) -> Path:
        """Xen's public headers from ``libxen-dev`` (``xen/xen.h``, ``xen/event_channel.h``)."""
        return self.root / "usr" / "include"

    def missing(self) -> list[Path]:
        """Files a boot needs that are not there (empty when the stage is usable)."""
        need = [self.xen_image, self.vmlinuz, self.modules_dir / "modules.dep", self.xen_bin_dir]
        return [p for p in need if not p.exists()]

    @classmethod
    def load(cls, cache_dir: Path | None = None) -> Stage:
        """The stage :func:`setup` made; an error telling to run setup when there is none."""
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        try:
            data = json.loads((cache_dir / STATE_FILE).read_text())
            stage = cls(cache_dir, data["kver"], dict(data["packages"]))
        except (OSError, ValueError, KeyError) as exc:
            raise XReplayError(
                f"no Xen lab stage in {cache_dir}: run `xreplay lab setup` first"
            ) from exc
        gone = stage.missing()
        if gone:
            raise XReplayError(
                f"Xen lab stage in {cache_dir} is incomplete ({gone[0]} missing): "
                "run `xreplay lab setup --refresh`"
            )
        return stage


def _sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") is None:
        raise XReplayError("installing host packages needs root: run as root or install sudo")
    return ["sudo"]


def _run(cmd: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    """Run a command; on failure an :class:`XReplayError` naming it with its last output line."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise XReplayError(f"{cmd[0]} not found: {what} needs it") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise XReplayError(f"{what} failed (rc={proc.returncode}): {tail[0]}")
    return proc.stdout


def is_static_elf(path: Path) -> bool:
    """True when ``path`` is an ELF with no program interpreter (runs in a bare initramfs)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only: the lab is x86_64
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> Path | None:
    """A statically linked busybox on the host (Debian's busybox-static), if any."""
    for cand in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if is_static_elf(cand):
            return cand
    found = shutil.which("busybox")
    return Path(found) if found and is_static_elf(Path(found)) else None


def missing_host_packages() -> list[str]:
    """Debian packages to install so that every host tool the lab runs is present."""
    pkgs = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if find_busybox() is None:
        pkgs.append(BUSYBOX_PACKAGE)
    return pkgs


class _Apt:
    """apt-get with ``update`` run at most once per setup, and only when apt is needed."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.updated = False

    def _update(self) -> None:
        if self.updated:
            return
        if shutil.which("apt-get") is None:
            raise XReplayError(
                "apt-get not found: the Xen lab takes Xen and Linux from Debian 12 packages"
            )
        self.progress("apt-get update")
        _run([*_sudo(), "apt-get", "update"], what="apt-get update")
        self.updated = True

    def install(self, pkgs: list[str]) -> None:
        self._update()
        self.progress("apt-get install " + " ".join(pkgs))
        _run(
            [*_sudo(), "apt-get", "install", "-y", "--no-install-recommends", *pkgs],
            what=f"apt-get install {' '.join(pkgs)}",
        )

    def kernel_package(self) -> str:
        """The ``linux-image-<ver>-amd64`` that Debian's ``linux-image-amd64`` points at now."""
        self._update()
        out = _run(["apt-cache", "depends", "linux-image-amd64"], what="apt-cache depends")
        for line in out.splitlines():
            key, _, val = line.strip().partition(": ")
            if key == "Depends" and val.startswith("linux-image-") and val.endswith("-amd64"):
                return val
        raise XReplayError(
            "cannot tell the current Debian kernel package: "
            "`apt-cache depends linux-image-amd64` names no linux-image-*-amd64"
        )

    def download(self, pkgs: list[str], dest: Path) -> list[Path]:
        self._update()
        self.progress(f"apt-get download {len(pkgs)} packages into {dest}")
        _run(["apt-get", "download", *pkgs], cwd=dest, what="apt-get download " + " ".join(pkgs))
        debs = []
        for pkg in pkgs:
            hits = sorted(dest.glob(f"{pkg}_*.deb"))
            if not hits:
                raise XReplayError(f"apt-get download gave no .deb for {pkg}")
            debs.append(hits[-1])
        return debs


def ensure_host_tools(
    progress: Progress = quiet, *, install: bool = True, apt: _Apt | None = None
) -> None:
    """Install the missing host tools (QEMU, busybox-static, cpio, kmod, xz) with apt."""
    pkgs = missing_host_packages()
    if not pkgs:
        return
    if not install:
        raise XReplayError("missing host tools: apt-get install " + " ".join(pkgs))
    (apt or _Apt(progress)).install(pkgs)
    left = missing_host_packages()
    if left:
        raise XReplayError("still missing after apt-get install: " + " ".join(left))


def setup(
    cache_dir: Path | None = None,
    *,
    refresh: bool = False,
    install_tools: bool = True,
    progress: Progress = quiet,
) -> Stage:
    """Make the lab's stage: host tools, extracted Xen + kernel, ``depmod``, unpacked Xen.

    Cached: returns at once when ``stage.json`` and its files are present (unless
    ``refresh``), so repeated calls are cheap and need no network.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    apt = _Apt(progress)
    ensure_host_tools(progress, install=install_tools, apt=apt)
    if not refresh:
        try:
            stage = Stage.load(cache_dir)
        except XReplayError:
            pass
        else:
            progress(f"stage cached in {cache_dir} (kernel {stage.kver})")
            return stage

    t0 = time.monotonic()
    kpkg = apt.kernel_package()
    kver = kpkg.removeprefix("linux-image-")
    debs_dir = cache_dir / "debs"
    root = cache_dir / "stage"
    if root.exists():
        shutil.rmtree(root)
    shutil.rmtree(debs_dir, ignore_errors=True)
    debs_dir.mkdir(parents=True)
    root.mkdir(parents=True)
    names = [*XEN_PACKAGES, kpkg]
    debs = apt.download(names, debs_dir)
    versions = {}
    for name, deb in zip(names, debs, strict=True):
        progress(f"dpkg-deb -x {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), str(root)], what=f"dpkg-deb -x {deb.name}")
        versions[name] = deb.name.split("_")[1]
    stage = Stage(cache_dir, kver, versions)
    progress(f"depmod {kver}")  # the kernel .deb ships no modules.dep
    _run(["depmod", "-b", str(root), kver], what="depmod")
    gz = root / "boot" / f"xen-{XEN_VERSION}-amd64.gz"
    if not gz.exists():
        raise XReplayError(f"{gz.name} not in {f'xen-hypervisor-{XEN_VERSION}-amd64'}")
    with gzip.open(gz) as src, open(stage.xen_image, "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.rmtree(debs_dir, ignore_errors=True)  # 70+ MB, no longer needed
    gone = stage.missing()
    if gone:
        raise XReplayError(f"stage incomplete after setup: {gone[0]} missing")
    (cache_dir / STATE_FILE).write_text(
        json.dumps({"kver": kver, "packages": versions}, indent=2) + "\n"
    )
    progress(f"stage ready in {cache_dir} ({time.monotonic() - t0:.1f} s, kernel {kver})")
    return stage
