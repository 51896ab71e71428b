"""Build (once) the lab's Xen with gdbsx support, from Debian's own Xen 4.17 source package.

Why: Debian's hypervisor is built without ``CONFIG_GDBSX``, so Debian's ``/usr/sbin/gdbsx``
(already in the stage, package xen-utils-common) fails with "Hyp is NOT enabled for
gdbsx". Rebuilding only the hypervisor from the same source with ``CONFIG_EXPERT=y``
``CONFIG_GDBSX=y`` boots the lab unchanged (../shared/xen-lab-gdbsx/REPORT.md).

The source comes from the Debian archive by package name through a *private* deb-src
list (``apt-get -o Dir::Etc::SourceList=...``): the host's apt configuration is not
touched. The lab patches in ``patches/`` are applied (each says why in its header). The
result is cached under ``<cache>/gdbsx-xen/<source version>-<digest>/`` where the digest
covers Debian's config, our config lines and the patches, so a changed patch rebuilds and
an unchanged one never needs the network again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from xreplay.errors import XReplayError
from xreplay.lab.xen.stage import XEN_VERSION, Progress, Stage, _Apt, _run, quiet

#: Where the source package comes from (the archive's bookworm main: the security
#: build's source was not reachable when this was measured).
ARCHIVE = "http://deb.debian.org/debian"
SUITE = "bookworm"
SOURCE_PACKAGE = "xen"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: Appended to Debian's shipped hypervisor config (``olddefconfig`` fills the rest).
#: GDBSX lives inside ``if DEBUG || EXPERT`` in xen/Kconfig.debug; no debug info keeps the
#: build at ~80 s.
CONFIG_LINES = ("CONFIG_EXPERT=y", "CONFIG_GDBSX=y", "CONFIG_DEBUG_INFO=n")
#: Lab patches, applied in this order with ``patch -p1`` in the source tree.
PATCHES = ("xen-svm-swint-int3.patch", "xen-svm-debugger-irq.patch",
           "xen-svm-debugger-dr6.patch")
#: Build tools beyond gcc/make/python3 (the hypervisor's Kconfig needs them).
BUILD_TOOLS = {"flex": "flex", "bison": "bison", "dpkg-source": "dpkg-dev",
               "patch": "patch", "make": "make", "gcc": "gcc"}
META = "build.json"


class ArchiveUnreachable(XReplayError):
    """The Debian archive could not be reached for the Xen source (offline machine)."""


@dataclass(frozen=True)
class GdbsxXen:
    """A cached hypervisor image built with gdbsx support."""

    image: Path
    source_version: str
    digest: str
    seconds: float = 0.0


def patch_text(name: str) -> str:
    return resources.files("xreplay.lab.xen").joinpath("patches", name).read_text()


def debian_config(stage: Stage) -> Path:
    path = stage.root / "boot" / f"xen-{XEN_VERSION}-amd64.config"
    if not path.exists():
        raise XReplayError(f"{path} missing: run `xreplay lab setup --refresh`")
    return path


def build_digest(stage: Stage) -> str:
    """What the build depends on besides the source version: config, our lines, patches."""
    h = hashlib.sha256()
    h.update(debian_config(stage).read_bytes())
    h.update("\n".join(CONFIG_LINES).encode())
    for name in PATCHES:
        h.update(name.encode())
        h.update(patch_text(name).encode())
    return h.hexdigest()[:12]


def cache_dir(stage: Stage) -> Path:
    return stage.cache_dir / "gdbsx-xen"


def cached(stage: Stage) -> GdbsxXen | None:
    """The newest cached build for this stage's config and our patches, if any."""
    digest = build_digest(stage)
    best = None
    for meta in sorted(cache_dir(stage).glob(f"*-{digest}/{META}")):
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        image = meta.parent / f"xen-{XEN_VERSION}"
        if image.exists() and data.get("digest") == digest:
            best = GdbsxXen(image, str(data["source_version"]), digest,
                            float(data.get("seconds", 0)))
    return best


def missing_build_tools() -> list[str]:
    return sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None})


def ensure_build_tools(progress: Progress = quiet, *, install: bool = True) -> None:
    """Install flex/bison (and the rest) with apt-get, as the lab installs its host tools."""
    pkgs = missing_build_tools()
    if not pkgs:
        return
    if not install:
        raise XReplayError("building the gdbsx hypervisor needs: apt-get install "
                           + " ".join(pkgs))
    _Apt(progress).install(pkgs)
    left = missing_build_tools()
    if left:
        raise XReplayError("still missing after apt-get install: " + " ".join(left))


