"""construct layouts and bit arithmetic of Xen's FIFO event-channel ABI.

Source: ``xen/include/public/event_channel.h`` (identical from Xen 4.4, where FIFO arrived,
to 4.21; the test-suite compiles Debian's copy as the oracle).  Unlike the 2-level ABI the
FIFO structs are the same on every arch: 32-bit event words and a ``uint32_t`` control block.

* ``event_word_t``: one per port; bit 31 PENDING, 30 MASKED, 29 LINKED, 28 BUSY, and a
  17-bit LINK (the next port of the queue the event is LINKED on; 0 ends the queue).
* the event array: pages of ``PAGE_SIZE / sizeof(event_word_t)`` words, port *p* at word
  ``p % EVENT_WORDS_PER_PAGE`` of page ``p // EVENT_WORDS_PER_PAGE``; the guest hands Xen
  one page at a time (``EVTCHNOP_expand_array``), so only the pages in use exist.
* ``struct evtchn_fifo_control_block``: one per vCPU (``EVTCHNOP_init_control``), ``ready``
  (bit *q* set: queue *q* became non-empty) and ``head[EVTCHN_FIFO_MAX_QUEUES]``.  Queue *q*
  is priority *q*: 0 is the highest.  Linux binds at the default 7 and raises VIRQ_TIMER
  to 0 (``xen_setup_timer``: ``xen_set_irq_priority(irq, XEN_IRQ_PRIORITY_MAX)``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from construct import Array, Int32ul, Struct

EVTCHN_FIFO_PRIORITY_MAX = 0
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
EVTCHN_FIFO_PRIORITY_MIN = 15
EVTCHN_FIFO_MAX_QUEUES = EVTCHN_FIFO_PRIORITY_MIN + 1

EVTCHN_FIFO_PENDING = 31
EVTCHN_FIFO_MASKED = 30
EVTCHN_FIFO_LINKED = 29
EVTCHN_FIFO_BUSY = 28

EVTCHN_FIFO_LINK_BITS = 17
EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1
EVTCHN_FIFO_NR_CHANNELS = 1 << EVTCHN_FIFO_LINK_BITS

PAGE_SIZE = 4096  # the event array's pages are guest frames (4 KiB on x86 and arm)
EVENT_WORD_SIZE = 4
EVENT_WORDS_PER_PAGE = PAGE_SIZE // EVENT_WORD_SIZE
MAX_EVENT_ARRAY_PAGES = EVTCHN_FIFO_NR_CHANNELS // EVENT_WORDS_PER_PAGE

event_word_t = Int32ul

evtchn_fifo_control_block = Struct(
    "ready" / Int32ul,
    "_rsvd" / Int32ul,
    "head" / Array(EVTCHN_FIFO_MAX_QUEUES, Int32ul),
)
CONTROL_BLOCK_SIZE = evtchn_fifo_control_block.sizeof()  # 72

event_array_page = Array(EVENT_WORDS_PER_PAGE, event_word_t)

#: top-level fields as {name: (offset, size)}, for the header oracle and region slicing
CONTROL_BLOCK_FIELDS = {"ready": (0, 4), "_rsvd": (4, 4),
                        "head": (8, 4 * EVTCHN_FIFO_MAX_QUEUES)}


@dataclass(frozen=True, slots=True)
class EventWord:
    """One decoded ``event_word_t``."""

    raw: int

    @property
    def pending(self) -> bool:
        return bool(self.raw >> EVTCHN_FIFO_PENDING & 1)

    @property
    def masked(self) -> bool:
        return bool(self.raw >> EVTCHN_FIFO_MASKED & 1)

    @property
    def linked(self) -> bool:
        return bool(self.raw >> EVTCHN_FIFO_LINKED & 1)

    @property
    def busy(self) -> bool:
        return bool(self.raw >> EVTCHN_FIFO_BUSY & 1)

    @property
    def link(self) -> int:
        return self.raw & EVTCHN_FIFO_LINK_MASK


def make_word(*, pending: bool = False, masked: bool = False, linked: bool = False,
              busy: bool = False, link: int = 0) -> int:
    """An ``event_word_t`` value from its fields (for models and tests)."""
    if not 0 <= link <= EVTCHN_FIFO_LINK_MASK:
        raise ValueError(f"LINK {link} does not fit {EVTCHN_FIFO_LINK_BITS} bits")
    return (pending << EVTCHN_FIFO_PENDING | masked << EVTCHN_FIFO_MASKED
            | linked << EVTCHN_FIFO_LINKED | busy << EVTCHN_FIFO_BUSY | link)


def port_to_page_word(port: int) -> tuple[int, int]:
    """(event-array page, word within it) of ``port``."""
    if not 0 <= port < EVTCHN_FIFO_NR_CHANNELS:
        raise ValueError(f"port {port} outside the FIFO range 0..{EVTCHN_FIFO_NR_CHANNELS - 1}")
    return divmod(port, EVENT_WORDS_PER_PAGE)


def pages_for_ports(nr_ports: int) -> int:
    """Event-array pages that hold ports ``0..nr_ports-1`` (how far Linux grew the array)."""
    return -(-nr_ports // EVENT_WORDS_PER_PAGE)


def words(page: bytes) -> list[int]:
    """The event words of one page (or of a shorter prefix of one), as ints."""
    n = len(page) // EVENT_WORD_SIZE
    return list(struct.unpack_from(f"<{n}I", page))  # one C call: a snapshot reads 1024


def ports_with(raw: bytes, bit: int, value: bool) -> int:
    """Bitmap (port *p* = bit *p*) of the words in ``raw`` whose ``bit`` is ``value``,
    found by C-speed byte scans: only the matching ports cost Python work, which is what
    makes decoding a 1024-port page cheap (few ports pending, few unmasked)."""
    flag = 1 << bit % 8
    table = bytes((1 if (b & flag) == (flag if value else 0) else 0) for b in range(256))
    column = raw[bit // 8::EVENT_WORD_SIZE][: len(raw) // EVENT_WORD_SIZE].translate(table)
    out, at = 0, column.find(1)
    while at >= 0:
        out |= 1 << at
        at = column.find(1, at + 1)
    return out


@dataclass(frozen=True, slots=True)
class ControlBlock:
    """One decoded ``struct evtchn_fifo_control_block``."""

    ready: int
    head: tuple[int, ...]

    @classmethod
    def parse(cls, raw: bytes) -> ControlBlock:
        c = evtchn_fifo_control_block.parse(raw[:CONTROL_BLOCK_SIZE])
        return cls(ready=c.ready, head=tuple(c.head))

    def build(self) -> bytes:
        return evtchn_fifo_control_block.build({"ready": self.ready, "_rsvd": 0,
                                                "head": list(self.head)})

    def is_ready(self, queue: int) -> bool:
        return bool(self.ready >> queue & 1)


def ready_queues(ready: int) -> str:
    """A control block's ``ready`` as the set of queues it marks: ``{0,7}``."""
    return "{" + ",".join(str(q) for q in range(EVTCHN_FIFO_MAX_QUEUES) if ready >> q & 1) + "}"


def print_state(raw: int | None) -> str:
    """The 6-character column Xen's 'e' key prints for a FIFO port
    (``evtchn_fifo_print_state``): ``?     `` (no event word), ``B 12  `` (BUSY, LINKED to
    12), ``  -   `` (not LINKED)."""
    if raw is None:
        return "?     "
    w = EventWord(raw)
    busy = "B" if w.busy else " "
    return f"{busy} {w.link:<4}" if w.linked else f"{busy} -   "


def parse_state(text: str) -> tuple[bool, bool, int | None]:
    """Inverse of :func:`print_state` on its (stripped or padded) text:
    (has a word, BUSY, LINK or None when not LINKED).  Raises ValueError."""
    text = text.strip()
    if text == "?":
        return False, False, None
    busy = text.startswith("B")
    rest = text[1:].strip() if busy else text
    if rest == "-":
        return True, busy, None
    if rest.isdigit() and int(rest) <= EVTCHN_FIFO_LINK_MASK:
        return True, busy, int(rest)
    raise ValueError(f"bad FIFO state column {text!r}")
