"""Port, selector-word and bit arithmetic of Xen's 2-level event-channel ABI.

Port *p* is bit ``p % BPW`` (LSB first) of the little-endian ``xen_ulong_t`` word
``p / BPW`` of ``evtchn_pending``/``evtchn_mask``; that word's index is the bit in the
vCPU's ``evtchn_pending_sel`` (the "selector word" bit).  ``BPW`` is
``BITS_PER_EVTCHN_WORD(d)`` in ``xen/include/xen/sched.h``: 32 for a 32-bit
shared_info, 64 otherwise.  ``EVTCHN_2L_NR_CHANNELS`` is ``BPW * BPW``
(``xen/include/public/event_channel.h``).
"""

from __future__ import annotations

from xreplay.errors import UsageError


class PortRangeError(UsageError, ValueError):
    """A port, word or bit outside the 2-level ABI (an XReplayError, and a ValueError)."""


# Limits every parser of a stranger's file bounds its numbers by.
MAX_VIRT_CPUS = 8192  # vCPU ids are below this (Xen's MAX_VIRT_CPUS on x86)
EVTCHN_FIFO_NR_CHANNELS = 1 << 17  # public/event_channel.h: the largest port space (FIFO)
EVTCHN_FIFO_LINK_MASK = EVTCHN_FIFO_NR_CHANNELS - 1  # the LINK field of a FIFO event word


def nr_ports(bits_per_word: int) -> int:
    """Number of 2-level ports: 4096 with 64-bit words, 1024 with 32-bit words."""
    return bits_per_word * bits_per_word


def port_to_word_bit(port: int, bits_per_word: int) -> tuple[int, int]:
    """(selector word, bit within that word) of ``port``."""
    if not 0 <= port < nr_ports(bits_per_word):
        raise PortRangeError(f"port {port} outside the 2-level range "
                             f"0..{nr_ports(bits_per_word) - 1}")
    return divmod(port, bits_per_word)


def word_bit_to_port(word: int, bit: int, bits_per_word: int) -> int:
    """Inverse of :func:`port_to_word_bit`."""
    if not (0 <= word < bits_per_word and 0 <= bit < bits_per_word):
        raise PortRangeError(f"word {word} / bit {bit} outside a {bits_per_word}-bit 2-level ABI")
    return word * bits_per_word + bit


def selector_word(port: int, bits_per_word: int) -> int:
    """The bit of ``evtchn_pending_sel`` that covers ``port`` (Xen's ``port / BPW``)."""
    return port_to_word_bit(port, bits_per_word)[0]


def iter_bits(value: int):
    """Yield the indices of the set bits of ``value``, lowest first."""
    while value:
        low = value & -value
        yield low.bit_length() - 1
        value ^= low


def selector_mask(ports_bitmap: int, bits_per_word: int) -> int:
    """The selector bits whose words hold at least one set bit of ``ports_bitmap``."""
    sel = 0
    word_mask = (1 << bits_per_word) - 1
    word = 0
    while ports_bitmap:
        if ports_bitmap & word_mask:
            sel |= 1 << word
        ports_bitmap >>= bits_per_word
        word += 1
    return sel
