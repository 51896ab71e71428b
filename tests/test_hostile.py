"""Hostile inputs: checksum-valid damaged recordings, hostile 'e' dumps, failed writes.

Each crash class found by fuzzing has a test here that builds the input by hand (checksums
recomputed, so the parsers behind the CRC are what is tested), plus the bounded fuzz runs of
``benchmarks/fuzz.py`` (the 100,000-case runs are ``python -m benchmarks fuzz``).
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LAB_PROBES

from xreplay import debugkeys as dk
from xreplay.cli import main
from xreplay.errors import (
    DebugKeysFormatError,
    FormatError,
    RecordingFormatError,
    RecordingWriteError,
    UsageError,
    XReplayError,
)
from xreplay.xrr import RecordingHeader, RegionSpec, XrrReader, XrrWriter
from xreplay.xrr import format as fmt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives in the repo, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import fuzz  # noqa: E402

SIZE = 3136  # x86_64 shared_info


def _good(n: int = 6, close: bool = True, **kw) -> bytes:
    header = RecordingHeader.for_arch(
        "x86_64", LAB_PROBES, vcpus=[0, 1], vcpu_info_exprs={1: "&vi"},
        watch=[RegionSpec("shadow", "watch", 64, "&ml")], keyframe_interval=4, **kw)
    buf = io.BytesIO()
    w = XrrWriter(buf, header, version=(1, 0))  # the frames fuzz.split/assemble speak
    page = bytearray(SIZE)
    for i in range(n):
        page[2048 + i] = 1
        w.append(probe=i % 3, vcpu=0, pc=i, regions=[bytes(page), bytes(64), bytes(64)],
                 t_ns=i * 10)
        if i == 2:
            w.note("duplicate-hits", count=1)
    if close:
        w.close()
    return buf.getvalue()


def _with_meta(**changes) -> bytes:
    meta, frames, _ = fuzz.split(_good())
    meta.update(changes)
    return fuzz.assemble(json.dumps(meta).encode(), frames)


def _with_raw_meta(text: str) -> bytes:
    _, frames, _ = fuzz.split(_good())
    return fuzz.assemble(text.encode(), frames)


def _read_all(data: bytes) -> XrrReader:
    r = XrrReader(io.BytesIO(data), name="hostile.xrr")
    for _ in r.snapshots():
        pass
    return r


# --------------------------------------------------------------------------- header


@pytest.mark.parametrize(("change", "needle"), [
    ({"vcpus": [-1]}, "vCPU id -1 is outside"),
    ({"vcpus": [8192]}, "vCPU id 8192 is outside"),
    ({"vcpus": list(range(50_000))}, "more than 8192"),
    ({"vcpus": ["0"]}, "not an integer"),
    ({"labels": {"-1": "x"}}, "is not a port number"),
    ({"labels": {"4096": "x"}}, "labels port 4096 is outside 0..4095"),
    ({"labels": {"\u0663": "x"}}, "is not a port number"),
    ({"notify": {"3": 99999}}, "notify vCPU of port 3"),
    ({"keyframe_interval": 0}, "keyframe_interval 0"),
    ({"target": [1]}, "'target' is not an object"),
    ({"delivery": "pv"}, "'delivery' is not an object"),
    ({"extra": None}, "'extra' is not an object"),
    ({"probes": [{"name": "p", "location": "x", "role": "upcal"}]}, "role 'upcal'"),
])
def test_header_fields_are_checked(change: dict, needle: str) -> None:
    with pytest.raises(RecordingFormatError, match=needle) as e:
        XrrReader(io.BytesIO(_with_meta(**change)), name="h.xrr")
    assert "\n" not in str(e.value) and str(e.value).startswith("h.xrr: header")


@pytest.mark.parametrize(("raw", "needle"), [
    ('"size": 1e400', "size is not an integer"),
    ('"keyframe_interval": 1e400', "keyframe_interval is not an integer"),
    ('"keyframe_interval": Infinity', "keyframe_interval is not an integer"),
])
def test_header_floats_are_not_integers(raw: str, needle: str) -> None:
    meta, _, _ = fuzz.split(_good())
    text = json.dumps(meta)
    if raw.startswith('"size"'):
        text = text.replace('"size": 3136', raw, 1)
    else:
        text = text.replace('"keyframe_interval": 4', raw)
    with pytest.raises(RecordingFormatError, match=needle):
        XrrReader(io.BytesIO(_with_raw_meta(text)), name="h.xrr")


@pytest.mark.parametrize(("region", "needle"), [
    ({"name": "shared_info", "kind": "shared_info", "size": 100}, "wrong arch"),
    ({"name": "shared_info", "kind": "shared_info", "size": 4096}, "wrong arch"),
    ({"name": "si2", "kind": "shared_info", "size": 3136}, "exactly one shared_info"),
    ({"name": "v", "kind": "vcpu_info", "size": 64}, "vcpu is not an integer"),
    ({"name": "v", "kind": "vcpu_info", "size": 64, "vcpu": -3}, "outside"),
    ({"name": "v", "kind": "vcpu_info", "size": 60, "vcpu": 2}, "a x86_64 vcpu_info is 64"),
    ({"name": "w", "kind": "watch", "size": 0}, "size 0 is outside"),
])
def test_region_sizes_and_vcpus_checked_against_the_arch(region: dict, needle: str) -> None:
    meta, frames, _ = fuzz.split(_good())
    meta["regions"] = [r for r in meta["regions"] if r["kind"] == "shared_info"] + [region]
    if region["name"] == "shared_info" and region["size"] != 3136:
        meta["regions"] = [region]
    with pytest.raises(RecordingFormatError, match=needle):
        XrrReader(io.BytesIO(fuzz.assemble(json.dumps(meta).encode(), frames)), name="h")


def test_deeply_nested_json_is_one_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    meta, _, _ = fuzz.split(_good())
    text = json.dumps(meta).replace('"extra": {}', f'"extra": {{"x": {deep}}}')
    with pytest.raises(RecordingFormatError, match="not a JSON object"):
        XrrReader(io.BytesIO(_with_raw_meta(text)), name="h.xrr")
    mild = "[" * 40 + "]" * 40  # parses, but deeper than the format allows
    text = json.dumps(meta).replace('"extra": {}', f'"extra": {{"x": {mild}}}')
    with pytest.raises(RecordingFormatError, match="nests deeper"):
        XrrReader(io.BytesIO(_with_raw_meta(text)), name="h.xrr")


def test_the_writer_refuses_a_header_the_reader_would_refuse(tmp_path: Path) -> None:
    header = RecordingHeader.for_arch("x86_32", LAB_PROBES, labels={1024: "too far"})
    with pytest.raises(UsageError, match="cannot write a recording: its header labels port"):
        XrrWriter(tmp_path / "x.xrr", header)
    assert not (tmp_path / "x.xrr").exists()


def test_a_wide_vcpu_list_costs_nothing_per_snapshot() -> None:
    # 8192 vCPUs are allowed; only those with a vcpu_info anywhere are decoded.
    r = XrrReader(io.BytesIO(_with_meta(vcpus=list(range(8192)))), name="wide.xrr")
    assert r.decoded_vcpus == list(range(32))
    assert all(len(s.vcpus) == 32 for s in r.snapshots())


# --------------------------------------------------------------------------- frames


def _frames_with(i: int, payload: bytes, kind: int = 1) -> tuple[bytes, int]:
    """The good file with frame ``i`` replaced; returns it and that frame's offset."""
    meta, frames, start = fuzz.split(_good())
    frames[i] = (kind, payload)
    data = fuzz.assemble(json.dumps(meta).encode(), frames)
    pos = start
    for _, p in frames[:i]:
        pos += 10 + len(p)
    return data, pos


