"""``python -m benchmarks fuzz [--hits N]``: hostile inputs for every parser of a stranger's file.

Recordings and 'e' dumps travel between people, so each parser is fed N mutated inputs
(default 100,000 each) and every outcome is counted:

* ``recording`` — whole ``.xrr`` files through what ``show``, ``replay`` and ``export`` do.
  Mutations: raw byte damage (flips, inserts, cuts: the CRC catches most), and
  *checksum-valid* ones — header JSON, snapshot payloads (bytes and fields), notes, frame
  kinds and order — with every CRC recomputed, so the parsers behind the checksum are hit.
  Raw damage also checks that every frame before the damage reads back unchanged.
* ``recording-2.0`` — the same seeds written in 2.0, snapshot payloads damaged behind
  right CRCs (the 2.0 decoders' input), frames dropped, repeated or re-kinded; each also
  decoded by the compiled and the Python snapshot decoder, which must agree hit for hit.
* ``header`` — the ``.xrr`` header alone: the prefix fields and hostile JSON values
  (wrong types, ``1e400``, 100,000-deep nesting, 50,000-entry lists), CRC recomputed.
* ``debugkeys`` — Xen 'e' key text: Unicode digits, damaged ``[p/m/s]`` cells, huge
  ``Polling vCPUs`` lists, cut and shuffled lines; every parse is rendered and parsed back
  (what is parsed must render to text that parses to the same ports).

An outcome is *accepted* (read without complaint), a *clean error* (one
:class:`~xreplay.errors.XReplayError`), or a *crash* (any other exception, or a broken
property).  The table shows inputs, each outcome, the slowest input (CPU time, so that
other load on a shared machine does not count) and the process's peak memory; the run
fails (exit 1) on any crash or any input that took more than 1 s.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import BenchArgs, register

DEFAULT_CASES = 100_000
TIME_LIMIT_S = 1.0
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class FuzzReport:
    parser: str
    inputs: int = 0
    accepted: int = 0
    clean_errors: int = 0
    crashes: int = 0
    crash_examples: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    slowest_input: str = ""
    over_limit: int = 0
    peak_rss_kb: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.crashes == 0 and self.over_limit == 0

    def row(self) -> str:
        return (f"| {self.parser} | {self.inputs} | {self.accepted} | {self.clean_errors} "
                f"| {self.crashes} | {self.slowest_s * 1000:.1f} ms ({self.slowest_input}) "
                f"| {self.over_limit} | {self.peak_rss_kb / 1024:.0f} MiB | {self.seconds:.0f} s |")


TABLE_HEAD = ("| parser | inputs | accepted | clean errors | crashes | slowest input "
              "| over 1 s | peak RSS | wall |\n|" + "---|" * 9)


def _run_case(report: FuzzReport, desc: str, fn: Callable[[], None],
              data: bytes | str = b"") -> None:
    """Run one input; with XREPLAY_FUZZ_SAVE=DIR, crashing and slowest inputs are kept there."""
    from xreplay.errors import XReplayError

    report.inputs += 1
    crashes = report.crashes
    t = time.process_time()
    try:
        fn()
        report.accepted += 1
    except XReplayError as e:
        if "\n" in str(e):
            _crash(report, desc, f"multi-line error: {str(e)[:200]!r}")
        else:
            report.clean_errors += 1
    except Exception as e:  # noqa: BLE001 - counting crashes is the point
        tb = traceback.extract_tb(e.__traceback__)[-1]
        _crash(report, desc, f"{type(e).__name__}: {str(e)[:160]} at "
               f"{Path(tb.filename).name}:{tb.lineno}")
    dt = time.process_time() - t  # CPU time: a loaded machine does not slow a bounded input
    keep = os.environ.get("XREPLAY_FUZZ_SAVE")
    if dt > report.slowest_s:
        report.slowest_s, report.slowest_input = dt, desc
        if keep:
            _save(Path(keep) / f"{report.parser}-slowest", data)
    if dt > TIME_LIMIT_S:
        report.over_limit += 1
    if keep and report.crashes > crashes:
        _save(Path(keep) / f"{report.parser}-crash-{report.crashes}", data)


def _save(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)


def _crash(report: FuzzReport, desc: str, what: str) -> None:
    report.crashes += 1
    if len(report.crash_examples) < 10:
        report.crash_examples.append(f"{desc}: {what}")


class PropertyBroken(Exception):
    """A parser returned, but broke a promise (lost intact data, did not render back)."""


# --------------------------------------------------------------------------- hostile values

INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024,
                    4095, 4096, 8191, 8192, 16383, 32768, 65535, 131071, 131072, 2**31 - 1,
                    2**31, 2**32, 2**63, 2**64, 2**64 + 1, -(2**63)]
RAW_JSON = ["null", "true", "false", '""', '"x"', "1e400", "-1e400", "1.5", "-0", "NaN",
            "Infinity", "-Infinity", "[]", "{}", "[null]", '{"": null}', "9" * 5000,
            '"\\ud800"', '"\\u0000"', '"٣"', '"\u00b2"', '"１"']


def hostile_json_value(rng: random.Random) -> str:
    """Raw JSON text of a hostile value."""
    c = rng.random()
    if c < 0.35:
        return rng.choice(RAW_JSON)
    if c < 0.6:
        return str(rng.choice(INTERESTING_INTS))
    if c < 0.7:
        return _big_json("nest", rng.choice([33, 100, 1000, 100_000]))
    if c < 0.8:
        return _big_json("list", rng.choice([300, 5000, 50_000]))
    if c < 0.9:
        return _big_json("dict", rng.choice([300, 5000, 50_000]))
    return _big_json("str", rng.choice([1, 300, 70_000]))


@functools.cache
def _big_json(kind: str, n: int) -> str:
    """The large hostile values, built once (building them is not what is measured)."""
    if kind == "nest":
        return "[" * n + "]" * n
    if kind == "list":
        return "[" + ",".join(str(i) for i in range(n)) + "]"
    if kind == "dict":
        return "{" + ",".join(f'"{i}": "p{i}"' for i in range(n)) + "}"
    return json.dumps("x" * n)


def mutate_json(doc: Any, rng: random.Random) -> str:
    """``doc`` re-serialised with one to three hostile edits at random places."""
    doc = json.loads(json.dumps(doc))
    marks: dict[str, str] = {}
    for _ in range(rng.randint(1, 3)):
        path: list[Any] = []
        node = doc
        while isinstance(node, dict | list) and node and rng.random() < 0.7:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append(key)
            node = node[key]
        if not path:
            if isinstance(doc, dict):
                path = [rng.choice(list(doc) + ["vcpus", "labels", "notify", "after", "x"])]
            else:
                continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        op = rng.random()
        if op < 0.15 and isinstance(parent, dict):
            parent.pop(last, None)
        elif op < 0.25 and isinstance(parent, list) and parent:
            parent.append(parent[-1])
        elif op < 0.35 and isinstance(parent, dict):  # a port/vCPU-like key
            key = rng.choice(["-1", "4096", "99999", "٣", "1e3", " 1", "0x10", "00001"])
            parent[key] = rng.choice([0, 1, "x", None, 8191, 8192])
        else:
            mark = f"@@{len(marks)}@@"
            marks[mark] = hostile_json_value(rng)
            parent[last] = mark
    text = json.dumps(doc)
    for mark, raw in marks.items():
        text = text.replace(json.dumps(mark), raw)
    return text


def mutate_bytes(data: bytes, rng: random.Random, ops: int | None = None
                 ) -> tuple[bytes, int]:
    """Byte-level damage; returns the new bytes and the lowest offset touched."""
    buf = bytearray(data)
    low = len(buf)
    for _ in range(ops or rng.randint(1, 3)):
        if not buf:
            buf += bytes([rng.randrange(256)])
            low = 0
            continue
        at = rng.randrange(len(buf) + 1)
        c = rng.random()
        if c < 0.3 and at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        elif c < 0.45 and at < len(buf):
            buf[at] = rng.choice([0, 0x7F, 0x80, 0xFF, 0xA5, 1, 2, 3])
        elif c < 0.6:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif c < 0.75:
            del buf[at:at + rng.randint(1, 16)]
        elif c < 0.85:
            del buf[at:]
        elif c < 0.95:
            buf[at:at] = b"\x80" * rng.choice([9, 10, 11, 64, 5000])  # endless VarInts
        else:
            n = rng.randint(1, 64)
            buf[at:at] = buf[max(0, at - n):at]
        low = min(low, at)
    return bytes(buf), low


# --------------------------------------------------------------------------- recordings


def _leb128(n: int) -> bytes:
    """A VarInt of any size (the writer refuses what a hostile file may hold)."""
    n %= 1 << 100  # a "negative" value: a long one
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass
class Seed:
    name: str
    meta: dict[str, Any]
    frames: list[tuple[int, bytes]]  # (kind, payload)
    data: bytes
    data_start: int
    records: list[tuple[int, int, tuple]]  # (frame end offset, seq, regions)


def assemble(meta: bytes, frames: list[tuple[int, bytes]], major: int = 1, minor: int = 0
             ) -> bytes:
    """A recording from header JSON and frames, every checksum right."""
    from xreplay.xrr import format as fmt

    prefix = fmt.MAGIC + major.to_bytes(2, "little") + minor.to_bytes(2, "little") \
        + len(meta).to_bytes(4, "little")
    out = bytearray(prefix + meta + fmt.header_crc(prefix[len(fmt.MAGIC):], meta)
                    .to_bytes(4, "little"))
    for kind, payload in frames:
        out += bytes([fmt.FRAME_MARK, kind & 0xFF]) + len(payload).to_bytes(4, "little")
        out += payload + fmt.frame_crc(kind & 0xFF, payload).to_bytes(4, "little")
    return bytes(out)


def split(data: bytes) -> tuple[dict[str, Any], list[tuple[int, bytes]], int]:
    """A valid recording's header JSON, frames and first frame offset."""
    from xreplay.xrr import format as fmt

    meta_len = int.from_bytes(data[12:16], "little")
    meta = json.loads(data[16:16 + meta_len])
    pos = start = 16 + meta_len + 4
    frames = []
    while pos + fmt.FRAME_HEAD_SIZE <= len(data):
        kind, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 6], "little")
        frames.append((kind, data[pos + 6:pos + 6 + length]))
        pos += 6 + length + 4
    return meta, frames, start


