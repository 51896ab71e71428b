"""The recording format: writer -> reader round trips, torn tails, corruption, bounds."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from conftest import LAB_PROBES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xreplay.errors import XReplayError
from xreplay.xrr import RecordingHeader, RegionSpec, XrrReader, XrrWriter
from xreplay.xrr import format as fmt
from xreplay.xrr.writer import encode_delta

SIZE = 3136  # x86_64 shared_info


def _header(keyframe_interval: int = 8) -> RecordingHeader:
    return RecordingHeader.for_arch(
        "x86_64", LAB_PROBES, keyframe_interval=keyframe_interval,
        watch=[RegionSpec("shadow", "watch", 64, "&evtchn_callback_ml")])


# A step mutates a few byte ranges of the page and maybe the watch region (or leaves it
# unread), so the writer exercises full, delta, same and absent encodings.
edits = st.lists(st.tuples(st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=40)),
                 max_size=6)
step = st.tuples(edits, st.integers(0, 2), st.integers(0, 3),
                 st.one_of(st.none(), st.binary(min_size=64, max_size=64)),
                 st.booleans(), st.integers(0, 2**64 - 1))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=40), kfi=st.integers(1, 10))
def test_round_trip(tmp_path: Path, steps, kfi: int) -> None:
    path = tmp_path / "rt.xrr"
    page = bytearray(SIZE)
    expected = []
    with XrrWriter(path, _header(kfi)) as w:
        watch_prev = None
        for edits_, probe, vcpu, watch, hang, pc in steps:
            for off, data in edits_:
                page[off:off + len(data)] = data[: SIZE - off]
            w.append(probe=probe, vcpu=vcpu, pc=pc, regions=[bytes(page), watch],
                     regflags=0x246, sp=0x7000, hang=hang)
            watch_prev = watch if watch is not None else watch_prev
            expected.append((probe, vcpu, pc, bytes(page), watch_prev, hang))
    with XrrReader(path) as r:
        got = [(rec.probe, rec.vcpu, rec.pc, rec.regions[0], rec.regions[1], rec.hang)
               for rec in r.records()]
        assert got == expected
        assert r.trailer == {"snapshots": len(steps)}
        assert r.problems == []
        # random access from every point agrees with the sequential read
        for n in range(0, len(steps), 3):
            rec = next(r.records(n))
            assert (rec.seq, rec.regions[0]) == (n, expected[n][3])


regs = st.tuples(st.integers(0, 2**64 - 1), st.one_of(st.none(), st.integers(0, 2**64 - 1)),
                 st.one_of(st.none(), st.integers(0, 2**32)), st.integers(0, 2**40))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(step, st.sampled_from([0, 1, 2]), regs), min_size=1,
                      max_size=40), kfi=st.integers(1, 10))
def test_version_2_reads_back_as_version_1(tmp_path: Path, steps, kfi: int) -> None:
    """The same snapshots written as 1.0 and as 2.0 (implicit seq, time deltas, repeated
    registers, 2-bit region codes) read back field for field the same, from any point;
    every 2.0 payload parses with the construct declaration ``SnapshotPayloadV2``."""
    paths = {}
    for version in ((1, 0), (2, 0)):
        page = bytearray(SIZE)
        path = paths[version] = tmp_path / f"v{version[0]}.xrr"
        last_regs: dict[int, tuple] = {}
        with XrrWriter(path, _header(kfi), version=version) as w:
            for (edits_, probe, vcpu, watch, hang, _), again, (pc, sp, rf, t) in steps:
                for off, data in edits_:
                    page[off:off + len(data)] = data[: SIZE - off]
                if again and probe in last_regs:  # the same registers as this probe's last hit
                    pc, sp, rf = last_regs[probe]
                last_regs[probe] = (pc, sp, rf)
                w.append(probe=probe, vcpu=vcpu, pc=pc, sp=sp, regflags=rf, t_ns=t,
                         regions=[bytes(page), watch], hang=hang)

    def fields(rec):
        return (rec.seq, rec.t_ns, rec.probe, rec.vcpu, rec.flags, rec.pc, rec.sp,
                rec.regflags, rec.regions, rec.hang, rec.keyframe, rec.unread)

    with XrrReader(paths[(1, 0)]) as a, XrrReader(paths[(2, 0)]) as b:
        assert (a.version, b.version) == ((1, 0), (2, 0))
        want = [fields(rec) for rec in a.records()]
        assert [fields(rec) for rec in b.records()] == want
        assert b.problems == [] and b.trailer == {"snapshots": len(steps)}
        for n in range(0, len(steps), 3):  # (a region absent at a keyframe reads as None
            assert fields(next(b.records(n))) == fields(next(a.records(n)))  # from there)
        for (_, kind, buf, i, end), w in zip(b._frames(None, None), want, strict=False):
            assert kind == fmt.KIND_SNAPSHOT
            c = fmt.SnapshotPayloadV2.parse(buf[i:end], nregions=2)
            assert (c.probe, c.vcpu, bool(c.flags.KEYFRAME)) == (w[2], w[3], w[10])
            assert c.seq == (w[0] if w[10] else None)
    assert paths[(2, 0)].stat().st_size < paths[(1, 0)].stat().st_size


def test_bounded_frame_length_v2(tmp_path: Path) -> None:
    path = tmp_path / "big.xrr"
    XrrWriter(path, _header()).abandon()  # a 2.0 header, no frame
    # a snapshot frame whose VarInt length says 2**28 - 1 bytes, beyond MAX_FRAME
    path.write_bytes(path.read_bytes() + bytes([fmt.FRAME_MARK_V2 | 1, 0xFF, 0xFF, 0xFF, 0x7F])
                     + b"x" * 100)
    with XrrReader(path) as r, pytest.raises(XReplayError, match="bad frame length"):
        list(r.records())


@given(st.binary(min_size=1, max_size=300), st.binary(min_size=1, max_size=300))
def test_delta_is_compact_and_exact(a: bytes, b: bytes) -> None:
    b = (b * (len(a) // len(b) + 1))[: len(a)]
    buf = bytearray(a)
    at = 0
    for run in fmt.DeltaRuns.parse(encode_delta(a, b)):
        at += run.skip
        buf[at:at + len(run.data)] = run.data
        at += len(run.data)
    assert bytes(buf) == b
    assert encode_delta(a, a) == b""


def _record_file(tmp_path: Path, n: int = 20, close: bool = True) -> Path:
    path = tmp_path / "t.xrr"
    page = bytearray(SIZE)
    w = XrrWriter(path, _header(4))
    for i in range(n):
        page[2048 + i % 8] ^= 1 << (i % 5)
        page[0] = i & 1
        w.append(probe=i % 3, vcpu=0, pc=i, regions=[bytes(page), bytes(64)], t_ns=i * 1000)
    if close:
        w.close()
    else:
        w._f.close()
    return path


def test_typical_record_is_tens_of_bytes(tmp_path: Path) -> None:
    path = _record_file(tmp_path, n=257)
    with XrrReader(path) as r:
        recs = list(r.records())
    sizes = [b.offset - a.offset for a, b in zip(recs, recs[1:], strict=False)
             if not b.keyframe and not a.keyframe]
    assert max(sizes) < 80, sizes


def test_truncated_at_every_offset_of_last_record(tmp_path: Path) -> None:
    path = _record_file(tmp_path, n=12, close=False)
    data = path.read_bytes()
    with XrrReader(path) as r:
        recs = list(r.records())
        assert r.problems == [] and r.trailer is None
    last = recs[-1].offset
    expected = [rec.regions[0] for rec in recs[:-1]]
    cut_file = tmp_path / "cut.xrr"
    for cut in range(last, len(data)):
        cut_file.write_bytes(data[:cut])
        with XrrReader(cut_file) as r:
            got = [rec.regions[0] for rec in r.records()]
            assert got == expected, cut
            if cut > last:
                assert r.problems and "torn tail" in r.problems[0], cut


def test_torn_crc_on_last_frame_is_a_warning(tmp_path: Path) -> None:
    path = _record_file(tmp_path, n=5, close=False)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    with XrrReader(path) as r:
        assert len(list(r.records())) == 4
        assert "torn tail" in r.problems[0]


def test_corruption_in_the_middle_names_the_offset(tmp_path: Path) -> None:
    path = _record_file(tmp_path, n=10)
    with XrrReader(path) as r:
        offsets = [rec.offset for rec in r.records()]
    data = bytearray(path.read_bytes())
    data[offsets[5] + 8] ^= 0x55
    path.write_bytes(data)
    with XrrReader(path) as r:
        seen = []
        with pytest.raises(XReplayError, match=rf"corrupt frame at byte {offsets[5]}"):
            for rec in r.records():
                seen.append(rec.seq)
        assert seen == [0, 1, 2, 3, 4]


def _raw_header(meta: dict | bytes, major: int = 1) -> bytes:
    body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    prefix = fmt.FileHeaderPrefix.build({"major": major, "minor": 0, "meta_len": len(body)})
    crc = fmt.header_crc(prefix[len(fmt.MAGIC):], body)
    return prefix + body + crc.to_bytes(4, "little")


@pytest.mark.parametrize("blob,message", [
    (b"hello world, not a recording", "bad magic"),
    (b"", "bad magic"),
    (fmt.MAGIC + b"\x01", "ends inside the header"),
    (None, "format version 9.0 is not supported"),
    ("mips", "unknown guest arch 'mips'"),
    ("badcrc", "header checksum mismatch"),
    ("huge", "more than the format allows"),
])
def test_bad_files_give_one_clear_error(tmp_path: Path, blob, message: str) -> None:
    good = _header().to_json()
    if blob is None:
        blob = _raw_header(good, major=9)
    elif blob == "mips":
        blob = _raw_header({**good, "arch": "mips"})
    elif blob == "badcrc":
        blob = bytearray(_raw_header(good))
        blob[-6] ^= 1
        blob = bytes(blob)
    elif blob == "huge":
        blob = fmt.FileHeaderPrefix.build({"major": 1, "minor": 0, "meta_len": 1 << 30})
    path = tmp_path / "bad.xrr"
    path.write_bytes(blob)
    with pytest.raises(XReplayError, match=message) as e:
        XrrReader(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bounded_frame_length(tmp_path: Path) -> None:
    path = tmp_path / "big.xrr"
    path.write_bytes(_raw_header(_header().to_json()) + bytes([fmt.FRAME_MARK, 1])
                     + (fmt.MAX_FRAME + 1).to_bytes(4, "little") + b"x" * 100)
    with XrrReader(path) as r, pytest.raises(XReplayError, match="bad frame marker or length"):
        list(r.records())


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_delta_outside_region_is_rejected(tmp_path: Path, version: tuple[int, int]) -> None:
    header = _header()
    path = tmp_path / "evil.xrr"
    w = XrrWriter(path, header, version=version)
    w.append(probe=0, vcpu=0, pc=0, regions=[bytes(SIZE), bytes(64)])
    run = fmt.DeltaRun.build({"skip": SIZE, "data": b"x"})
    if version == (1, 0):
        evil = fmt.snapshot_payload.build({
            "seq": 1, "t_ns": 1, "probe": 0, "vcpu": 0, "flags": 0, "pc": 0, "sp": 0,
            "regflags": 0, "regions": [{"region": 0, "encoding": fmt.ENC_DELTA,
                                        "data": run}]})
    else:  # flags, dt (ZigZag 1), probe, vcpu, pc, codes (region 0: delta), its data
        codes = fmt.V2_CODES[fmt.ENC_DELTA]
        evil = bytes([0, 2, 0, 0, 0, codes, len(run)]) + run
    w._frame(fmt.KIND_SNAPSHOT, evil)
    w.close()
    with XrrReader(path) as r, pytest.raises(XReplayError, match="past the end"):
        list(r.records())


def test_frame_crc_covers_kind_and_length() -> None:
    assert fmt.frame_crc(1, b"abc") != fmt.frame_crc(2, b"abc")
    assert fmt.frame_crc(1, b"abc") == zlib.crc32(b"abc", zlib.crc32(b"\x01\x03\x00\x00\x00"))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_never_crash_the_reader(tmp_path: Path, data) -> None:
    """Any byte flipped, inserted or cut: every snapshot before the damage reads back, and
    the damage is reported as a torn tail or one XReplayError, never another exception."""
    path = _record_file(tmp_path, n=12)
    blob = bytearray(path.read_bytes())
    with XrrReader(path) as r:
        good = [(rec.offset, rec.regions[0]) for rec in r.records()]
    pos = data.draw(st.integers(0, len(blob) - 1))
    how = data.draw(st.sampled_from(["flip", "insert", "cut"]))
    if how == "flip":
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        del blob[pos:]
    bad = tmp_path / "bad.xrr"
    bad.write_bytes(blob)
    got = []
    try:
        with XrrReader(bad) as r:
            for rec in r.records():
                got.append((rec.offset, rec.regions[0]))
    except XReplayError as e:
        assert str(bad) in str(e) and "\n" not in str(e)
    # frames that end (where the next begins) at or before the damage must read back
    intact = [g for g, nxt in zip(good, good[1:], strict=False) if nxt[0] <= pos]
    assert got[: len(intact)] == intact


def _v2_frames(path: Path) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The file header and (kind, payload) of each frame of a 2.0 file."""
    with XrrReader(path) as r:
        head = path.read_bytes()[: r._data_start]
        return head, [(kind, bytes(buf[i:end])) for _, kind, buf, i, end in
                      r._frames(None, None)]


