"""Guest profiles: turn what is known about a guest kernel into recorder options.

A profile knows where one kind of guest takes its event-channel upcall, demuxes, and keeps
``shared_info`` and its vcpu_info, so a user gives a symbol map instead of a dozen gdb
expressions. :mod:`.linux` covers Linux on the 2-level ABI; :mod:`.peek` is the short gdb
visit a profile uses to check the live guest before recording.
"""

from xreplay.profiles.linux import (
    GuestFacts,
    LinuxSymbols,
    apply,
    inspect_guest,
    linux_profile,
    read_system_map,
)

__all__ = ["GuestFacts", "LinuxSymbols", "apply", "inspect_guest", "linux_profile",
           "read_system_map"]