def _synthetic(arch: str, n: int, *, vcpu_info: bool, watch: bool, close: bool,
               kfi: int) -> bytes:
    from xreplay.abi import layout
    from xreplay.xrr import ProbeSpec, RecordingHeader, RegionSpec, XrrWriter

    st = layout(arch)
    probes = [ProbeSpec("upcall", "evtchn_upcall_handler", "upcall"),
              ProbeSpec("bottom-half", "evtchn_demux_pending", "bottom-half"),
              ProbeSpec("block", "evtchn_block_domain", "block")]
    header = RecordingHeader.for_arch(
        arch, probes, vcpus=[0, 1] if vcpu_info else [0],
        vcpu_info_exprs={1: "&vi1"} if vcpu_info else None,
        watch=[RegionSpec("evtchn_callback_ml", "watch", 64, "&ml")] if watch else None,
        labels={1: "xenstore", 3: "timer"}, notify={3: 1} if vcpu_info else {},
        keyframe_interval=kfi, target={"kind": "fuzz", "description": "seed"},
        delivery={"mechanism": "model", "vector": 32})
    rng = random.Random(arch)
    buf = io.BytesIO()
    # split/assemble speak the 1.0 frame layout: the seeds are 1.0 files (still read);
    # 2.0 frames are fuzzed by tests/test_xrr.py's damaged-file property test
    w = XrrWriter(buf, header, version=(1, 0))
    shared = bytearray(st.shared_info.sizeof())
    vi = bytearray(st.vcpu_info.sizeof())
    pend = st.fields("shared_info")["evtchn_pending"][0]
    for i in range(n):
        shared[pend + rng.randrange(8)] ^= 1 << rng.randrange(8)
        shared[0] = i & 1  # vcpu 0's evtchn_upcall_pending
        vi[0] = (i >> 1) & 1
        regions: list[bytes | None] = [bytes(shared)]
        if vcpu_info:
            regions.append(bytes(vi) if i % 5 != 3 else None)
        if watch:
            regions.append(bytes(rng.randrange(256) for _ in range(64)) if i % 3 else None)
        w.append(probe=i % 3, vcpu=i % 2 if vcpu_info else 0, pc=0x1000 + i,
                 regions=regions, regflags=0x246 if i % 4 else 0x46, sp=0x7000,
                 t_ns=i * 1000, hang=i == n - 1)
        if i == n // 2:
            w.note("duplicate-hits", count=2)
    if close:
        w.close(reason="count")
    return buf.getvalue()


