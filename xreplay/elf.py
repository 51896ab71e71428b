"""What the ELF header of a guest image says: word size, machine, PIE or not, entry.

Just the fixed header (``e_ident``, ``e_type``, ``e_machine``, ``e_entry``), read with the
standard library: enough to take the guest ABI from the image when ``--arch`` is not
given, to catch an ``--arch`` that contradicts it, and to explain an ``nm`` address of a
PIE.  Offsets from the System V gABI, "ELF Header".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from xreplay.errors import XReplayError

ELFCLASS32, ELFCLASS64 = 1, 2
ET_EXEC, ET_DYN = 2, 3
EM_386, EM_ARM, EM_X86_64, EM_AARCH64 = 3, 40, 62, 183
#: e_machine and class -> the guest ABI whose shared_info layout such an image uses.
_ARCH = {(EM_X86_64, ELFCLASS64): "x86_64", (EM_386, ELFCLASS32): "x86_32",
         (EM_AARCH64, ELFCLASS64): "arm64", (EM_ARM, ELFCLASS32): "arm32",
         (EM_X86_64, ELFCLASS32): "x86_64"}  # x32-style images: 64-bit code
_MACHINE_NAMES = {EM_386: "i386", EM_ARM: "ARM", EM_X86_64: "x86-64", EM_AARCH64: "AArch64"}


@dataclass(frozen=True)
class ElfInfo:
    path: Path
    elfclass: int
    machine: int
    type: int
    entry: int

    @property
    def bits(self) -> int:
        return 64 if self.elfclass == ELFCLASS64 else 32

    @property
    def arch(self) -> str | None:
        """The guest ABI of the image, None for a machine Xen guests do not use."""
        return _ARCH.get((self.machine, self.elfclass))

    @property
    def is_pie(self) -> bool:
        return self.type == ET_DYN

    def describe(self) -> str:
        machine = _MACHINE_NAMES.get(self.machine, f"machine {self.machine}")
        return f"ELF{self.bits} {machine}{' PIE' if self.is_pie else ''}"


def read_elf(path: str | Path) -> ElfInfo:
    """The header of ``path``; one clear error when it is not an ELF file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise XReplayError(f"{p}: cannot read the ELF file ({e.strerror})") from None
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (ELFCLASS32, ELFCLASS64):
        raise XReplayError(f"{p}: not an ELF file (--elf wants the guest image with symbols)")
    order = "<" if head[5] == 1 else ">"
    etype, machine = struct.unpack_from(order + "HH", head, 16)
    if head[4] == ELFCLASS64:
        if len(head) < 64:
            raise XReplayError(f"{p}: truncated ELF header")
        (entry,) = struct.unpack_from(order + "Q", head, 24)
    else:
        (entry,) = struct.unpack_from(order + "I", head, 24)
    return ElfInfo(p, head[4], machine, etype, entry)
