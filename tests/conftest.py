"""Shared fixtures: small synthetic recordings built with the public writer API."""

from __future__ import annotations

from pathlib import Path

import pytest

from xreplay.abi import layout
from xreplay.xrr import ProbeSpec, RecordingHeader, XrrWriter

LAB_PROBES = [ProbeSpec("upcall", "evtchn_upcall_handler", "upcall"),
              ProbeSpec("bottom-half", "evtchn_demux_pending", "bottom-half"),
              ProbeSpec("block", "evtchn_block_domain", "block")]


class PageBuilder:
    """Edits a shared_info image by field name, the way Xen and a guest would."""

    def __init__(self, arch: str) -> None:
        self.structs = layout(arch)
        self.page = bytearray(self.structs.shared_info.sizeof())
        f = self.structs.fields("shared_info")
        self.pending_off = f["evtchn_pending"][0]
        self.mask_off = f["evtchn_mask"][0]
        vf = self.structs.fields("vcpu_info")
        self.vsize = self.structs.vcpu_info.sizeof()
        self.sel_off, self.sel_size = vf["evtchn_pending_sel"]

    def _bit(self, base: int, port: int, value: bool) -> None:
        byte, bit = divmod(port, 8)
        if value:
            self.page[base + byte] |= 1 << bit
        else:
            self.page[base + byte] &= ~(1 << bit) & 0xFF

    def pending(self, port: int, value: bool = True) -> PageBuilder:
        self._bit(self.pending_off, port, value)
        return self

    def mask(self, port: int, value: bool = True) -> PageBuilder:
        self._bit(self.mask_off, port, value)
        return self

    def mask_all(self) -> PageBuilder:
        n = self.structs.nr_ports // 8
        self.page[self.mask_off:self.mask_off + n] = b"\xff" * n
        return self

    def upcall_pending(self, vcpu: int = 0, value: int = 1) -> PageBuilder:
        self.page[vcpu * self.vsize] = value
        return self

    def upcall_mask(self, vcpu: int = 0, value: int = 1) -> PageBuilder:
        self.page[vcpu * self.vsize + 1] = value
        return self

    def sel(self, vcpu: int, word: int, value: bool = True) -> PageBuilder:
        off = vcpu * self.vsize + self.sel_off
        cur = int.from_bytes(self.page[off:off + self.sel_size], "little")
        cur = cur | (1 << word) if value else cur & ~(1 << word)
        self.page[off:off + self.sel_size] = cur.to_bytes(self.sel_size, "little")
        return self

    def raise_port(self, port: int, vcpu: int = 0) -> PageBuilder:
        """Xen's evtchn_2l_set_pending on an unmasked port."""
        self.pending(port).sel(vcpu, port // self.structs.bits_per_word).upcall_pending(vcpu)
        return self

    def bytes(self) -> bytes:
        return bytes(self.page)


@pytest.fixture
def page_builder():
    return PageBuilder


def write_recording(path: Path, arch: str, steps, *, labels=None, vcpus=None,
                    keyframe_interval: int = 256, close: bool = True,
                    probes=None) -> Path:
    """``steps`` is a list of (probe, vcpu, shared_info bytes, regflags, hang)."""
    header = RecordingHeader.for_arch(arch, probes or LAB_PROBES, labels=labels or {},
                                      vcpus=vcpus or [0], keyframe_interval=keyframe_interval,
                                      target={"description": "synthetic test recording"})
    w = XrrWriter(path, header)
    for i, (probe, vcpu, page, regflags, hang) in enumerate(steps):
        w.append(probe=probe, vcpu=vcpu, pc=0x1000 + i, regions=[page], regflags=regflags,
                 t_ns=i * 1000, hang=hang)
    if close:
        w.close()
    else:
        w._f.close()
    return path
