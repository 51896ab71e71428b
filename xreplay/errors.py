"""The exceptions of xreplay: one root, a few branches a library user can act on.

The CLI turns any :class:`XReplayError` into a single line on stderr and exit code 2, so
library code raises one with a message that names the thing and what to do.  The branches
say *whose* fault it is, for callers that want to branch (skip a corrupt file, retry a lost
target, fix a profile)::

    XReplayError
    ├── FormatError            a file does not follow its format
    │   ├── RecordingFormatError   an .xrr recording (``file``, ``offset``)
    │   └── DebugKeysFormatError   Xen 'e' key output
    ├── RecordingWriteError    writing a recording failed (disk full ...) (``file``, ``snapshots``)
    ├── TargetError            the gdbstub / guest (cannot attach, went away)
    ├── ProfileError           a guest profile or symbol map
    ├── LabError               the Xen lab
    └── UsageError             a bad option value or combination
"""

from __future__ import annotations

import errno as _errno


class XReplayError(Exception):
    """A problem with the user's input or environment, worth one clear line."""


class FormatError(XReplayError):
    """Input that does not follow its format (a stranger's file: never trusted)."""


class RecordingFormatError(FormatError):
    """A damaged or hostile ``.xrr`` recording.

    ``file`` names it; ``offset`` is the byte offset of the frame (or header) at fault, None
    when the fault is not at one place.  Everything before ``offset`` was read intact.
    """

    def __init__(self, message: str, *, file: str = "", offset: int | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.offset = offset


class DebugKeysFormatError(FormatError):
    """Text that is not Xen 'e' debug-key output, or (strict mode) a malformed line."""


class RecordingWriteError(XReplayError):
    """Writing a recording failed; ``snapshots`` were complete on disk before the failure.

    ``errno`` is the OS error number (``errno.ENOSPC`` for a full disk), None when unknown.
    """

    def __init__(self, file: str, snapshots: int, error: OSError) -> None:
        self.file = file
        self.snapshots = snapshots
        self.errno = error.errno
        self.error = error
        what = ("disk full" if error.errno in (_errno.ENOSPC, _errno.EDQUOT)
                else f"{error.strerror or error}")
        super().__init__(f"{what} writing {file} after {snapshots} snapshots")

    @property
    def disk_full(self) -> bool:
        return self.errno in (_errno.ENOSPC, _errno.EDQUOT)


class TargetError(XReplayError):
    """The target (gdbstub, gdb, the guest) refused, failed or went away."""


class ProfileError(XReplayError):
    """A guest profile cannot be built (symbol map missing symbols, wrong ABI ...)."""


class LabError(XReplayError):
    """The Xen lab cannot be set up, booted or driven."""


class UsageError(XReplayError):
    """A command-line value or combination that cannot work."""