class _SourceApt:
    """apt-get against a private deb-src list: the host's sources and lists stay as they are."""

    def __init__(self, work: Path) -> None:
        self.work = work
        sources = work / "apt" / "sources"
        for d in (sources, work / "apt" / "lists" / "partial",
                  work / "apt" / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        if not KEYRING.exists():
            raise XReplayError(f"{KEYRING} missing: apt-get install debian-archive-keyring")
        (sources / "xreplay-debsrc.sources").write_text(
            f"Types: deb-src\nURIs: {ARCHIVE}\nSuites: {SUITE}\nComponents: main\n"
            f"Signed-By: {KEYRING}\n")
        self.opts = ["-o", "Dir::Etc::SourceList=/dev/null",
                     "-o", f"Dir::Etc::SourceParts={sources}",
                     "-o", f"Dir::State::Lists={work / 'apt' / 'lists'}",
                     "-o", f"Dir::Cache={work / 'apt' / 'cache'}"]

    def update(self) -> None:
        try:
            _run(["apt-get", *self.opts, "update"], what="apt-get update (deb-src)")
        except XReplayError as exc:
            raise ArchiveUnreachable(f"cannot reach the Debian archive for Xen's source: {exc}"
                                     ) from None
        if not any((self.work / "apt" / "lists").glob("*Sources*")):
            raise ArchiveUnreachable(f"the Debian archive gave no source index for {SUITE}")

    def source(self, dest: Path) -> Path:
        """Download and unpack the source package; the unpacked tree."""
        try:
            _run(["apt-get", *self.opts, "source", "--download-only", SOURCE_PACKAGE],
                 cwd=dest, what="apt-get source xen")
        except XReplayError as exc:
            raise ArchiveUnreachable(str(exc)) from None
        dscs = sorted(dest.glob(f"{SOURCE_PACKAGE}_*.dsc"))
        if not dscs:
            raise XReplayError(f"apt-get source gave no {SOURCE_PACKAGE}_*.dsc in {dest}")
        _run(["dpkg-source", "-x", "-q", dscs[-1].name, "src"], cwd=dest,
             what=f"dpkg-source -x {dscs[-1].name}")
        return dest / "src"


def source_version(dsc: Path) -> str:
    for line in dsc.read_text(errors="replace").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise XReplayError(f"{dsc}: no Version field")


def fetch_source(dest: Path, progress: Progress = quiet) -> tuple[Path, str]:
    """Debian's Xen source unpacked under ``dest``: ``(tree, version)``."""
    apt = _SourceApt(dest)
    progress(f"apt-get update (private deb-src list, {SUITE} main)")
    apt.update()
    progress(f"apt-get source {SOURCE_PACKAGE}")
    tree = apt.source(dest)
    version = source_version(sorted(dest.glob(f"{SOURCE_PACKAGE}_*.dsc"))[-1])
    return tree, version


def apply_patches(tree: Path, progress: Progress = quiet) -> None:
    for name in PATCHES:
        progress(f"patch {name}")
        with tempfile.NamedTemporaryFile("w", suffix=".patch", delete=False) as fh:
            fh.write(patch_text(name))
        try:
            _run(["patch", "-p1", "-s", "--forward", "-i", fh.name], cwd=tree,
                 what=f"patch {name}")
        finally:
            os.unlink(fh.name)


def build(stage: Stage, *, progress: Progress = quiet, install_tools: bool = True,
          jobs: int | None = None) -> GdbsxXen:
    """Fetch, patch, configure and build the hypervisor; cache it; return it."""
    ensure_build_tools(progress, install=install_tools)
    t0 = time.monotonic()
    digest = build_digest(stage)
    root = cache_dir(stage)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        work = Path(tmp)
        tree, version = fetch_source(work, progress)
        apply_patches(tree, progress)
        xen = tree / "xen"
        config = xen / ".config"
        shutil.copyfile(debian_config(stage), config)
        with open(config, "a") as fh:
            fh.write("\n".join(CONFIG_LINES) + "\n")
        args = ["XEN_TARGET_ARCH=x86_64", "XEN_BUILD_EFI=n", "XEN_BUILD_PE=n"]
        progress("make olddefconfig")
        _run(["make", "-s", "-C", str(xen), "olddefconfig", *args], what="make olddefconfig")
        lines = config.read_text().splitlines()
        if "CONFIG_GDBSX=y" not in lines:
            raise XReplayError(f"CONFIG_GDBSX did not stick in {config} (Kconfig changed?)")
        n = jobs or os.cpu_count() or 1
        progress(f"make -j{n} (the hypervisor only; ~80 s on two cores)")
        _run(["make", "-s", "-C", str(xen), f"-j{n}", *args], what="make (xen hypervisor)")
        out = root / f"{version}-{digest}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        image = out / f"xen-{XEN_VERSION}"
        shutil.copyfile(xen / "xen", image)
        shutil.copyfile(config, out / "xen.config")
        seconds = time.monotonic() - t0
        (out / META).write_text(json.dumps({
            "source_version": version, "digest": digest, "config": list(CONFIG_LINES),
            "patches": list(PATCHES), "seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    progress(f"gdbsx hypervisor {version} built in {seconds:.0f} s: {image}")
    return GdbsxXen(image, version, digest, seconds)


def ensure(stage: Stage, *, progress: Progress = quiet, install_tools: bool = True,
           refresh: bool = False) -> GdbsxXen:
    """The cached gdbsx hypervisor, built first when there is none (or ``refresh``)."""
    if not refresh:
        hit = cached(stage)
        if hit is not None:
            progress(f"gdbsx hypervisor cached ({hit.source_version}): {hit.image}")
            return hit
    return build(stage, progress=progress, install_tools=install_tools)


def gdbsx_binary(stage: Stage) -> Path:
    """Debian's gdbsx (xen-utils-common) from the stage: needs only libc and privcmd."""
    path = stage.root / "usr" / "sbin" / "gdbsx"
    if not path.exists():
        raise XReplayError(f"{path} missing: run `xreplay lab setup --refresh`")
    return path


def _check_image(image: Path) -> None:
    """The image must be the multiboot ELF QEMU's ``-kernel`` loads."""
    head = image.read_bytes()[:5]
    if head[:4] != b"\x7fELF":
        raise XReplayError(f"{image} is not an ELF image: delete it and rebuild")


__all__ = ["ArchiveUnreachable", "GdbsxXen", "build", "cached", "ensure", "gdbsx_binary"]


if __name__ == "__main__":  # python -m xreplay.lab.xen.hypervisor: build now
    import sys

    result = ensure(Stage.load(), progress=lambda m: print("gdbsx-xen:", m, file=sys.stderr),
                    refresh="--refresh" in sys.argv)
    _check_image(result.image)
    print(result.image)
    subprocess.run(["ls", "-la", str(result.image)], check=False)