def _real(path: Path, keep: int) -> bytes | None:
    """The header and first ``keep`` snapshots of a real recording (no trailer)."""
    if not path.exists():
        return None
    data = path.read_bytes()
    meta, frames, start = split(data)
    out, snaps = [], 0
    for kind, payload in frames:
        out.append((kind, payload))
        snaps += kind == 1
        if snaps >= keep:
            break
    return assemble(json.dumps(meta).encode(), out)


def recording_seeds() -> list[Seed]:
    from xreplay.xrr import XrrReader

    raw = [("x86_64+vcpu_info", _synthetic("x86_64", 10, vcpu_info=True, watch=True,
                                           close=True, kfi=4)),
           ("x86_32", _synthetic("x86_32", 6, vcpu_info=False, watch=False, close=False,
                                 kfi=3)),
           ("arm64", _synthetic("arm64", 5, vcpu_info=False, watch=True, close=True, kfi=2))]
    for name in ("lost-upcall-process.xrr", "xenlab-pv-domu-smp.xrr"):
        data = _real(ROOT / "recordings" / name, 8)
        if data is not None:
            raw.append((name, data))
    seeds = []
    for name, data in raw:
        meta, frames, start = split(data)
        with XrrReader(io.BytesIO(data), name=name) as r:
            recs = [(rec.offset, rec.seq, tuple(rec.regions)) for rec in r.records()]
        ends = {}
        pos = start
        for _kind, payload in frames:
            ends[pos] = pos + 10 + len(payload)
            pos = ends[pos]
        seeds.append(Seed(name, meta, frames, data, start,
                          [(ends[off], seq, regions) for off, seq, regions in recs]))
    return seeds