def _snapshot_frame_index(nth: int) -> int:
    _, frames, _ = fuzz.split(_good())
    return [i for i, (k, _) in enumerate(frames) if k == 1][nth]


def test_payload_cut_inside_its_fields_is_corruption_at_its_offset() -> None:
    _, frames, _ = fuzz.split(_good())
    i = _snapshot_frame_index(3)
    payload = frames[i][1]
    for cut in range(len(payload)):
        data, pos = _frames_with(i, payload[:cut])
        r = XrrReader(io.BytesIO(data), name="cut.xrr")
        seen = []
        with pytest.raises(RecordingFormatError) as e:
            for rec in r.records():
                seen.append(rec.seq)
        assert seen == [0, 1, 2] and e.value.offset == pos, cut
        assert f"corrupt frame at byte {pos}" in str(e.value)


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("t_ns", 2**64, "undecodable snapshot"),
    ("pc", 10**30, "undecodable snapshot"),
    ("seq", 7, "snapshot number 7 where 3 was due"),
    ("probe", 9, "probe 9 not declared"),
    ("vcpu", 9000, "vCPU 9000 beyond"),
])
def test_hostile_snapshot_fields(field: str, value: int, needle: str) -> None:
    _, frames, _ = fuzz.split(_good())
    i = _snapshot_frame_index(3)
    c = fmt.SnapshotPayload.parse(frames[i][1])
    f = {k: c[k] for k in ("seq", "t_ns", "probe", "vcpu", "pc", "sp", "regflags")}
    f[field] = value
    raw = b"".join(fuzz._leb128(f[k]) for k in ("seq", "t_ns", "probe", "vcpu"))
    raw += bytes([fmt.flags_value(c.flags)])
    raw += b"".join(fuzz._leb128(f[k]) for k in ("pc", "sp", "regflags"))
    raw += bytes([len(c.regions)]) + b"".join(
        fmt.Region.build({"region": r.region, "encoding": int(r.encoding), "data": r.data})
        for r in c.regions)
    data, pos = _frames_with(i, raw)
    with pytest.raises(RecordingFormatError, match=needle) as e:
        _read_all(data)
    assert e.value.offset == pos


