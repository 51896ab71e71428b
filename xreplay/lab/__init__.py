"""Labs that produce real event-channel state to record: the C guests
(:mod:`xreplay.lab.guests`) and a real Xen under QEMU (:mod:`xreplay.lab.xen`)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Where labs cache builds and downloads: ``$XREPLAY_CACHE``, else ``~/.cache/xreplay``."""
    base = os.environ.get("XREPLAY_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "xreplay"
