"""The FIFO ABI's constants and structs must equal Xen's public event_channel.h.

The oracle is Debian's libxen-dev ``xen/event_channel.h`` (arch-independent: the FIFO
structs are made of ``uint32_t`` only), compiled and run here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xreplay.abi import fifo

HEADER = Path("/usr/include/xen/event_channel.h")

CONSTANTS = ("EVTCHN_FIFO_PRIORITY_MAX", "EVTCHN_FIFO_PRIORITY_DEFAULT",
             "EVTCHN_FIFO_PRIORITY_MIN", "EVTCHN_FIFO_MAX_QUEUES", "EVTCHN_FIFO_PENDING",
             "EVTCHN_FIFO_MASKED", "EVTCHN_FIFO_LINKED", "EVTCHN_FIFO_BUSY",
             "EVTCHN_FIFO_LINK_BITS", "EVTCHN_FIFO_LINK_MASK", "EVTCHN_FIFO_NR_CHANNELS")


@pytest.mark.skipif(not HEADER.exists() or shutil.which("gcc") is None,
                    reason="needs gcc and Debian's libxen-dev (make deps installs them)")
def test_fifo_layout_matches_xen_header(tmp_path: Path) -> None:
    cb = "struct evtchn_fifo_control_block"
    lines = [f'printf("{c} %ld\\n", (long)({c}));' for c in CONSTANTS]
    lines.append('printf("sizeof_event_word_t %zu\\n", sizeof(event_word_t));')
    lines.append(f'printf("sizeof_control_block %zu\\n", sizeof({cb}));')
    for name in fifo.CONTROL_BLOCK_FIELDS:
        lines.append(f'printf("off_{name} %zu\\n", offsetof({cb}, {name}));')
        lines.append(f'printf("size_{name} %zu\\n", sizeof((({cb} *)0)->{name}));')
    src = tmp_path / "probe_fifo.c"
    src.write_text("#include <stdint.h>\n#include <stddef.h>\n#include <stdio.h>\n"
                   "#include <xen/xen.h>\n#include <xen/event_channel.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "probe_fifo"
    subprocess.run(["gcc", "-D__XEN_INTERFACE_VERSION__=0x00040d00", "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    out = dict(line.split() for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines())
    for c in CONSTANTS:
        assert getattr(fifo, c) == int(out[c]), c
    assert fifo.event_word_t.sizeof() == fifo.EVENT_WORD_SIZE == int(out["sizeof_event_word_t"])
    assert fifo.evtchn_fifo_control_block.sizeof() == int(out["sizeof_control_block"]) == 72
    for name, (off, size) in fifo.CONTROL_BLOCK_FIELDS.items():
        assert (off, size) == (int(out[f"off_{name}"]), int(out[f"size_{name}"])), name
    # the construct struct agrees with the table the oracle checked
    offset = 0
    for sub in fifo.evtchn_fifo_control_block.subcons:
        assert fifo.CONTROL_BLOCK_FIELDS[sub.name] == (offset, sub.sizeof())
        offset += sub.sizeof()


def test_event_word_bits() -> None:
    w = fifo.EventWord(fifo.make_word(pending=True, linked=True, link=0x1ABCD))
    assert (w.pending, w.masked, w.linked, w.busy, w.link) == (True, False, True, False, 0x1ABCD)
    assert w.raw == 0xA001ABCD
    assert fifo.EventWord(0x50000000).masked and fifo.EventWord(0x50000000).busy
    with pytest.raises(ValueError):
        fifo.make_word(link=1 << 17)


def test_event_array_pages_and_control_block() -> None:
    assert fifo.EVENT_WORDS_PER_PAGE == 1024 and fifo.MAX_EVENT_ARRAY_PAGES == 128
    assert fifo.event_array_page.sizeof() == fifo.PAGE_SIZE
    assert fifo.port_to_page_word(0) == (0, 0)
    assert fifo.port_to_page_word(1025) == (1, 1)
    assert fifo.pages_for_ports(1) == 1 and fifo.pages_for_ports(1025) == 2
    with pytest.raises(ValueError):
        fifo.port_to_page_word(fifo.EVTCHN_FIFO_NR_CHANNELS)
    page = bytearray(fifo.PAGE_SIZE)
    page[12:16] = fifo.make_word(pending=True).to_bytes(4, "little")
    assert fifo.words(bytes(page))[3] == 1 << 31
    head = tuple(5 if q == 7 else 0 for q in range(16))
    cb = fifo.ControlBlock(ready=1 << 7, head=head)
    raw = cb.build()
    assert len(raw) == 72 and raw[8 + 7 * 4] == 5
    assert fifo.ControlBlock.parse(raw) == cb and cb.is_ready(7) and not cb.is_ready(0)


@pytest.mark.skipif(not HEADER.exists() or shutil.which("gcc") is None,
                    reason="needs gcc and Debian's libxen-dev (make deps installs them)")
def test_lab_guest_fifo_structs_match_the_abi(tmp_path: Path) -> None:
    """The lab guest declares the FIFO structs itself (lab.h): same layout and bits."""
    guest = Path(__file__).parent.parent / "xreplay" / "lab" / "guest"
    src = tmp_path / "probe_lab.c"
    src.write_text(
        '#include <stddef.h>\n#include <stdio.h>\n#include "lab.h"\nint main(void) {\n'
        'printf("%zu %zu %zu %zu %u %u %u %u %u %u %u\\n", '
        "sizeof(struct lab_fifo_control_block), "
        "offsetof(struct lab_fifo_control_block, head), "
        "sizeof(lab_event_array) / LAB_FIFO_MAX_PAGES, "
        "sizeof(lab_event_array[0]), LAB_FIFO_PENDING, LAB_FIFO_MASKED, LAB_FIFO_LINKED, "
        "LAB_FIFO_BUSY, LAB_FIFO_LINK_MASK, LAB_FIFO_MAX_QUEUES, LAB_FIFO_PRIO_TIMER);\n"
        "return 0;\n}\nuint32_t lab_event_array[LAB_FIFO_MAX_PAGES * LAB_FIFO_WORDS];\n")
    exe = tmp_path / "probe_lab"
    subprocess.run(["gcc", "-I", str(guest), "-o", str(exe), str(src)], check=True,
                   capture_output=True, text=True)
    got = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True,
                                          text=True).stdout.split()]
    assert got == [fifo.CONTROL_BLOCK_SIZE, fifo.CONTROL_BLOCK_FIELDS["head"][0],
                   fifo.PAGE_SIZE, fifo.EVENT_WORD_SIZE, 1 << fifo.EVTCHN_FIFO_PENDING,
                   1 << fifo.EVTCHN_FIFO_MASKED, 1 << fifo.EVTCHN_FIFO_LINKED,
                   1 << fifo.EVTCHN_FIFO_BUSY, fifo.EVTCHN_FIFO_LINK_MASK,
                   fifo.EVTCHN_FIFO_MAX_QUEUES, fifo.EVTCHN_FIFO_PRIORITY_MAX]
