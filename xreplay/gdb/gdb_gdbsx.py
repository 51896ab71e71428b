"""gdb convenience function for per-vCPU stubs such as gdbsx (sourced into gdb's Python).

Why: gdbsx reports one thread per vCPU with the vCPU id as the thread id (``thread:1;``)
and sends only the general registers, so ``$gs_base`` (where Linux's per-cpu
``xen_vcpu_id`` is found on a whole-machine stub) is not there. ``$xr_stub_thread()`` is
the remote thread id of the selected thread: the vCPU id on gdbsx. Standard library only.
"""

import gdb  # type: ignore[import-not-found]


class StubThread(gdb.Function):
    """``$xr_stub_thread()``: the stub's own id of the selected thread (0 if none)."""

    def __init__(self):
        super().__init__("xr_stub_thread")

    def invoke(self):
        thread = gdb.selected_thread()
        if thread is None:
            return gdb.Value(0)
        pid, lwp, tid = thread.ptid
        return gdb.Value(int(lwp or tid or 0))


StubThread()
