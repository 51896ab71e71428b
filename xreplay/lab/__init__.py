"""Labs that produce real event-channel state to record: see :mod:`xreplay.lab.xen`."""
