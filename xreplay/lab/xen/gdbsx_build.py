"""Build (once, ~1 s) the project's own gdbsx from Debian's Xen source, with our patch.

Why: Debian's gdbsx costs ~90 ms per breakpoint hit in the lab. Its ``c`` and ``s`` wait
for the domain to pause by sleeping 10 ms after every check (``_wait_domain_pause`` in
``xg/xg_main.c``), it announces no PacketSize (so gdb reads a 4 KiB shared_info in many
small ``m`` packets) and it answers no ``Z0`` (so gdb reads and writes the instruction
bytes itself around every stop). On an SMP domain a step or continue after two vCPUs hit at
once does not run the domain (Xen's debugger pause count is 2; gdbsx unpauses once).
``patches/gdbsx-fast.patch`` changes exactly those four things; everything else is
Debian's code. Debian's ``/usr/sbin/gdbsx`` stays in dom0 as the
tested fallback (``start_gdbsx(binary=...)``).

Built with the host's gcc against the stage's Xen headers (libxen-dev, the same 4.17
domctl interface), dynamically linked: the lab copies the host's libc into dom0 anyway.
Cached under ``<cache>/gdbsx-tool/<source version>-<digest of patch and flags>/``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xreplay.errors import XReplayError
from xreplay.lab.xen.hypervisor import fetch_source, patch_text
from xreplay.lab.xen.stage import Progress, Stage, _run, quiet

PATCH = "gdbsx-fast.patch"
SOURCE_DIR = "tools/debugger/gdbsx"
SOURCES = ("gx/gx_comm.c", "gx/gx_main.c", "gx/gx_utils.c", "gx/gx_local.c", "xg/xg_main.c")
CFLAGS = ("-O2", "-D__XEN_TOOLS__")
BINARY = "gdbsx-xreplay"
META = "build.json"


@dataclass(frozen=True)
class GdbsxTool:
    binary: Path
    source_version: str
    digest: str


def digest() -> str:
    h = hashlib.sha256(patch_text(PATCH).encode())
    h.update(" ".join((*CFLAGS, *SOURCES)).encode())
    return h.hexdigest()[:12]


def cache_dir(stage: Stage) -> Path:
    return stage.cache_dir / "gdbsx-tool"


def cached(stage: Stage) -> GdbsxTool | None:
    d = digest()
    best = None
    for meta in sorted(cache_dir(stage).glob(f"*-{d}/{META}")):
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        binary = meta.parent / BINARY
        if binary.exists() and data.get("digest") == d:
            best = GdbsxTool(binary, str(data["source_version"]), d)
    return best


def build(stage: Stage, progress: Progress = quiet) -> GdbsxTool:
    """Fetch the source (the deb-src list of :mod:`.hypervisor`), patch, compile, cache."""
    if shutil.which("gcc") is None:
        raise XReplayError("building the project's gdbsx needs gcc: apt-get install gcc")
    root = cache_dir(stage)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        tree, version = fetch_source(Path(tmp), progress)
        progress(f"patch {PATCH}")
        patch = Path(tmp) / PATCH
        patch.write_text(patch_text(PATCH))
        _run(["patch", "-p1", "-s", "--forward", "-i", str(patch)], cwd=tree,
             what=f"patch {PATCH}")
        src = tree / SOURCE_DIR
        out = root / f"{version}-{digest()}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        progress("gcc gdbsx")
        _run(["gcc", *CFLAGS, "-I", str(stage.include_dir), *SOURCES, "-o",
              str(out / BINARY)], cwd=src, what="gcc (gdbsx)")
        (out / META).write_text(json.dumps({"source_version": version, "digest": digest(),
                                            "patch": PATCH}, indent=2) + "\n")
    progress(f"gdbsx ({version} + {PATCH}) built: {out / BINARY}")
    return GdbsxTool(out / BINARY, version, digest())


def ensure(stage: Stage, progress: Progress = quiet) -> GdbsxTool:
    hit = cached(stage)
    if hit is not None:
        return hit
    return build(stage, progress)
