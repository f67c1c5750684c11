"""The mask PRG is pinned: two members must derive the same mask bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from cipherhive.ckks import c0_sum
from cipherhive.secagg import mask_stream

KEY = bytes(range(32))
Q60 = 1152921504606748673  # the data prime of `cipherhive keygen` contexts (60 bits)


def _reference(key: bytes, block: int, modulus: int, count: int) -> list[int]:
    """The construction as the docstring states it, word by word in plain Python."""
    nonce = b"\0" * 4 + block.to_bytes(8, "little") + b"\0" * 4
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(b"\0" * 8 * 4 * count)
    words = [int.from_bytes(stream[i : i + 8], "little") & ((1 << 60) - 1) for i in range(0, len(stream), 8)]
    return [w for w in words if w < modulus][:count]


def test_matches_the_stated_construction() -> None:
    for block in (0, 1, 7, 2**40):
        got = mask_stream.mask(KEY, block, Q60, 300)
        assert got.tolist() == _reference(KEY, block, Q60, 300)


def test_pinned_vector() -> None:
    """Literal values: a change of nonce layout, word order or bit selection fails here."""
    got = mask_stream.mask(KEY, 3, Q60, 4)
    assert [f"{int(v):015x}" for v in got] == PINNED


def test_forced_rejection_keeps_the_stream_order() -> None:
    """With q just above 2^59 about half of the words are rejected, and more than one
    batch of keystream is needed: the result is still the in-order accepted words."""
    q = (1 << 59) + 1
    got = mask_stream.mask(KEY, 5, q, 5000)
    assert got.tolist() == _reference(KEY, 5, q, 5000)
    assert int(got.max()) < q


def test_blocks_and_keys_give_independent_streams() -> None:
    a = mask_stream.mask(KEY, 0, Q60, 8192)
    b = mask_stream.mask(KEY, 1, Q60, 8192)
    c = mask_stream.mask(bytes(32), 0, Q60, 8192)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    # Uniform over [0, q): the mean of 8192 draws is within a few standard errors of q/2.
    assert abs(float(a.mean()) / Q60 - 0.5) < 0.02


def test_modular_helpers() -> None:
    """The one modular addition and subtraction both halves use (cipherhive.ckks.c0_sum)."""
    q = np.uint64(97)
    acc = np.array([0, 50, 96], dtype=np.uint64)
    c0_sum.add_mod(acc, np.array([0, 50, 96], dtype=np.uint64), q)
    assert acc.tolist() == [0, 3, 95]
    neg = np.zeros(3, dtype=np.uint64)
    c0_sum.sub_mod(neg, np.array([0, 1, 96], dtype=np.uint64), q)
    assert neg.tolist() == [0, 96, 1]


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        mask_stream.mask(b"short", 0, Q60, 1)
    with pytest.raises(ValueError, match="2\\^60"):
        mask_stream.mask(KEY, 0, 1 << 61, 1)


PINNED = ["e3bc2cd44d85fe3", "46c8197d8211e21", "d083b4a835d9390", "05a77ddc295686d"]
