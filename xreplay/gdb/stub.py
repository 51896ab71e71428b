"""Which gdbstub is at the other end, found rather than told.

Stubs differ in what a recorder must do (GDB manual, "Remote Protocol"; QEMU
``gdbstub/``; Xen ``tools/debugger/gdbsx``):

* **QEMU** (``-s``/``-gdb``) is a whole-machine stub: x86 always reports the 64-bit
  register set, so gdb needs ``set architecture i386:x86-64`` even for a 32-bit guest
  (otherwise the connection fails with "'g' packet reply is too long"); it can report one
  hit twice, so hits are de-duplicated.  It answers ``qqemu.Supported`` (QEMU's own
  query prefix).
* **gdbserver** debugs one process; it answers ``qXfer:exec-file:read`` with the
  program's path.
* **gdbsx** (Xen's, in dom0) debugs one domain, one thread per vCPU; it answers
  ``qSupported`` with nothing (the project's own build with ``PacketSize`` and
  ``xreplay-gdbsx+``) and ``?`` with ``T05thread:N;``. What it needs is in
  :mod:`xreplay.gdb.gdbsx`.

Identification sends only query packets every stub must tolerate (an unknown query gets
the empty reply), through gdb's ``maint packet`` on gdb's own connection: a second
connection would end ``gdbserver --once`` and ``gdbsx``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from xreplay.errors import XReplayError

if TYPE_CHECKING:
    from xreplay.gdb.session import GdbSession

#: gdb's architecture for QEMU's x86 stub, whatever mode the guest is in.
QEMU_X86_GDB_ARCH = "i386:x86-64"
#: gdb's words when the stub's register set is bigger than the architecture it assumed:
#: the mark of QEMU's x86_64 stub under a 32-bit image.
G_TOO_LONG = "'g' packet reply is too long"
_RECEIVED = re.compile(r'received: "(.*)"', re.S)


class StubKind(StrEnum):
    GDBSERVER = "gdbserver"
    QEMU = "qemu"
    GDBSX = "gdbsx"
    UNKNOWN = "gdbstub"


@dataclass
class StubInfo:
    kind: StubKind
    answers: dict[str, str] = field(default_factory=dict)  # query -> reply, as read

    @property
    def whole_machine(self) -> bool:
        """Hits may come from anything the machine runs (Xen, dom0, every domU)."""
        return self.kind is StubKind.QEMU

    @property
    def dedupe(self) -> bool:
        """QEMU can report one hit twice; so can gdb through gdbsx (same pc, sp, flags)."""
        return self.kind in (StubKind.QEMU, StubKind.GDBSX)

    def to_json(self) -> dict[str, object]:
        return {"kind": str(self.kind), "answers": self.answers}


def query(gdb: GdbSession, packet: str) -> str | None:
    """The stub's reply to ``packet`` (one query, through gdb's connection); None when gdb
    could not send it."""
    seen = len(gdb.console)
    try:
        gdb.console_command(f"maint packet {packet}", timeout=10)
    except XReplayError:
        return None
    m = _RECEIVED.search("".join(gdb.console[seen:]))
    return m.group(1) if m else None


def identify(gdb: GdbSession) -> StubInfo:
    """Ask the connected stub who it is."""
    answers: dict[str, str] = {}
    qemu = query(gdb, "qqemu.Supported")
    if qemu is not None:
        answers["qqemu.Supported"] = qemu
    if qemu:
        return StubInfo(StubKind.QEMU, answers)
    exe = query(gdb, "qXfer:exec-file:read::0,400")
    if exe is not None:
        answers["qXfer:exec-file:read"] = exe
    if exe and exe[0] in "lm":
        return StubInfo(StubKind.GDBSERVER, answers)
    from xreplay.gdb.gdbsx import looks_like_gdbsx

    sup = query(gdb, "qSupported")
    if sup is not None:
        answers["qSupported"] = sup
        if looks_like_gdbsx(sup):
            stop = query(gdb, "?")
            if stop is not None:
                answers["?"] = stop
                if looks_like_gdbsx(sup, stop):
                    return StubInfo(StubKind.GDBSX, answers)
    return StubInfo(StubKind.UNKNOWN, answers)
