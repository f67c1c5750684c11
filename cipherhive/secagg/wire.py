"""Canonical, length-prefixed byte encodings for signed and hashed messages.

Every message cipherhive signs or hashes for the masked round (enrolments,
rosters, commits, the chain hash, the pairwise key derivation) is a domain
label followed by fields, each written as a 4-byte big-endian length and the
bytes themselves. Length prefixes make the encoding injective (no two field
lists give the same bytes), and the label at the front keeps a signature or a
hash made for one purpose from ever verifying as another (SecAgg, Bonawitz et
al., CCS 2017, §6, signs each message "with its round"; here each message kind
gets its own label). Integers are fixed-width big-endian.
"""

from __future__ import annotations

import struct

_LEN = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class WireError(ValueError):
    """Bytes that are not a canonical encoding: truncated, oversized, trailing data, wrong label."""


def field(data: bytes) -> bytes:
    """One length-prefixed field."""
    return _LEN.pack(len(data)) + data


def fields(label: bytes, *parts: bytes) -> bytes:
    """``label ‖ parts``, each length-prefixed (the canonical form that is signed or hashed)."""
    return b"".join(field(p) for p in (label, *parts))


def u64(value: int) -> bytes:
    """An unsigned 64-bit big-endian integer."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{value} does not fit in 64 bits")
    return _U64.pack(value)


def read_u64(data: bytes, what: str) -> int:
    """The integer of an 8-byte field."""
    if len(data) != 8:
        raise WireError(f"{what} must be 8 bytes, got {len(data)}")
    value: int = _U64.unpack(data)[0]
    return value


class Reader:
    """Reads length-prefixed fields from ``data``; every read states the largest size it accepts."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._what = what

    def take(self, name: str, max_len: int, *, exact: int | None = None) -> bytes:
        """The next field, refused if shorter than its prefix says, or above ``max_len``."""
        if len(self._data) - self._pos < _LEN.size:
            raise WireError(f"{self._what}: truncated before {name}")
        (length,) = _LEN.unpack_from(self._data, self._pos)
        self._pos += _LEN.size
        if length > max_len:
            raise WireError(f"{self._what}: {name} is {length} bytes, more than the {max_len} allowed")
        if exact is not None and length != exact:
            raise WireError(f"{self._what}: {name} must be {exact} bytes, got {length}")
        if len(self._data) - self._pos < length:
            raise WireError(f"{self._what}: truncated inside {name}")
        value = bytes(self._data[self._pos : self._pos + length])
        self._pos += length
        return value

    def expect(self, label: bytes) -> None:
        """Require the domain label that opens every message of this kind."""
        if self.take("label", len(label)) != label:
            raise WireError(f"{self._what}: not a {label.decode()} message")

    @property
    def position(self) -> int:
        """Bytes consumed so far."""
        return self._pos

    def finish(self) -> None:
        """Refuse trailing bytes: a canonical message has exactly one encoding."""
        if self._pos != len(self._data):
            raise WireError(f"{self._what}: {len(self._data) - self._pos} trailing bytes")


def split_fields(data: bytes, what: str, max_len: int = 1 << 16) -> list[bytes]:
    """Every length-prefixed field of ``data`` (a list written with :func:`fields`)."""
    reader = Reader(data, what)
    out = []
    while reader.position < len(data):
        out.append(reader.take("field", max_len))
    return out
