"""A short gdb visit to a gdbstub: stop at one hit, read a few values, leave it running.

Why: a profile must check things about the live guest that a symbol map cannot tell (its
event-channel ABI, its domain type, where its vcpu_info lives in machine memory) *before*
a recording starts, and the Xen lab's cross-check must read a paused domain by machine
address. Both are a handful of reads, so this drives gdb through the project's
:class:`~xreplay.gdb.session.GdbSession` (MI, one round trip per command) rather than the
recorder's per-hit agent.

QEMU's stub is a whole-machine stub: guest virtual addresses resolve through the page
tables of whatever runs on the selected CPU, so virtual reads are only meaningful at a
hit in the wanted guest. :meth:`StubPeek.physical` switches QEMU to machine addresses
(``Qqemu.PhyMemMode``) and :meth:`StubPeek.translate` walks x86-64 page tables by hand,
which is how a PV guest's addresses become machine addresses (PV page tables hold MFNs).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from types import TracebackType

from xreplay.errors import XReplayError
from xreplay.gdb.session import GdbCommandError, GdbSession

_PAGE_PRESENT = 1 << 0
_PAGE_PSE = 1 << 7
_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 12..51 of a PTE: the frame's machine address
_INT = re.compile(r"^-?(0x[0-9a-fA-F]+|\d+)")


class StubPeek:
    """One gdb attached to ``target`` (``HOST:PORT``); use as a context manager.

    The target is stopped while attached; :meth:`close` deletes our breakpoints, restores
    virtual addressing and detaches, so the machine runs on as before.
    """

    def __init__(self, target: str, *, gdb_arch: str | None = "i386:x86-64",
                 gdb: str = "gdb", timeout: float = 15.0,
                 session: GdbSession | None = None) -> None:
        self.target = target
        self._phys = False
        self._breakpoints: list[str] = []
        self._owned = session is None
        if session is not None:  # a gdb already attached (the recorder's): borrow it
            self.session = session
            return
        self.session = GdbSession(gdb)
        try:
            if gdb_arch:
                self.session.mi(f"-gdb-set architecture {gdb_arch}")
            for setting in ("stack-cache off", "code-cache off"):
                self.session.console_command(f"set {setting}")
            try:
                self.session.mi(f"-target-select remote {target}", timeout=timeout)
            except GdbCommandError as e:
                raise XReplayError(f"cannot attach to the gdbstub at {target}: {e} "
                                   "(is the target running and listening there?)") from None
            self.session.wait_stopped(0.2)
            self.session.pending.clear()
        except BaseException:
            self.session.exit()
            raise

    def __enter__(self) -> StubPeek:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- running to a hit ---------------------------------------------------------------

    def run_to(self, location: str, condition: str | None = None,
               timeout: float = 30.0) -> bool:
        """Continue until ``location`` is hit where ``condition`` holds; False on timeout
        (the target is then interrupted, so reads still work, but not at a hit)."""
        g = self.session
        cond = f"-c {_quote(condition)} " if condition else ""
        try:
            res = g.mi(f"-break-insert {cond}{location}")
        except GdbCommandError as e:
            raise XReplayError(f"cannot break at {location}: {e}") from None
        self._breakpoints.append(str(((res.get("payload") or {}).get("bkpt") or {})
                                     .get("number", "")))
        g.pending.clear()
        g.mi("-exec-continue")
        stopped = g.wait_stopped(timeout)
        if stopped is None:
            with contextlib.suppress(XReplayError):
                g.mi("-exec-interrupt", timeout=5)
            g.wait_stopped(10)
            return False
        return stopped.get("reason") == "breakpoint-hit"

    # -- reads --------------------------------------------------------------------------

    def eval_text(self, expr: str) -> str:
        res = self.session.mi(f"-data-evaluate-expression {_quote(expr)}")
        return str((res.get("payload") or {}).get("value", ""))

    def eval_int(self, expr: str) -> int:
        """An integer-valued gdb expression (numbers, casts, registers such as ``$cr3``)."""
        text = self.eval_text(expr)
        m = _INT.match(text.strip())
        if m is None:
            raise XReplayError(f"gdb gave {text!r} for {expr!r}, not a number")
        return int(m.group(0), 0) & 0xFFFF_FFFF_FFFF_FFFF

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address`` (virtual, or machine inside :meth:`physical`)."""
        try:
            res = self.session.mi(f"-data-read-memory-bytes {address:#x} {size}")
        except GdbCommandError as e:
            mode = "machine" if self._phys else "virtual"
            raise XReplayError(f"cannot read {size} bytes at {mode} address {address:#x}: "
                               f"{e}") from None
        out = bytearray()
        for block in (res.get("payload") or {}).get("memory", []):
            out += bytes.fromhex(block.get("contents", ""))
        if len(out) != size:
            raise XReplayError(f"short read at {address:#x}: {len(out)} of {size} bytes")
        return bytes(out)

    def u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    @contextlib.contextmanager
    def physical(self) -> Iterator[None]:
        """Reads inside the block use machine addresses (QEMU's ``Qqemu.PhyMemMode``)."""
        self._set_phys(True)
        try:
            yield
        finally:
            self._set_phys(False)

    def _set_phys(self, on: bool) -> None:
        out_before = len(self.session.console)
        self.session.console_command(f"maintenance packet Qqemu.PhyMemMode:{int(on)}")
        said = "".join(self.session.console[out_before:])
        if "OK" not in said:
            raise XReplayError(f"the gdbstub at {self.target} has no machine-address mode "
                               f"(Qqemu.PhyMemMode answered {said.strip()!r}): not QEMU?")
        self._phys = on

    def translate(self, cr3: int, va: int) -> int:
        """Machine address of ``va`` through the 4-level x86-64 page tables at ``cr3``.

        Follows 1 GiB and 2 MiB pages; raises when a level is not present.
        """
        with self.physical():
            table = cr3 & _ADDR_MASK
            for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
                index = (va >> shift) & 0x1FF
                entry = self.u64(table + 8 * index)
                if not entry & _PAGE_PRESENT:
                    raise XReplayError(f"{va:#x} is not mapped (level-{level} entry "
                                       f"{entry:#x} under cr3 {cr3:#x})")
                if level in (3, 2) and entry & _PAGE_PSE:
                    size = 1 << shift
                    return (entry & _ADDR_MASK & ~(size - 1)) | (va & (size - 1))
                table = entry & _ADDR_MASK
            return table | (va & 0xFFF)

    # -- leaving ------------------------------------------------------------------------

    def close(self) -> None:
        """Delete our breakpoints; detach and end gdb unless the session was borrowed (then
        the target stays stopped where the last visit left it, for its owner)."""
        g = self.session
        try:
            if g.alive():
                if self._phys:
                    with contextlib.suppress(XReplayError):
                        self._set_phys(False)
                for number in self._breakpoints:
                    with contextlib.suppress(XReplayError):
                        g.mi(f"-break-delete {number}")
                self._breakpoints = []
                if self._owned:
                    with contextlib.suppress(XReplayError):
                        g.mi("-target-detach", timeout=10)
        finally:
            if self._owned:
                g.exit()


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