def _mutate_payload_fields(payload: bytes, rng: random.Random) -> bytes:
    """A snapshot payload with one field replaced by a hostile value (re-encoded by hand)."""
    from xreplay.xrr import format as fmt

    c = fmt.SnapshotPayload.parse(payload)
    fields = {"seq": c.seq, "t_ns": c.t_ns, "probe": c.probe, "vcpu": c.vcpu,
              "flags": fmt.flags_value(c.flags), "pc": c.pc, "sp": c.sp,
              "regflags": c.regflags}
    regions = [[r.region, int(r.encoding), bytes(r.data)]
               for r in c.regions]
    target = rng.choice(list(fields) + ["region", "encoding", "data", "dup", "drop",
                                        "delta", "count"])
    count = None
    if target in fields:
        fields[target] = rng.choice(INTERESTING_INTS + [10**30, 2**70])
        if target == "flags":
            fields[target] &= 0xFF
    elif regions:
        reg = rng.choice(regions)
        if target == "region":
            reg[0] = rng.choice([0, 1, 2, 3, 254, 255])
        elif target == "encoding":
            reg[1] = rng.choice([0, 1, 2, 3, 4, 255])
        elif target == "data":
            reg[2] = rng.choice([b"", reg[2][:-1], reg[2] + b"\0", reg[2] * 2, b"\x01"])
        elif target == "dup":
            regions.append(list(reg))
        elif target == "drop":
            regions.remove(reg)
        elif target == "delta":
            reg[1] = 1
            skip = rng.choice([0, 1, 3000, 3135, 3136, 2**40, 2**64 - 1])
            run = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 8, 200])))
            reg[2] = (_leb128(skip) + _leb128(len(run)) + run) * rng.choice([1, 2, 40])
        elif target == "count":
            count = rng.choice([0, len(regions) + 1, 255])
    out = bytearray()
    for name in ("seq", "t_ns", "probe", "vcpu"):
        out += _leb128(fields[name])
    out.append(fields["flags"] & 0xFF)
    for name in ("pc", "sp", "regflags"):
        out += _leb128(fields[name])
    out.append(len(regions) if count is None else count)
    for idx, enc, data in regions:
        out += bytes([idx & 0xFF, enc & 0xFF]) + _leb128(len(data)) + data
    return bytes(out)


def mutate_recording(seed: Seed, rng: random.Random) -> tuple[str, bytes, int | None]:
    """(description, bytes, lowest damaged offset for raw damage else None)."""
    c = rng.random()
    frames = list(seed.frames)
    meta = json.dumps(seed.meta).encode()
    snap_at = [i for i, (k, _) in enumerate(frames) if k == 1]
    if c < 0.25:
        data, low = mutate_bytes(seed.data, rng)
        return "bytes", data, low
    if c < 0.45:
        return "header-json", assemble(mutate_json(seed.meta, rng).encode(), frames), None
    if c < 0.5:
        mutated, _ = mutate_bytes(meta, rng, 1)
        return "header-bytes", assemble(mutated, frames), None
    if c < 0.65 and snap_at:
        i = rng.choice(snap_at)
        mutated, _ = mutate_bytes(frames[i][1], rng)
        frames[i] = (1, mutated)
        return "payload-bytes", assemble(meta, frames), None
    if c < 0.85 and snap_at:
        i = rng.choice(snap_at)
        frames[i] = (1, _mutate_payload_fields(frames[i][1], rng))
        return "payload-fields", assemble(meta, frames), None
    if c < 0.92:
        notes = [i for i, (k, _) in enumerate(frames) if k in (2, 3)]
        if notes:
            i = rng.choice(notes)
            kind, payload = frames[i]
            frames[i] = (kind, mutate_json(json.loads(payload), rng).encode())
        else:
            frames.append((2, mutate_json({"event": "x", "t_ns": 1, "after": 0}, rng).encode()))
        return "note-json", assemble(meta, frames), None
    op = rng.random()
    if op < 0.3 and frames:
        i = rng.randrange(len(frames))
        frames[i] = (rng.choice([0, 1, 2, 3, 4, 200, 255]), frames[i][1])
    elif op < 0.55 and len(frames) > 1:
        i, j = rng.randrange(len(frames)), rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    elif op < 0.75 and frames:
        i = rng.randrange(len(frames))
        frames.insert(i, frames[rng.randrange(len(frames))])
    elif op < 0.9 and frames:
        del frames[rng.randrange(len(frames))]
    else:
        major, minor = rng.choice([(0, 0), (1, 1), (1, 65535), (2, 0), (65535, 0)])
        return "prefix", assemble(meta, frames, major, minor), None
    return "frames", assemble(meta, frames), None


