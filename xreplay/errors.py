"""One exception type for every user-facing failure.

The CLI turns an :class:`XReplayError` into a single line on stderr and exit code 2,
so library code raises it with a message that names the thing and what to do.
"""


class XReplayError(Exception):
    """A problem with the user's input or environment, worth one clear line."""
