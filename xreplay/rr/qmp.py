"""A minimal QMP client over a Unix socket: enough to ask QEMU for its instruction count
(``query-replay``) and to quit it cleanly, which flushes the record/replay log."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from xreplay.errors import XReplayError


class Qmp:
    def __init__(self, path: Path, timeout: float = 10.0, alive: Any = None) -> None:
        """Connect (retrying while QEMU starts; ``alive()`` False stops waiting)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline or (alive is not None and not alive()):
                    raise XReplayError(f"QEMU's QMP socket {path} did not come up") from None
                time.sleep(0.01)
        sock.settimeout(timeout)
        self._sock = sock
        self._f = sock.makefile("rw", encoding="utf-8")
        greeting = self._read()
        if "QMP" not in greeting:
            raise XReplayError(f"{path}: not a QMP greeting: {greeting}")
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._f.readline()
        except OSError as e:
            raise XReplayError(f"QEMU's QMP socket failed ({e.strerror or e})") from None
        if not line:
            raise XReplayError("QEMU closed its QMP socket")
        return json.loads(line)

    def command(self, name: str, **args: Any) -> Any:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        try:
            self._f.write(json.dumps(msg) + "\n")
            self._f.flush()
        except OSError as e:
            raise XReplayError(f"QEMU's QMP socket failed ({e.strerror or e})") from None
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise XReplayError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            self._sock.close()
