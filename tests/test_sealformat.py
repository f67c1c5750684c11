"""SEAL's serialization format, pinned against the installed SEAL (through TenSEAL).

If a TenSEAL/SEAL upgrade changes the layout, these fail before any mask
could corrupt a sum.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal

from cipherhive.ckks import c0_sum, codec, seal_format
from cipherhive.secagg import mask_stream


@dataclass
class Seal:
    context: seal.SEALContext
    encoder: seal.CKKSEncoder
    encryptor: seal.Encryptor
    decryptor: seal.Decryptor
    evaluator: seal.Evaluator
    q: int
    parms_id: tuple[int, ...]
    fd: int
    tenseal: ts.Context

    def saved(self, obj: object) -> bytes:
        os.ftruncate(self.fd, 0)
        obj.save(f"/proc/self/fd/{self.fd}")  # type: ignore[attr-defined]
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def _write(self, data: bytes) -> str:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        return f"/proc/self/fd/{self.fd}"

    def load_ct(self, data: bytes) -> seal.Ciphertext:
        ct = seal.Ciphertext()
        ct.load(self.context, self._write(data))
        return ct

    def load_plain(self, data: bytes) -> seal.Plaintext:
        plain = seal.Plaintext()
        plain.load(self.context, self._write(data))
        return plain

    def encrypt(self, values: np.ndarray) -> bytes:
        plain = seal.Plaintext()
        self.encoder.encode(values.view(np.complex128).tolist(), codec.SCALE, plain)
        return self.saved(self.encryptor.encrypt_symmetric(plain))

    def decrypt(self, ct: seal.Ciphertext) -> np.ndarray:
        plain = seal.Plaintext()
        self.decryptor.decrypt(ct, plain)
        return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128).view(np.float64)


@pytest.fixture(scope="module")
def s() -> Iterator[Seal]:
    ctx = codec.new_secret_context()
    sc = ctx.seal_context().data
    sk = ctx.secret_key().data
    fd = os.memfd_create("test-sealformat", os.MFD_CLOEXEC)
    yield Seal(
        sc,
        seal.CKKSEncoder(sc),
        seal.Encryptor(sc, sk),
        seal.Decryptor(sc, sk),
        seal.Evaluator(sc),
        sc.first_context_data().parms().coeff_modulus()[0].value(),
        tuple(sc.first_parms_id()),
        fd,
        ctx,
    )
    os.close(fd)


def _values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, codec.VALUES_PER_CIPHERTEXT)


def test_seeded_upload_layout(s: Seal) -> None:
    data = s.encrypt(_values(0))
    header = seal_format.read_header(data)
    assert header.compression == seal_format.COMPR_ZSTD and header.major == 4
    ct = seal_format.read_ciphertext(data)
    assert ct.seeded and ct.size == 2
    assert (ct.poly_modulus_degree, ct.coeff_modulus_size) == (codec.POLY_MODULUS_DEGREE, 1)
    assert ct.coefficients.shape == (codec.POLY_MODULUS_DEGREE,)
    assert int(ct.coefficients.max()) < s.q
    assert len(ct.seed) == 16 + 1 + 64  # nested header, PRNG type, seed
    again = ct.to_bytes()
    assert seal_format.read_header(again).compression == seal_format.COMPR_NONE
    assert len(again) < len(data)  # zstd cannot shrink random coefficients
    # SEAL loads the rewritten bytes, and the server's validation accepts them.
    loaded = codec.PublicCodec(_public(s)).load(again)
    assert np.abs(s.decrypt(loaded) - _values(0)).max() < 1e-6


def _public(s: Seal) -> bytes:
    """The fixture's parameters and keys without the secret key: what the server holds."""
    public = s.tenseal.copy()
    public.make_context_public()
    return bytes(public.serialize())


