"""Xen guest ABI: construct layouts per arch and 2-level port arithmetic."""

from xreplay.abi.layouts import ARCHES, XenStructs, canonical_arch, layout
from xreplay.abi.ports import (
    EVTCHN_FIFO_LINK_MASK,
    EVTCHN_FIFO_NR_CHANNELS,
    MAX_VIRT_CPUS,
    iter_bits,
    nr_ports,
    port_to_word_bit,
    selector_mask,
    selector_word,
    word_bit_to_port,
)

__all__ = [
    "ARCHES", "EVTCHN_FIFO_LINK_MASK", "EVTCHN_FIFO_NR_CHANNELS", "MAX_VIRT_CPUS",
    "XenStructs", "canonical_arch", "layout", "iter_bits", "nr_ports",
    "port_to_word_bit", "selector_mask", "selector_word", "word_bit_to_port",
]
