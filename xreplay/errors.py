"""The exceptions of xreplay: one root, a few branches a library user can act on.

The CLI turns any :class:`XReplayError` into a single line on stderr and exit code 2, so
library code raises one with a message that names the thing and what to do.  The branches
say *whose* fault it is, for callers that want to branch (skip a corrupt file, retry a lost
target, fix a profile)::

    XReplayError
    ├── FormatError            a file does not follow its format
    │   ├── RecordingFormatError   an .xrr recording (``file``, ``offset``)
    │   └── DebugKeysFormatError   Xen 'e' key output
    ├── RecordingWriteError    writing a recording failed (disk full ...) (``file``, ``snapshots``;
    │                          also an OSError)
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


class RecordingWriteError(XReplayError, OSError):
    """Writing a recording failed; ``snapshots`` were complete on disk before the failure.

    Also an :class:`OSError` (``errno``, ``strerror`` of the failed write: ``errno.ENOSPC``
    for a full disk), so code that catches OSError around a writer keeps working.
    """

    def __init__(self, file: str, snapshots: int, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.file = file
        self.snapshots = snapshots
        self.error = error
        what = "disk full" if self.disk_full else f"{error.strerror or error}"
        self.message = f"{what} writing {file} after {snapshots} snapshots"

    def __str__(self) -> str:
        return self.message

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