def test_a_region_stored_twice_or_mis_encoded_is_corruption() -> None:
    _, frames, _ = fuzz.split(_good())
    i = _snapshot_frame_index(1)
    c = fmt.SnapshotPayload.parse(frames[i][1])
    base = {k: c[k] for k in ("seq", "t_ns", "probe", "vcpu", "pc", "sp", "regflags")}
    for regions, needle in (
        ([{"region": 1, "encoding": 2, "data": b""}] * 2, "stored twice"),
        ([{"region": 1, "encoding": 2, "data": b"x"}], "carries data"),
        ([{"region": 0, "encoding": 1, "data": b"\x00\x01x" * 2000}], "not shorter"),
        ([{"region": 0, "encoding": 7, "data": b""}], "unknown region encoding 7"),
    ):
        payload = fmt.snapshot_payload.build({**base, "flags": 0, "regions": regions})
        with pytest.raises(RecordingFormatError, match=needle):
            _read_all(_frames_with(i, payload)[0])


def test_endless_varint_is_bounded() -> None:
    i = _snapshot_frame_index(2)
    data, pos = _frames_with(i, b"\x80" * 1_000_000)
    with pytest.raises(RecordingFormatError, match="undecodable snapshot") as e:
        _read_all(data)
    assert e.value.offset == pos


@pytest.mark.parametrize("after", ["null", '"x"', "1e400", "-1", "true"])
def test_a_note_with_a_bad_after_stops_the_read_there(after: str) -> None:
    meta, frames, start = fuzz.split(_good())
    i = next(i for i, (k, _) in enumerate(frames) if k == 2)
    frames[i] = (2, f'{{"event": "x", "t_ns": 1, "after": {after}}}'.encode())
    data = fuzz.assemble(json.dumps(meta).encode(), frames)
    r = XrrReader(io.BytesIO(data), name="n.xrr")
    seen = []
    with pytest.raises(RecordingFormatError, match="bad 'after'"):
        seen.extend(s.index for s in r.snapshots())
    assert seen == [0, 1, 2]
    assert r.damage is not None and "bad 'after'" in str(r.damage)
    again = []  # a second pass stops at the same place, without parsing the notes again
    with pytest.raises(RecordingFormatError, match="bad 'after'"):
        again.extend(s.index for s in r.snapshots())
    assert again == seen


