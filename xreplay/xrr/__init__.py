"""The ``.xrr`` recording format: header, writer and streaming reader."""

from xreplay.xrr.header import ProbeSpec, RecordingHeader, RegionSpec
from xreplay.xrr.reader import Note, Record, XrrReader
from xreplay.xrr.writer import XrrWriter

__all__ = ["ProbeSpec", "RecordingHeader", "RegionSpec", "Note", "Record", "XrrReader",
           "XrrWriter"]