def consume_recording(data: bytes, got: list[tuple] | None = None, *, name: str = "fuzz.xrr",
                      deep: bool = True) -> None:
    """Everything ``show``, ``replay`` and ``export`` do with a file; ``got`` receives
    (seq, regions) of each record read before any error, for the intact-prefix check."""
    from xreplay import inspect
    from xreplay.export import export_chrome, export_vcd
    from xreplay.output import _json_default
    from xreplay.replay import replay
    from xreplay.xrr import XrrReader

    stream = io.BytesIO(data)
    with XrrReader(stream, name=name) as r:
        if got is not None:  # raw damage: the records before it, for the prefix check
            for rec in r.records():
                got.append((rec.seq, tuple(rec.regions)))
        s = inspect.summary(r)
        first, last, stopped = s.pop("_first"), s.pop("_last"), s.pop("_stopped")
        json.dumps(s, default=_json_default)  # what show --json serialises
        for snap in (first, last):
            if snap is not None:
                snap.render()
        r.problems, r.notes, r.trailer, r.damage  # noqa: B018 - the properties parse
        if stopped is not None:
            raise stopped
        if deep:
            n = s["snapshots"]
            if n:
                r.snapshot(n // 2).render()
                for row in inspect.iter_changes(r, 0, None):
                    json.dumps(row, default=_json_default)
            res = replay(r)
            json.dumps(res.to_json(), default=_json_default)
            export_vcd(stream, io.StringIO())
            export_chrome(stream, io.StringIO())


def fuzz_recordings(cases: int, seed: int = 1, deep_every: int = 1) -> FuzzReport:
    """``cases`` mutated recordings; every ``deep_every``-th also replayed and exported."""
    report = FuzzReport("recording")
    rng = random.Random(seed)
    seeds = recording_seeds()
    t0 = time.perf_counter()
    for i in range(cases):
        s = rng.choice(seeds)
        kind, data, low = mutate_recording(s, rng)
        desc = f"{s.name}/{kind} #{i} ({len(data)} bytes)"
        deep = i % deep_every == 0

        def case(s: Seed = s, data: bytes = data, low: int | None = low,
                 deep: bool = deep) -> None:
            check = low is not None and low >= s.data_start
            got: list[tuple] | None = [] if check else None
            try:
                consume_recording(data, got, deep=deep)
            finally:
                if got is not None and low is not None:
                    _check_prefix(s, got, low)

        _run_case(report, desc, case, data)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return report


def _check_prefix(seed: Seed, got: list[tuple], low: int) -> None:
    """Raw damage at ``low``: every snapshot whose frame ends before it must read back."""
    want = [(seq, regions) for end, seq, regions in seed.records if end <= low]
    if got[:len(want)] != want:
        raise PropertyBroken(f"damage at byte {low} lost intact snapshots: read "
                             f"{len(got)}, {len(want)} were before the damage")


# --------------------------------------------------------------------------- 2.0 recordings


def split_v2(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A valid 2.0 recording's file header (prefix, JSON, CRC) and frames (kind, payload),
    as the reader's own frame loop finds them."""
    from xreplay.xrr import XrrReader

    with XrrReader(io.BytesIO(data), name="seed.xrr") as r:
        frames = [(kind, bytes(buf[i:end])) for _pos, kind, buf, i, end
                  in r._frames(None, None)]
        return data[:r._data_start], frames


def assemble_v2(head: bytes, frames: list[tuple[int, bytes]]) -> bytes:
    """A 2.0 recording from its file header and frames, every frame's CRC right."""
    import zlib

    from xreplay.xrr import format as fmt

    out = bytearray(head)
    for kind, payload in frames:
        body = bytes((fmt.FRAME_MARK_V2 | (kind & fmt.MAX_FRAME_KIND_V2),)) \
            + _leb128(len(payload)) + payload
        out += body + zlib.crc32(body).to_bytes(4, "little")
    return bytes(out)


def v2_seeds() -> list[tuple[str, bytes, list[tuple[int, bytes]]]]:
    """The recording seeds written again in 2.0: (name, file header, frames)."""
    import tempfile

    from xreplay.xrr.writer import rewrite

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in recording_seeds():
            src, dst = Path(tmp) / "v1.xrr", Path(tmp) / "v2.xrr"
            src.write_bytes(seed.data)
            rewrite(src, dst)
            head, frames = split_v2(dst.read_bytes())
            out.append((seed.name, head, frames))
    out.append(("x86_64-runs", *split_v2(_runs_v2(40))))
    return out


def _runs_v2(n: int) -> bytes:
    """A 2.0 seed whose deltas hold runs of every length from 1 to 200 bytes, at a region's
    edges too, with unread regions and repeated and changing registers."""
    from xreplay.abi import layout
    from xreplay.xrr import ProbeSpec, RecordingHeader, RegionSpec, XrrWriter

    size = layout("x86_64").shared_info.sizeof()
    header = RecordingHeader.for_arch(
        "x86_64", [ProbeSpec("upcall", "u", "upcall"), ProbeSpec("block", "b", "block")],
        keyframe_interval=16, watch=[RegionSpec("ml", "watch", 64, "&ml")])
    rng = random.Random("runs")
    page, ml = bytearray(size), bytearray(64)
    buf = io.BytesIO()
    w = XrrWriter(buf, header)
    for i in range(n):
        for region in (page, ml):
            for _ in range(rng.randint(0, 3)):
                k = rng.choice([1, 2, 3, 5, 8, 17, 64, 200])
                at = rng.choice([0, len(region) - k, rng.randrange(len(region))])
                region[max(0, at):at + k] = rng.randbytes(len(region[max(0, at):at + k]))
        w.append(probe=i % 2, vcpu=0, pc=0x1000 + (i // 3), sp=0x7000 if i % 4 else None,
                 regflags=0x246, t_ns=i * 1000 + rng.randint(0, 900),
                 regions=[bytes(page), None if i % 7 == 3 else bytes(ml)])
    w.close(reason="count")
    return buf.getvalue()


def mutate_recording_v2(head: bytes, frames: list[tuple[int, bytes]], rng: random.Random
                        ) -> tuple[str, bytes]:
    """A 2.0 recording with snapshot payloads damaged behind right CRCs (what reaches the
    snapshot decoders), or frames dropped, repeated or re-kinded."""
    frames = list(frames)
    snaps = [i for i, (k, _) in enumerate(frames) if k == 1]
    c = rng.random()
    if c < 0.7 and snaps:
        for _ in range(rng.choice([1, 1, 2, 4])):
            i = rng.choice(snaps)
            frames[i] = (1, mutate_bytes(frames[i][1], rng)[0])
        return "payload-bytes", assemble_v2(head, frames)
    if c < 0.85 and snaps:
        i = rng.choice(snaps)
        payload = bytearray(frames[i][1])
        if payload:
            payload[0] = rng.choice([0x00, 0x01, 0x10, 0x11, 0x1F, 0x20, 0xFF])  # the flags
        frames[i] = (1, bytes(payload))
        return "payload-flags", assemble_v2(head, frames)
    if frames:
        i = rng.randrange(len(frames))
        op = rng.randrange(3)
        if op == 0:
            del frames[i]
        elif op == 1:
            frames.insert(i, frames[rng.randrange(len(frames))])
        else:
            frames[i] = (rng.choice([0, 2, 3, 9, 15]), frames[i][1])
    return "frames", assemble_v2(head, frames)


def decoders_agree(data: bytes) -> None:
    """Every hit (fields, missing regions, offset) and the final error are the same through
    the compiled snapshot decoder and the Python one it mirrors (PropertyBroken if not)."""
    from xreplay.errors import XReplayError
    from xreplay.xrr import XrrReader, deltas

    def walk() -> tuple[list[tuple], str | None]:
        got: list[tuple] = []
        try:
            with XrrReader(io.BytesIO(data), name="fuzz.xrr") as r:
                for fields, missing, _reset, pos in r.raw_deltas():
                    got.append((fields, missing, pos, list(r.hulls),
                                [None if b is None else bytes(b) for b in r.buffers]))
        except XReplayError as e:
            return got, str(e)
        return got, None

    compiled = deltas._COMPILED
    fast = walk()
    deltas._COMPILED = None
    try:
        slow = walk()
    finally:
        deltas._COMPILED = compiled
    if fast != slow:
        n = next((k for k, (a, b) in enumerate(zip(fast[0], slow[0], strict=False)) if a != b),
                 min(len(fast[0]), len(slow[0])))
        raise PropertyBroken(f"compiled and Python snapshot decoders differ at hit {n} "
                             f"(errors: {fast[1]!r} vs {slow[1]!r})")


def fuzz_recordings_v2(cases: int, seed: int = 1, deep_every: int = 1) -> FuzzReport:
    """``cases`` 2.0 recordings damaged behind their CRCs: read, replayed and exported as
    ``recording`` does, and decoded by both snapshot decoders, which must agree."""
    from xreplay.xrr import deltas

    report = FuzzReport("recording-2.0")
    rng = random.Random(seed)
    seeds = v2_seeds()
    t0 = time.perf_counter()
    for i in range(cases):
        name, head, frames = rng.choice(seeds)
        kind, data = mutate_recording_v2(head, frames, rng)
        deep = i % deep_every == 0

        def case(data: bytes = data, deep: bool = deep) -> None:
            if deltas._COMPILED is not None:  # first: a clean error below ends the case
                decoders_agree(data)
            consume_recording(data, deep=deep)

        _run_case(report, f"{name}/{kind} #{i} ({len(data)} bytes)", case, data)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return report


# --------------------------------------------------------------------------- header


def fuzz_header(cases: int, seed: int = 1) -> FuzzReport:
    """The header alone: hostile JSON and prefix fields, checksums right."""
    from xreplay.xrr import RecordingHeader, XrrReader

    report = FuzzReport("header")
    rng = random.Random(seed)
    metas = [s.meta for s in recording_seeds()]
    t0 = time.perf_counter()
    for i in range(cases):
        meta = rng.choice(metas)
        c = rng.random()
        major, minor = 1, 0
        if c < 0.75:
            body = mutate_json(meta, rng).encode()
            kind = "json"
        elif c < 0.9:
            body, _ = mutate_bytes(json.dumps(meta).encode(), rng)
            kind = "bytes"
        else:
            body = json.dumps(meta).encode()
            major, minor = rng.choice([(0, 0), (1, 9), (2, 0), (65535, 65535)])
            kind = "version"
        data = assemble(body, [], major, minor)
        if rng.random() < 0.05:  # a meta_len that lies
            data = data[:12] + rng.choice([0, 1, 2**20 + 1, 2**32 - 1]).to_bytes(4, "little") \
                + data[16:]
            kind += "+meta_len"
        desc = f"{kind} #{i} ({len(data)} bytes)"

        def case(data: bytes = data) -> None:
            with XrrReader(io.BytesIO(data), name="fuzz.xrr") as r:
                h = r.header
                json.dumps(h.to_json())
                RecordingHeader.from_json(h.to_json())  # what it accepts, it accepts again
                r.decoded_vcpus  # noqa: B018

        _run_case(report, desc, case, data)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return report


# --------------------------------------------------------------------------- 'e' dumps

_UNICODE_DIGITS = ["\u00b2", "\u00b9", "\u0663", "\uff11", "\U0001d7d9", "\u0967", "\u2460"]
_HOSTILE_LINES = [
    "(XEN)        1 [0/1/02]: s=3 n=0 x=0 d=0 p=33",
    "(XEN)        1 [0/0/99999999]: s=3 n=0 x=0 d=0 p=33",
    "(XEN)        2 [1/0/B 1234567]: s=5 n=0 x=0 v=0",
    "(XEN)        2 [1/0/  99999 ]: s=5 n=0 x=0 v=0",
    "(XEN)        3 [1/0/  \u00b2   ]: s=5 n=0 x=0 v=0",
    "(XEN)     \u0663 [1/0/1]: s=5 n=0 x=0 v=0",
    "(XEN) Event channel information for domain \uff11:",
    "(XEN) Polling vCPUs: {\u00b2}",
    "(XEN) Polling vCPUs: {" + ",".join(["0-8191"] * 600) + "}",
    "(XEN) Polling vCPUs: {" + ",".join(["0-16383"] * 600) + "}",
    "(XEN) Polling vCPUs: {" + ",".join(str(i) for i in range(0, 8000, 2)) + "}",
    "(XEN) Polling vCPUs: {99999999999}",
    "(XEN) Polling vCPUs: {-1}",
    "(XEN) Polling vCPUs: {0-}",
    "(XEN)  4294967296 [1/0/1]: s=5 n=0 x=0 v=0",
    "(XEN)   131072 [1/0/  -   ]: s=5 n=0 x=0 v=0",
    "(XEN)     4096 [1/0/1]: s=5 n=0 x=0 v=0",
    "(XEN)        5 [1/0/1]: s=5 n=-99999999999 x=0 v=0",
    "(XEN)        5 [1/0/1]: s=5 n=0 x=0 v=0 Z=" + "z" * 10_000,
    "(XEN) 'e' pressed -> dumping event-channel info",
    "(XEN) Event channel information for domain 0:",
    "(XEN) Event channel information for domain 99999:",
    "(XEN) " + "[" * 5000,
    "\x00" * 100,
    "(XEN)        6 [1/0/?     ]: s=2 n=0 x=0 d=0",
    "(XEN)        6 [1/0/B -   ]: s=2 n=0 x=0 d=0",
]


def dump_seeds() -> list[str]:
    from xreplay import debugkeys as dk

    texts = [p.read_text(errors="replace")
             for p in sorted((ROOT / "tests" / "data" / "debugkeys").glob("*.txt"))]
    rng = random.Random(7)
    for fifo in (False, True):
        ports = []
        for port in sorted(rng.sample(range(1, 4096), 12)):
            col: dict[str, Any] = ({"fifo": rng.choice(["?", "-", "B -", "7", "B 131071"])}
                                   if fifo else {"selector": rng.random() < 0.5})
            ports.append(dk.PortState(port=port, pending=rng.random() < 0.5,
                                      masked=rng.random() < 0.5, state=5, notify_vcpu=0,
                                      xen_consumer=0, virq=rng.randrange(24), **col))
        texts.append(dk.render([dk.DomainEvtchnDump(domid=3, polling_vcpus=dk.VcpuSet([0, 2]),
                                                     ports=ports)]))
    return texts


def mutate_dump(text: str, rng: random.Random) -> tuple[str, str]:
    lines = text.splitlines(keepends=True) or ["\n"]
    c = rng.random()
    if c < 0.3:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            op = rng.random()
            if op < 0.3:
                lines.insert(i, rng.choice(_HOSTILE_LINES) + rng.choice(["\n", "\r\n", "\r"]))
            elif op < 0.5:
                del lines[i]
            elif op < 0.7:
                lines.insert(i, lines[rng.randrange(len(lines))])
            else:
                j = rng.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
        return "lines", "".join(lines)
    if c < 0.6:
        out = list(text)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(out)) if out else 0
            digits = [k for k in range(max(0, i - 40), min(len(out), i + 40))
                      if out[k].isdigit()]
            if digits and rng.random() < 0.5:
                out[rng.choice(digits)] = rng.choice(_UNICODE_DIGITS + list("0123456789"))
            elif rng.random() < 0.5:
                out.insert(i, rng.choice("[]/0123456789 -B?:=\n\r\x00" + "".join(_UNICODE_DIGITS)))
            elif out:
                del out[i]
        return "chars", "".join(out)
    if c < 0.8:  # cells
        import re

        cells = list(re.finditer(r"\[[^\]\n]{1,12}\]", text))
        if cells:
            m = rng.choice(cells)
            new = rng.choice(["[0/1/02]", "[0/0/99999999]", "[1/0/B 1234567]", "[1/1/ ]",
                              "[1/0/  \u00b2   ]", "[1/0/B  -  ]", "[1/0/1 ]", "[1/0/]",
                              "[0/0/ 12345]", "[0/0/  00012]", "[1/0/  0   ]"])
            return "cell", text[:m.start()] + new + text[m.end():]
    if c < 0.9:
        raw, _ = mutate_bytes(text.encode(), rng)
        return "bytes", raw.decode("utf-8", errors="replace")
    return "polling", text.replace("Polling vCPUs: {", "Polling vCPUs: {" + rng.choice(
        ["0-8191,", "0-16383," * 400, ",", "1,1,1,", "8191-0,", "\u00b2,", "0-8191," * 5000]), 1)


def consume_dump(text: str) -> None:
    from xreplay import debugkeys as dk

    dumps = dk.parse(text, "fuzz.txt")
    json.dumps(dk.to_json(dumps))
    for d in dumps:
        d.pending_unmasked()
        if not d.ports and not d.polling_vcpus:
            continue
        rendered = d.render()
        try:
            (back,) = dk.parse(rendered, "render", strict=True)
        except dk.XReplayError as e:
            raise PropertyBroken(f"render of a parsed section does not parse: {e}") from None
        if back.ports != d.ports or set(back.polling_vcpus) != set(d.polling_vcpus):
            raise PropertyBroken("render of a parsed section parses to other ports")


def fuzz_debugkeys(cases: int, seed: int = 1) -> FuzzReport:
    report = FuzzReport("debugkeys")
    rng = random.Random(seed)
    seeds = dump_seeds()
    t0 = time.perf_counter()
    for i in range(cases):
        kind, text = mutate_dump(rng.choice(seeds), rng)
        desc = f"{kind} #{i} ({len(text)} chars)"
        _run_case(report, desc, lambda text=text: consume_dump(text), text)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return report


FUZZERS: dict[str, Callable[..., FuzzReport]] = {
    "recording": fuzz_recordings, "recording-2.0": fuzz_recordings_v2, "header": fuzz_header,
    "debugkeys": fuzz_debugkeys}


@register("fuzz", "hostile recordings, headers and 'e' dumps (--hits = cases per parser)",
          default=False)
def run(args: BenchArgs) -> bool:
    cases = args.hits or DEFAULT_CASES
    print(f"== fuzz: {cases} inputs per parser (seed 1); a crash is any exception that is not "
          f"an XReplayError, or a broken property; limit {TIME_LIMIT_S:.0f} s per input")
    reports = []
    for name, fn in FUZZERS.items():
        report = fn(cases)
        reports.append(report)
        print(f"  {name}: {report.inputs} inputs, {report.accepted} accepted, "
              f"{report.clean_errors} clean errors, {report.crashes} crashes, slowest "
              f"{report.slowest_s * 1000:.1f} ms, {report.seconds:.0f} s", flush=True)
        for example in report.crash_examples:
            print(f"    CRASH {example}")
    print(TABLE_HEAD)
    for report in reports:
        print(report.row())
    ok = all(r.ok for r in reports)
    print(f"total crashes: {sum(r.crashes for r in reports)}; inputs over "
          f"{TIME_LIMIT_S:.0f} s: {sum(r.over_limit for r in reports)}"
          + ("" if ok else "  FAILED"))
    return ok
