"""A real Xen 4.17 lab: Xen + PV dom0 + a PV/PVH Linux domU under QEMU TCG, from Debian packages.

Why: xreplay needs live shared_info/vcpu_info to record, from a real hypervisor, on a
machine without VMX/SVM. The lab boots in about 20-35 s and exposes QEMU's gdbstub, the
guest kernel's symbol map and a shell in dom0::

    from xreplay.lab.xen import Lab, setup
    setup(progress=print)                  # cached: downloads and extracts once
    with Lab() as lab:
        print(lab.gdb_address, lab.symbol("HYPERVISOR_shared_info"))
        print(lab.dom0(f"lsevtchn {lab.domid}"))

The click group ``lab`` (``xreplay lab setup|up|exec|down``) is in :mod:`.commands`.
"""

from xreplay.lab.xen.initramfs import build_dom0_initramfs, build_domu_initramfs, build_images
from xreplay.lab.xen.lab import (
    Lab,
    LabState,
    default_run_dir,
    is_dom0,
    kallsyms_to_system_map,
    read_system_map,
    stop_pid,
)
from xreplay.lab.xen.stage import Stage, default_cache_dir, setup

__all__ = [
    "Lab",
    "LabState",
    "Stage",
    "build_dom0_initramfs",
    "build_domu_initramfs",
    "build_images",
    "default_cache_dir",
    "default_run_dir",
    "is_dom0",
    "kallsyms_to_system_map",
    "read_system_map",
    "setup",
    "stop_pid",
]
