"""xreplay: record and replay Xen event-channel state of a live guest.

The package is a library first; :mod:`xreplay.cli` is a thin shell over it.
"""

__version__ = "0.1.0"
