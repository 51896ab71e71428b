"""Exports of a recording for viewers: VCD waveforms (GTKWave, Surfer) and Chrome traces
(Perfetto, chrome://tracing).  Both stream the recording once."""

from xreplay.export.chrome import export_chrome
from xreplay.export.vcd import export_vcd

FORMATS = {"vcd": export_vcd, "chrome": export_chrome}

__all__ = ["FORMATS", "export_chrome", "export_vcd"]
