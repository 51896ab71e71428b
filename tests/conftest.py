"""Shared fixtures: small synthetic recordings built with the public writer API."""

from __future__ import annotations

from pathlib import Path

import pytest

from xreplay.abi import layout
from xreplay.xrr import ProbeSpec, RecordingHeader, XrrWriter


@pytest.fixture(autouse=True)
def _pinned_findings(request: pytest.FixtureRequest):
    """After each scripted test, its recordings must replay to the pinned findings."""
    import pins

    node = request.node
    module = Path(str(node.fspath)).name
    if module not in pins.PINNED_MODULES or "tmp_path" not in request.fixturenames:
        yield
        return
    tmp = request.getfixturevalue("tmp_path")
    yield
    for path in sorted(tmp.rglob("*.xrr")):
        pins.check(f"{module}::{node.name}/{path.relative_to(tmp)}", path)


def pytest_sessionfinish(session: pytest.Session) -> None:
    import pins

    pins.save()


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


def page_from_state(arch: str, pending: int, mask: int, vcpus: dict) -> bytes:
    """A shared_info image from bitmaps (port *p* = bit *p*) and per-vCPU fields:
    ``vcpus`` maps vCPU -> (evtchn_upcall_pending, evtchn_upcall_mask, evtchn_pending_sel).
    Handy with :class:`xreplay.replay.model.Evtchn2L` (see :func:`page_from_model`)."""
    pb = PageBuilder(arch)
    nbytes = pb.structs.nr_ports // 8
    pb.page[pb.pending_off:pb.pending_off + nbytes] = pending.to_bytes(nbytes, "little")
    pb.page[pb.mask_off:pb.mask_off + nbytes] = mask.to_bytes(nbytes, "little")
    for v, (upcall_pending, upcall_mask, sel) in vcpus.items():
        pb.upcall_pending(v, upcall_pending).upcall_mask(v, upcall_mask)
        off = v * pb.vsize + pb.sel_off
        pb.page[off:off + pb.sel_size] = sel.to_bytes(pb.sel_size, "little")
    return pb.bytes()


def page_from_model(arch: str, model) -> bytes:
    """The shared_info image of an ``Evtchn2L`` model's current state."""
    return page_from_state(arch, model.evtchn_pending, model.evtchn_mask,
                           {v: (b.evtchn_upcall_pending, b.evtchn_upcall_mask,
                                b.evtchn_pending_sel) for v, b in model.vcpu_info.items()})


# The lab's probes as the recorder writes them: plus an "other" probe and the hang pseudo-probe.
LAB_PROBES_EX = [*LAB_PROBES, ProbeSpec("other", "evtchn_unmask", "other"),
                 ProbeSpec("hang", "(target interrupted)", "other")]


def write_recording_ex(path: Path, arch: str, steps, *, labels=None, vcpus=None, notify=None,
                       watch=None, probes=None, trailer=None, close: bool = True) -> Path:
    """Like :func:`write_recording`, plus a notify map, watch regions and a trailer.

    ``watch`` maps region name -> size; each step is (probe, vcpu, page, regflags, hang)
    or (probe, vcpu, page, regflags, hang, {watch name: bytes}); ``trailer`` is the
    end frame's statistics (e.g. ``{"reason": "hang"}``).
    """
    from xreplay.xrr import RegionSpec

    regions = [RegionSpec(name, "watch", size, name) for name, size in (watch or {}).items()]
    header = RecordingHeader.for_arch(arch, probes or LAB_PROBES_EX, labels=labels or {},
                                      vcpus=vcpus or [0], notify=notify or {}, watch=regions,
                                      target={"description": "synthetic test recording"})
    w = XrrWriter(path, header)
    for i, step in enumerate(steps):
        probe, vcpu, page, regflags, hang = step[:5]
        data = step[5] if len(step) > 5 else {}
        w.append(probe=probe, vcpu=vcpu, pc=0x1000 + i, regflags=regflags, t_ns=i * 1000,
                 hang=hang, regions=[page] + [data.get(r.name) for r in regions])
    if close:
        w.close(**(trailer or {}))
    else:
        w._f.close()
    return path