def test_deep_note_json_is_one_error() -> None:
    meta, frames, _ = fuzz.split(_good())
    i = next(i for i, (k, _) in enumerate(frames) if k == 2)
    frames[i] = (2, b'{"event": "x", "after": 0, "d": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    with pytest.raises(RecordingFormatError, match="note at byte"):
        _read_all(fuzz.assemble(json.dumps(meta).encode(), frames))


# --------------------------------------------------------------------------- reader API


def test_reader_takes_a_path_or_a_stream(tmp_path: Path) -> None:
    data = _good()
    path = tmp_path / "r.xrr"
    path.write_bytes(data)
    with XrrReader(path) as a, XrrReader(io.BytesIO(data), name="mem") as b:
        assert [s.to_json() for s in a.snapshots()] == [s.to_json() for s in b.snapshots()]
        assert a.trailer == b.trailer and a.notes == b.notes and b.name == "mem"
    with open(path, "rb") as f, XrrReader(f) as c:
        assert c.name == str(path) and len(list(c.records())) == 6
        assert not f.closed  # a stream the caller opened is the caller's to close
    r, w = os.pipe()
    with os.fdopen(r, "rb") as pipe, pytest.raises(UsageError, match="seekable"):
        os.close(w)
        XrrReader(pipe)


def test_problems_are_computed_once_not_reset_by_partial_passes() -> None:
    data = _good(close=False)[:-5]  # a torn tail
    r = XrrReader(io.BytesIO(data), name="torn.xrr")
    assert len(r.problems) == 1 and "torn tail" in r.problems[0]
    next(r.snapshots(4))  # random access: a partial pass
    assert len(r.problems) == 1 and r.trailer is None and len(r.notes) == 1


def test_error_taxonomy() -> None:
    assert issubclass(RecordingFormatError, FormatError)
    assert issubclass(DebugKeysFormatError, FormatError) and issubclass(FormatError, XReplayError)
    assert issubclass(dk.MalformedLine, DebugKeysFormatError)
    header = RecordingHeader.for_arch("x86_64", LAB_PROBES)
    with pytest.raises(UsageError):
        header.probe_index("nope")
    w = XrrWriter(io.BytesIO(), header)
    with pytest.raises(UsageError):
        w.append(probe=0, vcpu=0, pc=0, regions=[b"short"])
    with pytest.raises(UsageError):
        w.append(probe=0, vcpu=0, pc=-1, regions=[bytes(SIZE)])


# --------------------------------------------------------------------------- writer faults


def test_leaving_a_with_block_on_an_exception_writes_no_trailer(tmp_path: Path) -> None:
    path = tmp_path / "x.xrr"
    header = RecordingHeader.for_arch("x86_64", LAB_PROBES)
    with pytest.raises(KeyboardInterrupt), XrrWriter(path, header) as w:
        w.append(probe=0, vcpu=0, pc=1, regions=[bytes(SIZE)])
        raise KeyboardInterrupt
    with XrrReader(path) as r:
        assert len(list(r.records())) == 1 and r.trailer is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_one_typed_error_naming_file_and_count() -> None:
    header = RecordingHeader.for_arch("x86_64", LAB_PROBES)
    with pytest.raises(RecordingWriteError) as e:
        XrrWriter("/dev/full", header)
    assert e.value.disk_full and e.value.errno == errno.ENOSPC and e.value.snapshots == 0
    assert isinstance(e.value, OSError)  # code catching OSError around a writer still does
    assert str(e.value) == "disk full writing /dev/full after 0 snapshots"


def test_the_first_write_error_is_kept_and_no_trailer_follows(tmp_path: Path) -> None:
    """A stream that fails after a budget of bytes, like a filling disk (a real file)."""

    class Filling(io.FileIO):
        budget = 0

        def write(self, b) -> int:  # type: ignore[override]
            if self.budget < len(b):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.budget -= len(b)
            return super().write(b)

    path = tmp_path / "fill.xrr"
    header = RecordingHeader.for_arch("x86_64", LAB_PROBES)
    f = Filling(path, "wb")
    f.budget = len(XrrWriter(io.BytesIO(), header)._f.getvalue()) + 4000  # a few snapshots
    w = XrrWriter(f, header)
    page = bytearray(SIZE)
    with pytest.raises(RecordingWriteError) as e:
        for i in range(1000):
            page[2048 + i % 64] ^= 1
            w.append(probe=0, vcpu=0, pc=i, regions=[bytes(page)])
    n = e.value.snapshots
    assert n == w.count and n > 0 and e.value.file == str(path)
    with pytest.raises(RecordingWriteError):
        w.append(probe=0, vcpu=0, pc=0, regions=[bytes(page)])
    with pytest.raises(RecordingWriteError):
        w.close()
    f.close()
    with XrrReader(path) as r:
        assert len(list(r.records())) == n and r.trailer is None


# --------------------------------------------------------------------------- CLI


def test_show_prints_what_was_read_before_damage(tmp_path: Path) -> None:
    i = _snapshot_frame_index(4)
    data, pos = _frames_with(i, b"\x01\x02")
    path = tmp_path / "mid.xrr"
    path.write_bytes(data)
    res = CliRunner().invoke(main, ["show", str(path)])
    assert res.exit_code == 2
    assert "4 snapshots" in res.output and f"READ STOPPED at byte {pos}" in res.output
    assert res.output.strip().splitlines()[-1].startswith("xreplay: error: ")
    res = CliRunner().invoke(main, ["show", str(path), "--json"])
    assert res.exit_code == 2
    doc = json.loads(res.output[:res.output.rindex("}") + 1])
    assert doc["snapshots"] == 4 and doc["stopped"]["offset"] == pos
    res = CliRunner().invoke(main, ["show", str(path), "--changes", "0.."])
    assert res.exit_code == 2 and res.output.count("#") == 2 * 3  # rows 0->1, 1->2, 2->3


def test_export_leaves_nothing_on_damage(tmp_path: Path) -> None:
    data, _ = _frames_with(_snapshot_frame_index(4), b"\x01\x02")
    path = tmp_path / "mid.xrr"
    path.write_bytes(data)
    for fmt_ in ("vcd", "chrome"):
        out = tmp_path / f"o.{fmt_}"
        res = CliRunner().invoke(main, ["export", str(path), "--format", fmt_, "-o", str(out)])
        assert res.exit_code == 2 and "corrupt frame" in res.output
        assert not out.exists() and os.listdir(tmp_path) == ["mid.xrr"]
    good = tmp_path / "good.xrr"
    good.write_bytes(_good())
    res = CliRunner().invoke(main, ["export", str(good), "-o", str(tmp_path / "g.vcd")])
    assert res.exit_code == 0 and (tmp_path / "g.vcd").stat().st_size > 0


def test_cli_on_hostile_files_exits_0_1_2_without_traceback(tmp_path: Path) -> None:
    """Every command on hostile files: exit 0, 1 or 2, never a traceback or an internal
    error; a file the reader refuses is exit 2 for every command.  In-process (click's
    runner, which would report an escaped exception), then two real processes."""
    import random

    rng = random.Random(5)
    seeds = fuzz.recording_seeds()
    files = []
    for i in range(10):
        seed = rng.choice(seeds)
        _, data, _ = fuzz.mutate_recording(seed, rng)
        p = tmp_path / f"h{i}.xrr"
        p.write_bytes(data)
        files.append(p)
    dump = tmp_path / "e.txt"
    dump.write_text("(XEN) Event channel information for domain 1:\n"
                    "(XEN) Polling vCPUs: {" + ",".join(["0-8191"] * 500) + "}\n"
                    "(XEN)        1 [0/1/02]: s=3 n=0 x=0 d=0 p=1\n"
                    "(XEN)        2 [1/0/  \u00b2   ]: s=5 n=0 x=0 v=0\n")
    runs = [["debugkeys", str(dump)], ["debugkeys", str(dump), "--json"]]
    for p in files:
        runs += [["show", str(p)], ["show", str(p), "--json"], ["show", str(p), "--at", "2"],
                 ["replay", str(p)], ["replay", str(p), "--json", "--debugkeys", str(dump)],
                 ["export", str(p), "-o", str(tmp_path / "x.vcd")],
                 ["export", str(p), "--format", "chrome"], ["diff", str(p), str(files[0])]]
    for args in runs:
        res = CliRunner().invoke(main, args)
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.output)
        assert res.exit_code in (0, 1, 2), (args, res.output)
        assert "Traceback" not in res.output and "internal error" not in res.output, args
        if args[0] != "debugkeys":
            try:
                XrrReader(args[1]).close()
            except XReplayError:
                assert res.exit_code == 2, args
    exe = [sys.executable, "-m", "xreplay.cli"]
    for args in (["show", str(files[1])], ["replay", str(files[2])]):
        proc = subprocess.run(exe + args, capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, 1, 2) and "Traceback" not in proc.stderr, args


