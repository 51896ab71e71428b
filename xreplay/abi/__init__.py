"""Xen guest ABI: per-arch layouts, 2-level port math (FIFO: :mod:`xreplay.abi.fifo`)."""

from xreplay.abi.layouts import ARCHES, XenStructs, canonical_arch, layout
from xreplay.abi.ports import (
    iter_bits,
    nr_ports,
    port_to_word_bit,
    selector_mask,
    selector_word,
    word_bit_to_port,
)

__all__ = [
    "ARCHES", "XenStructs", "canonical_arch", "layout", "iter_bits", "nr_ports",
    "port_to_word_bit", "selector_mask", "selector_word", "word_bit_to_port",
]
