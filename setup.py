"""The compiled part of xreplay: the replay's 2.0 snapshot decoder (xreplay/xrr/_fastdelta.c).

Everything else is declared in pyproject.toml.  The extension is optional: where it cannot
be built (no C compiler, no Python headers) the install still succeeds and the replay uses
the Python decoder it mirrors, which is the reference (``xreplay.xrr.deltas.decoder_kind``
tells which one runs).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("xreplay.xrr._fastdelta", ["xreplay/xrr/_fastdelta.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
