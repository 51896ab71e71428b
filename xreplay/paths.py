"""Output paths checked before any work starts, so a typo costs nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from xreplay.errors import XReplayError


def check_output(path: str | os.PathLike[str], option: str = "-o") -> Path:
    """``path`` as a file that can be created or replaced; one clear error otherwise.

    Nothing is left behind: the probe file is created in the same folder and removed, and
    an existing file at ``path`` is not touched.
    """
    p = Path(path)
    if str(path) == "-":
        raise XReplayError(f"{option} -: a recording is a binary file; give a file name")
    if p.is_dir():
        raise XReplayError(f"{p}: is a folder ({option} wants a file name)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise XReplayError(f"{p}: the folder {parent} does not exist (create it first)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise XReplayError(f"{p}: cannot create files in {parent} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    if p.exists() and not os.access(p, os.W_OK):
        raise XReplayError(f"{p}: exists and is not writable")
    return p
