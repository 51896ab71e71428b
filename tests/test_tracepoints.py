"""gdbserver's tracepoints (xreplay.gdb.tracepoints): the packets, the status, the raw
trace buffer; then a real gdbserver collecting in batches that end by themselves."""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import pytest

from xreplay.gdb import tracepoints as tp
from xreplay.gdb.rsp import RspError

ROOT = Path(__file__).resolve().parents[1]


def _frame(tpnum: int, regs: bytes, mem: list[tuple[int, bytes]], stamp: int = 7) -> bytes:
    data = b"R" + regs + b"".join(b"M" + struct.pack("<QH", a, len(d)) + d for a, d in mem)
    data += b"V" + struct.pack("<iq", tp.TIMESTAMP_TSV, stamp)
    return struct.pack("<hI", tpnum, len(data)) + data


def test_agent_expressions_are_gdbs_bytecode() -> None:
    # getv 100; const8 1; add; setv 100; tracev 1; end
    # getv 100; const32 N; less_unsigned; log_not; end
    assert tp.count_action() == b"Xd,2c00642201022d00642e000127"
    assert tp.batch_condition(7) == b"Xb,2c00642400000007150e27"
    with pytest.raises(ValueError):
        tp.batch_condition(0)
    pk = tp.define_tracepoint(1, 0x401000, [(0x407000, 0xC40)])
    assert pk[0] == b"QTDP:1:401000:E:0:0-"
    assert pk[1].startswith(b"QTDP:-1:401000:R1M-1,407000,c40X")


def test_status_is_read_after_run_length_expansion() -> None:
    st = tp.parse_status(b"T0;tstop::0;tframes:a;tcreated:a;tfree:4fe8cc;tsize:50*!;"
                         b"circular:0;disconn:0;starttime:1;stoptime:2;username:;notes::")
    assert (st.running, st.stop_reason, st.frames, st.size) == (False, "tstop", 10, 0x500000)
    assert st.used == 0x500000 - 0x4FE8CC
    with pytest.raises(RspError):
        tp.parse_status(b"E01")


def test_frames_and_their_damage() -> None:
    regs = bytes(range(16))
    raw = _frame(1, regs, [(0x1000, b"ab"), (0x1002, b"cd")]) + _frame(2, regs, [(0x9, b"")])
    frames = list(tp.parse_frames(raw + b"\0" * 6, len(regs)))
    assert [f.tracepoint for f in frames] == [1, 2]
    assert frames[0].registers == regs
    assert frames[0].values == {tp.TIMESTAMP_TSV: 7}
    assert tp.frame_memory(frames[0], 0x1000, 4) == b"abcd"
    assert tp.frame_memory(frames[0], 0x1000, 5) is None
    assert tp.frame_size(16, [(0, 2), (0, 2)]) == len(raw) - len(_frame(2, regs, [(9, b"")]))
    with pytest.raises(RspError):  # blocks misread: an unknown block or a wrong end
        list(tp.parse_frames(raw, len(regs) - 1))
    with pytest.raises(RspError, match="runs past"):
        list(tp.parse_frames(raw[:-1], len(regs)))
    assert tp.buffer_requests(10, 4) == [b"qTBuffer:0,4", b"qTBuffer:4,4", b"qTBuffer:8,2"]


@pytest.mark.gdbserver
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("gcc", "gdbserver", "nm")),
                    reason="needs gcc, gdbserver, nm")
@pytest.mark.parametrize("batch", [7, 40])
def test_gdbserver_batches_collect_every_hit_once(tmp_path: Path, batch: int) -> None:
    """30 hits in batches of 7 (4 whole + a short last one) or one batch: each batch stops
    by itself at its last hit, and snapshot i holds counter i (none lost, none twice)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.record_bench import build_target, run_raw_trace

    m = run_raw_trace(build_target(tmp_path), tmp_path, 30, batch)
    assert m.verified, m.note
    assert m.hits == 30