# --------------------------------------------------------------------------- 'e' dumps

_SECTION = ("(XEN) Event channel information for domain 4:\n(XEN) Polling vCPUs: {}\n"
            "(XEN)     port [p/m/s]\n")


@pytest.mark.parametrize(("line", "why"), [
    ("       1 [0/1/02]: s=3 n=0 x=0 d=0 p=1", "neither the 2-level"),
    ("       1 [0/0/99999999]: s=3 n=0 x=0 d=0 p=1", "bad FIFO state column"),
    ("       1 [1/0/  \u00b2   ]: s=5 n=0 x=0 v=0", "bad FIFO state column"),
    ("       1 [1/0/B 131072]: s=5 n=0 x=0 v=0", "bad FIFO state column"),
    ("       1 [1/0/B 1234567]: s=5 n=0 x=0 v=0", "format"),
    ("    \u0663 [1/0/1]: s=5 n=0 x=0 v=0", "format"),
    ("       1 [1/0/1]: s=\uff15 n=0 x=0 v=0", "format"),
    ("    4096 [1/0/1]: s=5 n=0 x=0 v=0", "beyond the 2-level ABI"),
])
def test_damaged_cells_and_unicode_digits_are_reported_not_reinterpreted(line: str,
                                                                        why: str) -> None:
    (d,) = dk.parse(_SECTION + f"(XEN) {line}\n(XEN)        2 [0/0/0]: s=6 n=0 x=0\n")
    assert [p.port for p in d.ports] == [2] and d.abi == "2l"
    assert len(d.warnings) == 1 and d.warnings[0].startswith("line 4: ") and why in d.warnings[0]


