"""The compiled 2.0 snapshot decoder (``xreplay/xrr/_fastdelta.c``) equals the Python one.

The replay runs the compiled decoder; ``SnapshotCodecV2.decode`` is its reference and the
only voice of the format's errors.  A frame must give the same fields, the same buffers,
the same hulls, the same codec state and the same error through both, frame after frame
(the state carries across frames: a wrong sequence number or time is wrong from then on).
Here both walk every recording in ``recordings/`` rewritten as 2.0, random recordings that
use every encoding and register shape, and damaged frames: bytes flipped, payloads cut
short or run long, random bytes.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest
from conftest import LAB_PROBES

from xreplay.xrr import RecordingHeader, RegionSpec, XrrReader, XrrWriter, deltas
from xreplay.xrr import format as fmt
from xreplay.xrr.deltas import SnapshotCodecV2, Undecodable
from xreplay.xrr.writer import rewrite

RECORDINGS = Path(__file__).parent.parent / "recordings"


def test_the_compiled_decoder_is_built_and_chosen() -> None:
    """``make setup`` builds it (gcc and the Python headers are among its packages); the
    replay falls back to Python only where it could not be built, at a fifth of the speed."""
    from xreplay.xrr._fastdelta import DeltaCodecV2  # noqa: F401

    if os.environ.get("XREPLAY_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("XREPLAY_PURE_PYTHON asks for the Python decoder")
    assert deltas.decoder_kind == "compiled"


class Pair:
    """The reference and the compiled decoder, each with its own buffers, fed the same
    frames; every step compares everything either can change."""

    def __init__(self, sizes: list[int], nprobes: int) -> None:
        from xreplay.xrr._fastdelta import DeltaCodecV2

        self.sizes, self.nprobes = sizes, nprobes
        self.ref = SnapshotCodecV2(len(sizes))
        self.twin = SnapshotCodecV2(len(sizes))
        self.fast = DeltaCodecV2(self.twin)
        n = len(sizes)
        self.bufs: list[list[bytearray | None]] = [[None] * n, [None] * n]
        self.hulls: list[list[tuple[int, int]]] = [[(0, 0)] * n, [(0, 0)] * n]
        self.errors = self.ok = 0

    def step(self, b: bytes, i: int, end: int) -> None:
        outs = []
        for side, decode in enumerate((self.ref.decode, self.fast.decode)):
            try:
                outs.append(("ok", decode(b, i, end, self.bufs[side], self.sizes,
                                          self.nprobes, self.hulls[side])))
            except Undecodable as e:
                outs.append(("error", str(e)))
        assert outs[0] == outs[1]
        assert self.bufs[0] == self.bufs[1]
        assert self.hulls[0] == self.hulls[1]
        assert (self.ref.seq, self.ref.t_ns) == (self.fast.seq, self.fast.t_ns)
        assert self.ref.regs == self.twin.regs
        if outs[0][0] == "ok":
            self.ok += 1
        else:
            self.errors += 1


def _frames(path: Path) -> tuple[list[int], int, list[tuple[bytes, int, int]]]:
    with XrrReader(path) as r:
        assert r.version[0] >= 2
        frames = [(bytes(buf[i:end]), 0, end - i) for _pos, kind, buf, i, end
                  in r._frames(None, None) if kind == int(fmt.KIND_SNAPSHOT)]
        return list(r._sizes), len(r._probe_names), frames


def _walk(path: Path, rng: random.Random | None = None) -> Pair:
    sizes, nprobes, frames = _frames(path)
    pair = Pair(sizes, nprobes)
    for b, i, end in frames:
        if rng is not None and rng.random() < 0.3:
            pair.step(*_damage(rng, b))
        pair.step(b, i, end)
    return pair


def _damage(rng: random.Random, b: bytes) -> tuple[bytes, int, int]:
    """A frame payload gone wrong in one of the ways a bad disk or a bad writer would."""
    how = rng.randrange(5)
    d = bytearray(b)
    if how == 0 and d:  # a flipped byte
        d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    elif how == 1 and d:  # a random byte
        d[rng.randrange(len(d))] = rng.randrange(256)
    elif how == 2:  # cut short: the decoder may read past `end` into the next frame's bytes
        end = rng.randrange(len(d) + 1)
        return bytes(d) + rng.randbytes(4), 0, end
    elif how == 3:  # run long
        d += rng.randbytes(rng.randint(1, 6))
    else:  # noise
        d = bytearray(rng.randbytes(rng.randint(1, 24)))
    return bytes(d), 0, len(d)


@pytest.mark.parametrize("name", sorted(p.name for p in RECORDINGS.glob("*.xrr")))
def test_every_recording_decodes_the_same(tmp_path: Path, name: str) -> None:
    v2 = tmp_path / "v2.xrr"
    rewrite(RECORDINGS / name, v2)
    pair = _walk(v2)
    assert pair.ok > 0 and pair.errors == 0


def _random_recording(rng: random.Random, kfi: int) -> io.BytesIO:
    """Every encoding (full, delta, same, absent) and register shape (repeated, with and
    without sp and flags), hangs, and edits from one byte to long runs."""
    size = 3136
    header = RecordingHeader.for_arch(
        "x86_64", LAB_PROBES, keyframe_interval=kfi,
        watch=[RegionSpec("shadow", "watch", 64, "&evtchn_callback_ml"),
               RegionSpec("ring", "watch", 300, "&ring")])
    page, shadow, ring = bytearray(size), bytearray(64), bytearray(300)
    regs = [(0x1000 + p, 0x7000, 0x246) for p in range(3)]
    out = io.BytesIO()
    w = XrrWriter(out, header)
    for n in range(300):
        for buf in rng.sample([page, shadow, ring], rng.randint(0, 3)):
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(buf))
                k = rng.choice([1, 1, 1, 2, 8, 40, 200])
                buf[at:at + k] = rng.randbytes(len(buf[at:at + k]))
        probe = rng.randrange(3)
        if rng.random() < 0.3:
            regs[probe] = (rng.choice([0x1000, 2**63 + 5, 2**64 - 1]),
                           rng.choice([None, 0x7000, 2**64 - 1]),
                           rng.choice([None, 0x202, 2**32]))
        pc, sp, regflags = regs[probe]
        w.append(probe=probe, vcpu=rng.choice([0, 1, 127, 128, 4000]), pc=pc, sp=sp,
                 regflags=regflags, t_ns=n * 1000 + rng.randint(-500, 500) + 10**6,
                 hang=rng.random() < 0.05,
                 regions=[bytes(page), None if rng.random() < 0.1 else bytes(shadow),
                          None if rng.random() < 0.1 else bytes(ring)])
    w.close()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_recordings_and_damaged_frames_decode_the_same(tmp_path: Path,
                                                              seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "random.xrr"
    path.write_bytes(_random_recording(rng, kfi=rng.choice([1, 7, 64])).getvalue())
    pair = _walk(path)
    assert pair.ok == 300 and pair.errors == 0
    damaged = _walk(path, random.Random(seed + 100))
    assert damaged.errors > 10  # the damage reached the error paths, not only good frames


def test_state_beyond_the_compiled_range_goes_to_the_reference() -> None:
    """A sequence number past 63 bits is the reference's to decode (Python ints
    have no range), and so is every frame after it."""
    from xreplay.xrr._fastdelta import DeltaCodecV2

    codec = SnapshotCodecV2(1)
    payload = codec.encode(2**63 + 1, 7, 0, 0, int(fmt.FLAG_KEYFRAME), 0x10, None,
                           None, 2, [deltas.deflate(bytes(8))])
    ref = SnapshotCodecV2(1)
    fast_ = DeltaCodecV2(ref)
    bufs: list[bytearray | None] = [None]
    fields = fast_.decode(payload, 0, len(payload), bufs, [8], 1, [(0, 0)])
    assert fields[:2] == (2**63 + 1, 7)
    assert fast_.delegating and ref.seq == 2**63 + 1


@pytest.mark.parametrize("runs", [
    [(15, b"x")], [(16, b"x")], [(14, b"xy")], [(15, b"xy")], [(16, b"")], [(17, b"")],
    [(0, b"a"), (14, b"b")], [(0, b"a"), (15, b"b")], [(3, b"abc"), (0, b"")],
    [(0, b""), (0, b"")], [(2**62, b"x")], [(5, b"x" * 9)],
])
def test_runs_at_the_edge_of_a_region_decode_the_same(runs: list[tuple[int, bytes]]) -> None:
    """A 16-byte region: runs that end at its last byte, one past it, or skip beyond it."""
    codec = SnapshotCodecV2(1)
    key = codec.encode(0, 10, 0, 0, int(fmt.FLAG_KEYFRAME), 0x10, None, None, 2,
                       [deltas.deflate(bytes(range(16)))])
    data = b"".join(deltas.uvarint(skip) + deltas.uvarint(len(d)) + d for skip, d in runs)
    delta = codec.encode(1, 20, 0, 0, 0, 0x10, None, None, 1, [data])
    pair = Pair([16], 1)
    pair.step(key, 0, len(key))
    pair.step(delta, 0, len(delta))
    assert pair.ok + pair.errors == 2
