"""gdb convenience functions for the Linux profile (sourced into gdb's own Python).

Why: on a whole-machine stub the recorder attaches wherever the machine happens to be,
often in Xen or in another domain whose page tables do not map the guest's per-cpu
memory; a plain ``*(unsigned long *)ADDR`` then fails and the recorder refuses to start.
``$xr_u64(ADDR)`` / ``$xr_u32(ADDR)`` read like that dereference but give 0 when the
memory is not mapped, so the vcpu_info pointer (re-read at every hit) resolves to 0 at
attach time and to the real address at the guest's own hits. Standard library only: gdb
runs this in the system Python.
"""

import gdb  # type: ignore[import-not-found]


class ReadOrZero(gdb.Function):
    """``$NAME(address)``: the little-endian unsigned integer there, or 0 if unreadable."""

    def __init__(self, name, size):
        super().__init__(name)
        self.size = size

    def invoke(self, address):
        try:
            data = gdb.selected_inferior().read_memory(int(address) & 0xFFFFFFFFFFFFFFFF,
                                                       self.size)
            value = int.from_bytes(bytes(data), "little")
        except (gdb.error, ValueError, OverflowError):
            value = 0
        return gdb.Value(value).cast(gdb.lookup_type("unsigned long"))


ReadOrZero("xr_u64", 8)
ReadOrZero("xr_u32", 4)