def test_unicode_digits_in_a_header_are_not_a_domain() -> None:
    with pytest.raises(DebugKeysFormatError):
        dk.parse("(XEN) Event channel information for domain \u0663:\n")


def test_a_mixed_abi_section_keeps_the_first_abi() -> None:
    (d,) = dk.parse(_SECTION + "(XEN)        1 [1/0/1]: s=5 n=0 x=0 v=0\n"
                    "(XEN)        2 [1/0/B 3   ]: s=5 n=0 x=0 v=1\n")
    assert [p.port for p in d.ports] == [1] and "other event-channel ABI" in d.warnings[0]


def test_fifo_links_render_what_was_parsed() -> None:
    for col, link in (("  99999 ", None), ("B 131071", 131071), ("  12345", 12345)):
        text = _SECTION + f"(XEN)        1 [1/0/{col}]: s=5 n=0 x=0 v=0\n"
        (d,) = dk.parse(text)
        if link is None:
            assert d.ports == [] and "neither" in d.warnings[0]
            continue
        assert dk.fifo_column(d.ports[0].fifo).link == link
        (back,) = dk.parse(d.render(), strict=True)
        assert back.ports == d.ports


def test_polling_lists_are_bounded_runs() -> None:
    text = ("(XEN) Event channel information for domain 1:\n(XEN) Polling vCPUs: {"
            + ",".join(["0-8191"] * 500) + "}\n")
    (d,) = dk.parse(text)
    assert isinstance(d.polling_vcpus, dk.VcpuSet) and d.polling_vcpus.runs == ((0, 8191),)
    assert len(d.polling_vcpus) == 8192 and 8191 in d.polling_vcpus and 8192 not in d.polling_vcpus
    (d,) = dk.parse(text.replace("0-8191", "0-16383"))
    assert d.polling_vcpus == frozenset() and "vCPU ids are 0-8191" in d.warnings[0]
    assert dk.parse_vcpu_list("3,0-1,2") == {0, 1, 2, 3} == dk.VcpuSet([0, 1, 2, 3])
    assert dk.parse_vcpu_list("3,0-1,2").runs == ((0, 3),)


def test_polling_memory_is_proportional_to_the_text() -> None:
    import tracemalloc

    section = ("(XEN) Event channel information for domain {d}:\n"
               "(XEN) Polling vCPUs: {{0-8191}}\n(XEN)     port [p/m/s]\n")
    text = "".join(section.format(d=d) for d in range(2000))  # ~190 KB
    tracemalloc.start()
    dumps = dk.parse(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(dumps) == 2000
    assert peak < 20 * len(text), (peak, len(text))  # a frozenset each would be ~1.5 GB


# --------------------------------------------------------------------------- bounded fuzz


@pytest.mark.parametrize(("name", "cases"), [("recording", 1000), ("recording-2.0", 600),
                                             ("header", 2000), ("debugkeys", 3000)])
def test_fuzz_finds_no_crash(name: str, cases: int) -> None:
    kw = {"deep_every": 5} if name.startswith("recording") else {}
    report = fuzz.FUZZERS[name](cases, seed=11, **kw)
    assert report.inputs == cases
    assert report.crashes == 0, "\n".join(report.crash_examples)
    assert report.clean_errors > 0 and report.accepted > 0  # both outcomes exercised