def test_full_ciphertext_layout(s: Seal) -> None:
    acc = s.load_ct(s.encrypt(_values(1)))
    s.evaluator.add_inplace(acc, s.load_ct(s.encrypt(_values(2))))
    ct = seal_format.read_ciphertext(s.saved(acc))
    assert not ct.seeded and ct.size == 2
    assert ct.coefficients.shape == (2 * codec.POLY_MODULUS_DEGREE,)
    assert np.array_equal(ct.poly(1), ct.coefficients[codec.POLY_MODULUS_DEGREE :])
    reloaded = s.load_ct(ct.to_bytes())
    assert np.abs(s.decrypt(reloaded) - _values(1) - _values(2)).max() < 1e-6


def test_masks_hide_one_upload_and_cancel_in_the_sum(s: Seal) -> None:
    """Pairwise masks cancel, the self-masks come off as a plaintext: the SecAgg arithmetic."""
    n, size = 4, codec.POLY_MODULUS_DEGREE
    keys = {(i, j): os.urandom(32) for i in range(n) for j in range(i + 1, n)}
    seeds = [os.urandom(32) for _ in range(n)]
    uploads = []
    for i in range(n):
        total = mask_stream.mask(seeds[i], 0, s.q, size)
        for (a, b), key in keys.items():
            if i in (a, b):
                pair = mask_stream.mask(key, 0, s.q, size)
                (c0_sum.add_mod if i == b else c0_sum.sub_mod)(total, pair, np.uint64(s.q))
        uploads.append(seal_format.add_to_c0(s.encrypt(_values(10 + i)), total, s.q))
    alone = s.decrypt(s.load_ct(uploads[0]))
    assert np.abs(alone).max() > 1e5, "a masked upload decrypts to noise of the modulus' size"
    assert abs(np.corrcoef(alone, _values(10))[0, 1]) < 0.05
    acc = s.load_ct(uploads[0])
    for blob in uploads[1:]:
        s.evaluator.add_inplace(acc, s.load_ct(blob))
    self_masks = np.zeros(size, dtype=np.uint64)
    for seed in seeds:
        c0_sum.add_mod(self_masks, mask_stream.mask(seed, 0, s.q, size), np.uint64(s.q))
    header = seal_format.read_header(uploads[0])
    plain = s.load_plain(seal_format.plaintext_bytes(header, s.parms_id, codec.SCALE, self_masks))
    s.evaluator.sub_plain_inplace(acc, plain)
    expected = sum(_values(10 + i) for i in range(n))
    assert np.abs(s.decrypt(acc) - expected).max() < 1e-8


def test_plaintext_layout(s: Seal) -> None:
    plain = seal.Plaintext()
    s.encoder.encode(_values(3).view(np.complex128).tolist(), codec.SCALE, plain)
    parms, scale, coeffs = seal_format.read_plaintext(s.saved(plain))
    assert parms == s.parms_id and scale == codec.SCALE
    assert coeffs.shape == (codec.POLY_MODULUS_DEGREE,)
    assert [plain.data(i) for i in (0, 1, 8191)] == [int(coeffs[i]) for i in (0, 1, 8191)]
    header = seal_format.read_header(s.saved(plain))
    rebuilt = s.load_plain(seal_format.plaintext_bytes(header, parms, scale, coeffs))
    assert rebuilt.is_ntt_form() and rebuilt.coeff_count() == codec.POLY_MODULUS_DEGREE
    assert [rebuilt.data(i) for i in (0, 4096, 8191)] == [int(coeffs[i]) for i in (0, 4096, 8191)]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:10],
        lambda b: b"\x00\x00" + b[2:],
        lambda b: b[:-1],
        lambda b: b[:5] + b"\x07" + b[6:],
    ],
)
def test_damaged_bytes_are_refused(s: Seal, damage: object) -> None:
    data = seal_format.read_ciphertext(s.encrypt(_values(4))).to_bytes()
    with pytest.raises(seal_format.FormatError):
        seal_format.read_ciphertext(damage(data))  # type: ignore[operator]


def test_mask_of_the_wrong_size_is_refused(s: Seal) -> None:
    with pytest.raises(seal_format.FormatError, match="coefficients"):
        seal_format.add_to_c0(s.encrypt(_values(5)), np.zeros(10, dtype=np.uint64), s.q)