class GuestSim:
    """A scripted lab guest on the 2-level model: one snapshot per probe hit.

    Xen's side is :class:`xreplay.replay.model.Evtchn2L`; the guest side follows the lab
    guest (``xreplay/lab/guest/guest.c``): the bottom half marks each pending unmasked port
    in a shadow (``evtchn_callback_ml``), masks it and clears it; handlers consume marks of
    the ports they listen on and unmask (EVTCHNOP_unmask, or a direct clear: the bug).
    """

    LABELS = {1: "xenstore", 2: "console", 3: "timer", 4: "netfront"}

    def __init__(self, arch: str = "x86_64", listen=(1, 3, 4), *, vcpus=(0,), notify=None,
                 shadow: bool = False, labels=None) -> None:
        from xreplay.replay.model import Evtchn2L

        self.arch = arch
        self.vcpus = list(vcpus)
        self.notify = dict(notify or {})
        self.m = Evtchn2L.new(arch, vcpus, self.notify, all_masked=True)
        self.listen = tuple(listen)
        for p in self.listen:
            self.m.unmask(p)
        self.marked: set[int] = set()
        self.shadow = shadow
        self.labels = dict(self.LABELS if labels is None else labels)
        self.steps: list = []

    def hit(self, probe: str, vcpu: int = 0, *, hang: bool = False, regflags: int = 0x202,
            ) -> int:
        """Record a snapshot; returns its number."""
        data = {}
        if self.shadow:
            buf = bytearray(self.m.geometry.nr_ports)
            for p in self.marked:
                buf[p] = 1
            data["evtchn_callback_ml"] = bytes(buf)
        self.steps.append((probe, vcpu, page_from_model(self.arch, self.m), regflags, hang,
                           data))
        return len(self.steps) - 1

    def demux(self, vcpu: int = 0, *, ffs_bug: bool = False) -> list[int]:
        """``evtchn_demux_pending``; with ``ffs_bug`` every port after the first of a word
        is marked as port + 1 (a 1-based ffs() used as a bit index)."""
        from xreplay.abi import iter_bits

        m = self.m
        v = m.vcpu_info[vcpu]
        v.evtchn_upcall_pending = 0
        sel, v.evtchn_pending_sel = v.evtchn_pending_sel, 0
        taken = []
        for w in iter_bits(sel):
            live = (m.evtchn_pending & ~m.evtchn_mask & m.routing.ports_of(vcpu)
                    & m.geometry.word_ports(w))
            for i, p in enumerate(iter_bits(live)):
                self.marked.add(p + 1 if ffs_bug and i > 0 else p)
                m.mask(p)
                m.clear_pending(p)
                taken.append(p)
        return taken

    def handlers(self, *, reraise: bool = True) -> list[int]:
        done = []
        for p in sorted(self.marked):
            if p not in self.listen:
                continue
            self.marked.discard(p)
            if reraise:
                self.m.unmask(p)
            else:
                self.m.unmask_no_reraise(p)
            done.append(p)
        return done

    def write(self, path: Path, **kw) -> Path:
        watch = {"evtchn_callback_ml": self.m.geometry.nr_ports} if self.shadow else None
        return write_recording_ex(path, self.arch, self.steps, labels=self.labels,
                                  vcpus=self.vcpus, notify=self.notify, watch=watch, **kw)


def boot_xen_lab(tmp_path_factory: pytest.TempPathFactory, name: str, *, domu_vcpus: int = 1,
                 evtchn: str = "2l"):
    """Generator behind the Xen-lab test modules' fixtures: set up (skip with the reason
    when Debian's packages or host tools cannot be had), boot, yield, stop by PID.
    ``domu_vcpus`` boots an SMP domU (dom0 keeps one vCPU); ``evtchn="fifo"`` a domU on
    Linux's FIFO event channels."""
    import shutil

    from xreplay.errors import XReplayError
    from xreplay.lab.xen import Lab, setup

    if shutil.which("gdb") is None:
        pytest.skip("gdb not installed (apt-get install gdb)")
    try:
        setup(progress=print)
    except XReplayError as exc:
        pytest.skip(f"cannot set up the Xen lab (Debian packages or host tools): {exc}")
    lab = Lab(tmp_path_factory.mktemp(name), domu="pv", domu_vcpus=domu_vcpus, evtchn=evtchn,
              progress=print)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()  # by PID; start() also stops QEMU itself when the boot fails
