"""The remote-protocol byte level the direct hit loop and the raw benchmark client share."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from xreplay.gdb.rsp import decode_hex, decode_hex_reference, frame


def _outcome(payload: bytes) -> bytes | str:
    try:
        return decode_hex(payload)
    except ValueError:
        return "ValueError"


def _reference(payload: bytes) -> bytes | str:
    try:
        return decode_hex_reference(payload)
    except ValueError:
        return "ValueError"


@given(st.binary(max_size=40).map(lambda b: bytes(b"0123456789abcdef*#$ }~"[x % 22] for x in b)))
def test_run_length_decoder_is_the_reference(payload: bytes) -> None:
    """The find-based decoder agrees with the regex statement on any input, damaged ones
    included ('*' first, '*' last, '**', counts below the minimum)."""
    assert _outcome(payload) == _reference(payload)


def _gdbserver_rle(data: bytes) -> bytes:
    """gdbserver's encoding (remote-utils.c try_rle: runs of 4+, counts skip '#' and '$')."""
    h = data.hex().encode()
    out = bytearray()
    i = 0
    while i < len(h):
        n = 1
        while i + n < len(h) and h[i + n] == h[i] and n < 98:
            n += 1
        r = n - 1
        while r + 29 in (ord("$"), ord("#")):
            r -= 1
        if r >= 3:
            out += bytes((h[i], ord("*"), r + 29))
            i += r + 1
        else:
            out.append(h[i])
            i += 1
    return bytes(out)


_SPARSE = st.binary(max_size=300).map(lambda b: bytes(x if x % 3 == 0 else 0 for x in b))


@given(_SPARSE)
def test_run_length_decoder_round_trips_gdbserver_encoding(data: bytes) -> None:
    assert decode_hex(_gdbserver_rle(data)) == data


@given(_SPARSE, st.integers(0, 320))
def test_a_prefix_of_a_reply_is_the_prefix_of_the_whole(data: bytes, limit: int) -> None:
    """``g``'s first registers: the expansion may stop early, the bytes are the same."""
    assert decode_hex(_gdbserver_rle(data), limit) == data[:limit]


def test_frame_checksum() -> None:
    assert frame(b"g") == b"$g#67"
    assert frame(b"") == b"$#00"
