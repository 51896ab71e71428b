"""Guest presets: where each kind of guest takes its upcall, demuxes, blocks and keeps
``shared_info``, as one ``--profile`` instead of five options.

Names come from each project's own sources (see ``shared/xen-event-channels-reference.md``
§2): Solo5's ``bindings/xen`` (the vector handler does the whole demux; the shared page is
``uint8_t HYPERVISOR_SHARED_INFO[PAGE_SIZE]``), mirage-xen's ``lib/bindings/evtchn.c`` (top
half ``solo5__xen_evtchn_vector_handler`` only EOIs; the bottom half and the block are
called from OCaml; the shadow ``evtchn_callback_ml``), Mini-OS (``hypervisor_callback``
enters ``do_hypervisor_callback``, which demuxes; ``block_domain``; a
``shared_info_t *HYPERVISOR_shared_info`` set at boot).  Every preset is tested on a lab
guest built with exactly those names and declarations (``xreplay.lab.guests``, styles).
Linux has its own profile, built from a symbol map (:mod:`xreplay.profiles.linux`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xreplay.errors import XReplayError


@dataclass(frozen=True)
class GuestPreset:
    name: str
    summary: str
    shared_info: str
    upcall: str | None = None
    bottom_half: str | None = None
    block: str | None = None
    #: the guest's own shadow of pending ports, stored as a watch region named "shadow"
    shadow: str | None = None
    probes: dict[str, str] = field(default_factory=dict)  # more probes, role "other"


PRESETS: dict[str, GuestPreset] = {p.name: p for p in (
    GuestPreset("solo5", "Solo5 bindings/xen: the vector handler demuxes in interrupt context",
                shared_info="HYPERVISOR_SHARED_INFO",
                upcall="solo5__xen_evtchn_vector_handler"),
    GuestPreset("mirage", "MirageOS (mirage-xen on Solo5): top half EOIs, OCaml calls the "
                "bottom half and the block",
                shared_info="solo5__xen_HYPERVISOR_SHARED_INFO",
                upcall="solo5__xen_evtchn_vector_handler",
                bottom_half="mirage_xen_evtchn_demux_pending",
                block="mirage_xen_evtchn_block_domain",
                shadow="evtchn_callback_ml"),
    GuestPreset("minios", "Mini-OS: hypervisor_callback -> do_hypervisor_callback demuxes; "
                "block_domain sleeps; HYPERVISOR_shared_info is a pointer set at boot",
                shared_info="HYPERVISOR_shared_info",
                upcall="hypervisor_callback",
                bottom_half="do_hypervisor_callback",
                block="block_domain"),
    GuestPreset("xreplay-lab", "xreplay's own lab guests (xreplay/lab/guest)",
                shared_info="HYPERVISOR_shared_info",
                upcall="evtchn_upcall_handler",
                bottom_half="evtchn_demux_pending",
                block="evtchn_block_domain",
                shadow="evtchn_callback_ml"),
)}
#: names ``--profile`` takes: the presets above and the symbol-map Linux profile
PROFILE_NAMES = (*PRESETS, "linux")


def preset(name: str) -> GuestPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise XReplayError(f"unknown profile {name!r}: choose one of "
                           f"{', '.join(PROFILE_NAMES)}") from None