def _v2_assemble(head: bytes, frames: list[tuple[int, bytes]]) -> bytes:
    from xreplay.xrr.deltas import uvarint

    out = bytearray(head)
    for kind, payload in frames:
        body = bytes([fmt.FRAME_MARK_V2 | kind]) + uvarint(len(payload)) + payload
        out += body + zlib.crc32(body).to_bytes(4, "little")
    return bytes(out)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checksum_valid_damage_in_version_2_is_one_error(tmp_path: Path, data) -> None:
    """A 2.0 snapshot payload damaged anywhere, checksums recomputed (so the decoder behind
    the CRC is what is tested): the snapshots before it read back, then one
    RecordingFormatError at its offset or a clean read of what still parses; never another
    exception, never a region outside its bounds."""
    from xreplay.errors import RecordingFormatError

    path = _record_file(tmp_path, n=12)
    good = tmp_path / "good.xrr"
    with XrrReader(path) as r, XrrWriter(good, r.header) as w:
        for rec in r.records():
            w.append(probe=rec.probe, vcpu=rec.vcpu, pc=rec.pc, sp=rec.sp,
                     regflags=rec.regflags, t_ns=rec.t_ns, hang=rec.hang,
                     regions=rec.regions)
    head, frames = _v2_frames(good)
    snaps = [i for i, (k, _) in enumerate(frames) if k == fmt.KIND_SNAPSHOT]
    i = data.draw(st.sampled_from(snaps))
    payload = bytearray(frames[i][1])
    how = data.draw(st.sampled_from(["flip", "insert", "cut"]))
    pos = data.draw(st.integers(0, max(0, len(payload) - 1)))
    if how == "flip" and payload:
        payload[pos] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        del payload[pos:]
    frames[i] = (frames[i][0], bytes(payload))
    bad = tmp_path / "bad.xrr"
    bad.write_bytes(_v2_assemble(head, frames))
    with XrrReader(good) as r:
        want = [(rec.seq, rec.regions) for rec in r.records()]
    got = []
    try:
        with XrrReader(bad) as r:
            for rec in r.records():
                assert all(x is None or len(x) == s.size
                           for x, s in zip(rec.regions, r.header.regions, strict=True))
                got.append((rec.seq, rec.regions))
    except RecordingFormatError as e:
        assert str(bad) in str(e) and "\n" not in str(e)
    before = snaps.index(i)
    assert got[:before] == want[:before]


