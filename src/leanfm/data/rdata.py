"""A minimal reader for R's lazy-load databases (``Rdata.rdb`` / ``Rdata.rdx``).

Why: the Jane Austen corpus ships offline only as the Debian package ``r-cran-janeaustenr``, whose
novels live inside R's lazy-load database. Installing R to read six character vectors is absurd, so
this module decodes the format directly: the ``.rdx`` index is a gzip'd R serialization of a list
``variables -> (offset, length)``; each ``.rdb`` entry is a 4-byte big-endian length followed by a
zlib stream holding one XDR-format R serialization (R Internals manual, "Serialization Formats").

Only the SEXP types that data packages use are decoded (vectors, pairlists, symbols, attributes,
references); anything else raises ``ValueError`` naming the type.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXPTYPE codes (R Internals, section 1.1) and the pseudo-types used only by serialize.c.
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP = 0, 1, 2, 9, 10
_INTSXP, _REALSXP, _STRSXP, _VECSXP = 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _EMPTYENV_SXP, _BASEENV_SXP = 255, 254, 253, 242, 241
_MISSINGARG_SXP, _BASENAMESPACE_SXP = 251, 247
_NA_INT = -(2**31)


@dataclass
class RObject:
    """An R vector or pairlist with its attributes (``names``, ``class``, ...)."""

    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


class _XDRReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("truncated R serialization stream")
        self.pos += n
        return chunk

    def int32(self) -> int:
        """One big-endian signed 32-bit integer (not named ``int``: that would shadow the type in the class body)."""
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise ValueError("not an XDR R serialization (expected header 'X\\n')")
        version = self.int32()
        self.int32()  # R version that wrote it
        self.int32()  # minimal R version to read it
        if version == 3:
            self._take(self.int32())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}; accepted: 2, 3")

    def item(self) -> Any:
        flags = self.int32()
        sexptype = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexptype in (_NILVALUE_SXP, _NILSXP, _EMPTYENV_SXP, _MISSINGARG_SXP):
            return None
        if sexptype in (_GLOBALENV_SXP, _BASEENV_SXP, _BASENAMESPACE_SXP):
            return RObject(value=f"<environment {sexptype}>")
        if sexptype == _REFSXP:
            index = flags >> 8 if flags >> 8 else self.int32()
            return self.refs[index - 1]
        if sexptype == _SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if sexptype == _CHARSXP:
            length = self.int32()
            return None if length == -1 else self._take(length).decode("utf-8", errors="replace")
        if sexptype == _LISTSXP:
            return self._pairlist(has_attr, has_tag)
        return self._vector(sexptype, has_attr)

    def _pairlist(self, has_attr: bool, has_tag: bool) -> RObject:
        attrs = self._attributes() if has_attr else {}
        tag = self.item() if has_tag else None
        head = self.item()
        tail = self.item()
        items = [(tag, head)]
        if isinstance(tail, RObject) and isinstance(tail.value, list) and tail.attributes.get("__pairlist__"):
            items.extend(tail.value)
        return RObject(value=items, attributes={**attrs, "__pairlist__": True})

    def _attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if not isinstance(attrs, RObject):
            return {}
        return {str(k): v for k, v in attrs.value}

    def _vector(self, sexptype: int, has_attr: bool) -> RObject:
        length = self.int32()
        if sexptype == _STRSXP:
            value: Any = [self.item() for _ in range(length)]
        elif sexptype == _VECSXP:
            value = [self.item() for _ in range(length)]
        elif sexptype in (_INTSXP, _LGLSXP):
            raw = struct.unpack(f">{length}i", self._take(4 * length))
            value = [None if v == _NA_INT else v for v in raw]
        elif sexptype == _REALSXP:
            value = list(struct.unpack(f">{length}d", self._take(8 * length)))
        else:
            raise ValueError(f"unsupported R object type {sexptype} in lazy-load database")
        attrs = self._attributes() if has_attr else {}
        return RObject(value=value, attributes=attrs)


def unserialize(data: bytes) -> Any:
    """Decode one XDR R serialization (``saveRDS``/lazy-load payload) into Python objects."""
    reader = _XDRReader(data)
    reader.header()
    return reader.item()


def read_lazyload_db(directory: Path) -> dict[str, Any]:
    """Read every variable of the lazy-load database ``directory/Rdata.{rdx,rdb}``.

    Returns ``{name: RObject}``. Raises ``FileNotFoundError`` if either file is missing.
    """
    index_path, blob_path = directory / "Rdata.rdx", directory / "Rdata.rdb"
    for path in (index_path, blob_path):
        if not path.is_file():
            raise FileNotFoundError(f"R lazy-load file not found: {path}")
    index = unserialize(gzip.decompress(index_path.read_bytes()))
    entries = dict(zip(index.attributes["names"].value, index.value, strict=True))
    variables = entries["variables"]
    names = variables.attributes["names"].value
    blob = blob_path.read_bytes()
    out: dict[str, Any] = {}
    for name, location in zip(names, variables.value, strict=True):
        offset, length = (int(v) for v in location.value)
        payload = blob[offset : offset + length]
        out[name] = unserialize(zlib.decompress(payload[4:]))
    return out
