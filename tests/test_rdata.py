import struct
import zlib

import pytest

from leanfm.data.rdata import read_lazyload_db, unserialize


def _xdr_strings(values: list[str]) -> bytes:
    """A hand-built R v2 XDR serialization of a character vector (STRSXP of CHARSXPs)."""
    out = b"X\n" + struct.pack(">iii", 2, 0x040000, 0x020300)
    out += struct.pack(">ii", 16, len(values))
    for value in values:
        raw = value.encode()
        out += struct.pack(">ii", 9 | (1 << 15), len(raw)) + raw
    return out


def test_unserialize_character_vector():
    assert unserialize(_xdr_strings(["It is a truth", "", "universally"])).value == ["It is a truth", "", "universally"]


def test_unserialize_rejects_non_xdr():
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n" + b"\0" * 20)


def test_truncated_stream_raises():
    with pytest.raises(ValueError, match="truncated"):
        unserialize(_xdr_strings(["abcdef"])[:-3])


def test_missing_database(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_lazyload_db(tmp_path)


def test_zlib_payload_roundtrip():
    blob = zlib.compress(_xdr_strings(["x"]))
    assert unserialize(zlib.decompress(blob)).value == ["x"]