@given(st.binary(min_size=1, max_size=700), st.lists(
    st.tuples(st.integers(0, 699), st.binary(min_size=1, max_size=12)), max_size=10))
def test_fast_delta_encoder_is_the_reference(a: bytes, edits_) -> None:
    """The recorder's block-wise encoder gives exactly the runs of the one-regex statement
    (runs across block boundaries, gaps of 1-4 unchanged bytes merged)."""
    from xreplay.xrr.deltas import encode_runs, encode_runs_reference

    b = bytearray(a)
    for off, data in edits_:
        b[off:off + len(data)] = data
    b = bytes(b[:len(a)])
    assert encode_runs(a, b) == encode_runs_reference(a, b)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(step, regs), min_size=1, max_size=30), kfi=st.integers(1, 10))
def test_fast_frame_encoder_builds_the_declaration(tmp_path: Path, steps, kfi: int) -> None:
    """Every 2.0 frame the hand-coded writer emits is byte for byte what construct builds
    from format.py's declarations (FrameHeadV2, SnapshotPayloadV2) for the same fields."""
    path = tmp_path / "v2.xrr"
    page = bytearray(SIZE)
    with XrrWriter(path, _header(kfi)) as w:
        for (edits_, probe, vcpu, watch, hang, _), (pc, sp, rf, t) in steps:
            for off, data in edits_:
                page[off:off + len(data)] = data[: SIZE - off]
            w.append(probe=probe, vcpu=vcpu, pc=pc, sp=sp, regflags=rf, t_ns=t,
                     regions=[bytes(page), watch], hang=hang)
    raw = path.read_bytes()
    with XrrReader(path) as r:
        frames = [(off, bytes(buf[i:end])) for (off, kind, buf, i, end)
                  in r._frames(None, None) if kind == fmt.KIND_SNAPSHOT]
    assert len(frames) == len(steps)
    for off, payload in frames:
        parsed = fmt.SnapshotPayloadV2.parse(payload, nregions=2)
        assert fmt.SnapshotPayloadV2.build(parsed, nregions=2) == payload
        head = fmt.FrameHeadV2.build({"head": fmt.FRAME_MARK_V2 | fmt.KIND_SNAPSHOT,
                                      "length": len(payload)})
        body = head + payload
        assert raw[off:off + len(body)] == body
        assert raw[off + len(body):off + len(body) + 4] == zlib.crc32(body).to_bytes(4, "little")
