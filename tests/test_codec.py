"""Tests for cipherhive.ckks.codec and the server's RunningSum, with real SEAL ciphertexts (no mocks)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cipherhive.ckks import codec, keys
from cipherhive.ckks.codec import VALUES_PER_CIPHERTEXT, CodecError, PublicCodec, SecretCodec
from cipherhive.server.ingest.running_sum import RunningSum

# Offsets in SEAL's 16-byte serialization header ("<HBBBBHQ").
_HEADER_SIZE_OFFSET = 2
_COMPR_OFFSET = 5
_SIZE_OFFSET = 8


@pytest.fixture(scope="module")
def other_params_context() -> ts.Context:
    """A CKKS context at the same N but with other coefficient moduli."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2.0**40
    return ctx


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _encrypt_into(
    secret: SecretCodec, public: PublicCodec, running: RunningSum, values: np.ndarray
) -> list[bytes]:
    blobs = list(secret.encrypt_all(values))
    for index, blob in enumerate(blobs):
        running.add(index, public.load(blob))
    return blobs


def _decrypt_sum(secret: SecretCodec, running: RunningSum) -> np.ndarray:
    return np.concatenate([secret.decrypt(blob) for blob in running.serialized()])


def _seal_encrypt(ctx: ts.Context, values: np.ndarray, scale: float) -> bytes:
    """Encrypt like SecretCodec does, but with any context and scale (for refusal tests)."""
    sc = ctx.seal_context().data
    encoder = seal.CKKSEncoder(sc)
    encryptor = seal.Encryptor(sc, ctx.secret_key().data)
    block = np.zeros(encoder.slot_count() * 2)
    block[: values.shape[0]] = values
    plain = seal.Plaintext()
    encoder.encode(block.view(np.complex128).tolist(), scale, plain)
    return codec._MemFile().saved(encryptor.encrypt_symmetric(plain))


# --------------------------------------------------------------------------- round trip


def test_num_ciphertexts() -> None:
    assert codec.num_ciphertexts(0) == 0
    assert codec.num_ciphertexts(1) == 1
    assert codec.num_ciphertexts(VALUES_PER_CIPHERTEXT) == 1
    assert codec.num_ciphertexts(VALUES_PER_CIPHERTEXT + 1) == 2
    assert codec.num_ciphertexts(3 * VALUES_PER_CIPHERTEXT + 5) == 4


@pytest.mark.parametrize("length", [1, 8191, 8192, 3 * 8192 + 5])
def test_sum_of_ten_round_trip(secret: SecretCodec, public: PublicCodec, length: int) -> None:
    rng = _rng(length)
    updates = [rng.normal(0.0, 0.05, length) for _ in range(10)]
    blocks = codec.num_ciphertexts(length)
    running = RunningSum(public, blocks)
    assert len(running) == blocks
    for update in updates:
        assert len(_encrypt_into(secret, public, running, update)) == blocks

    decrypted = _decrypt_sum(secret, running)
    assert decrypted.shape == (blocks * VALUES_PER_CIPHERTEXT,)
    expected = np.sum(updates, axis=0)
    assert np.abs(decrypted[:length] - expected).max() < 1e-7
    padding = decrypted[length:]
    if padding.size:
        assert np.abs(padding).max() < 1e-7


def test_encrypt_refuses_more_than_one_ciphertext(secret: SecretCodec) -> None:
    with pytest.raises(ValueError, match="do not fit one ciphertext"):
        secret.encrypt(np.zeros(VALUES_PER_CIPHERTEXT + 1))


def test_uploaded_and_summed_sizes(secret: SecretCodec, public: PublicCodec) -> None:
    values = _rng(1).normal(0.0, 0.05, VALUES_PER_CIPHERTEXT)
    seeded = secret.encrypt(values)
    assert len(seeded) / VALUES_PER_CIPHERTEXT <= 8.1
    assert len(seeded) <= codec.MAX_CIPHERTEXT_BYTES

    running = RunningSum(public, 1)
    _encrypt_into(secret, public, running, values)
    _encrypt_into(secret, public, running, values)
    [summed] = running.serialized()
    assert len(summed) / VALUES_PER_CIPHERTEXT <= 16.1
    assert len(summed) <= codec.MAX_CIPHERTEXT_BYTES


@settings(max_examples=15, deadline=None)
@given(
    st.integers(min_value=1, max_value=20_000).flatmap(
        lambda n: hnp.arrays(
            np.float64,
            n,
            elements=st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False),
        )
    )
)
def test_encrypt_decrypt_property(secret: SecretCodec, values: np.ndarray) -> None:
    blobs = list(secret.encrypt_all(values))
    assert len(blobs) == codec.num_ciphertexts(values.shape[0])
    decrypted = np.concatenate([secret.decrypt(b) for b in blobs])[: values.shape[0]]
    assert np.abs(decrypted - values).max() < 1e-6


# --------------------------------------------------------------------------- contexts


def test_public_codec_refuses_secret_context(key_files: keys.KeyFiles) -> None:
    with pytest.raises(CodecError, match="SECRET"):
        PublicCodec(key_files.secret.read_bytes())


def test_secret_codec_refuses_public_context(key_files: keys.KeyFiles) -> None:
    with pytest.raises(CodecError, match="no secret key"):
        SecretCodec(key_files.public.read_bytes())


@pytest.mark.parametrize("cls", [PublicCodec, SecretCodec])
@pytest.mark.parametrize("garbage", [b"", b"not a context", os.urandom(4096)])
def test_codecs_refuse_garbage(cls: type, garbage: bytes) -> None:
    with pytest.raises(CodecError, match="not a TenSEAL context"):
        cls(garbage)


def test_public_codec_refuses_other_parameters(other_params_context: ts.Context) -> None:
    ctx = other_params_context.copy()
    ctx.make_context_public()
    with pytest.raises(CodecError, match=r"coefficient moduli \[60, 40, 40, 60\]"):
        PublicCodec(ctx.serialize())


def test_secret_codec_refuses_other_parameters(other_params_context: ts.Context) -> None:
    data = other_params_context.serialize(save_secret_key=True)
    with pytest.raises(CodecError, match=r"coefficient moduli \[60, 40, 40, 60\]"):
        SecretCodec(data)


# --------------------------------------------------------------------------- PublicCodec.load


@pytest.fixture(scope="module")
def upload(secret: SecretCodec) -> bytes:
    return secret.encrypt(_rng(7).normal(0.0, 0.05, 1000))


def test_load_accepts_a_valid_upload(public: PublicCodec, upload: bytes) -> None:
    ct = public.load(upload)
    assert ct.size() == 2
    assert ct.scale == codec.SCALE


@pytest.mark.parametrize("size", [0, 3, 15, 16, 1000, 65_740])
def test_load_refuses_random_bytes(public: PublicCodec, size: int) -> None:
    with pytest.raises(CodecError):
        public.load(os.urandom(size))


def test_load_refuses_truncated(public: PublicCodec, upload: bytes) -> None:
    with pytest.raises(CodecError, match="announces"):
        public.load(upload[:-100])
    with pytest.raises(CodecError, match="shorter than a SEAL header"):
        public.load(upload[:10])


def test_load_refuses_flipped_header_size(public: PublicCodec, upload: bytes) -> None:
    data = bytearray(upload)
    data[_HEADER_SIZE_OFFSET] ^= 0x01
    with pytest.raises(CodecError, match="bad magic or header size"):
        public.load(bytes(data))


def test_load_refuses_flipped_total_size(public: PublicCodec, upload: bytes) -> None:
    data = bytearray(upload)
    data[_SIZE_OFFSET] ^= 0x01
    with pytest.raises(CodecError, match="announces"):
        public.load(bytes(data))


def test_load_refuses_bad_magic(public: PublicCodec, upload: bytes) -> None:
    data = bytearray(upload)
    data[0] ^= 0xFF
    with pytest.raises(CodecError, match="bad magic"):
        public.load(bytes(data))


def test_load_refuses_bad_compression(public: PublicCodec, upload: bytes) -> None:
    data = bytearray(upload)
    data[_COMPR_OFFSET] = 7
    with pytest.raises(CodecError, match="compression mode 7"):
        public.load(bytes(data))
    # A plausible mode that does not match the payload: SEAL itself refuses, wrapped.
    data[_COMPR_OFFSET] = 0 if upload[_COMPR_OFFSET] != 0 else 2
    with pytest.raises(CodecError, match="SEAL refused"):
        public.load(bytes(data))


def test_load_refuses_oversized(public: PublicCodec, upload: bytes) -> None:
    big = upload + bytes(codec.MAX_CIPHERTEXT_BYTES)
    with pytest.raises(CodecError, match="exceeds"):
        public.load(big)


def test_load_refuses_other_scale(public: PublicCodec, key_files: keys.KeyFiles) -> None:
    ctx = ts.context_from(key_files.secret.read_bytes())
    blob = _seal_encrypt(ctx, np.ones(4), 2.0**30)
    with pytest.raises(CodecError, match="scale"):
        public.load(blob)


def test_load_accepts_same_parameters_other_key(
    tmp_path: Path, secret: SecretCodec, public: PublicCodec
) -> None:
    """A ciphertext under another federation key with the *same* parameters is accepted by load.

    The server holds no secret key, so it cannot tell whose key encrypted a
    ciphertext: this is by design (members are authenticated by mTLS and the
    key fingerprint at join). With our key, such a ciphertext decrypts to garbage.
    """
    other = SecretCodec(keys.keygen(tmp_path).secret.read_bytes())
    values = _rng(3).normal(0.0, 0.05, VALUES_PER_CIPHERTEXT)
    blob = other.encrypt(values)

    ct = public.load(blob)  # accepted
    assert np.abs(other.decrypt(public.dump(ct)) - values).max() < 1e-7
    garbage = secret.decrypt(public.dump(ct))
    assert np.abs(garbage - values).max() > 1.0


def test_load_refuses_other_parameters(public: PublicCodec, other_params_context: ts.Context) -> None:
    blob = _seal_encrypt(other_params_context, np.ones(4), 2.0**40)
    with pytest.raises(CodecError):
        public.load(blob)


# --------------------------------------------------------------------------- RunningSum rollback


def test_rollback_is_exact(secret: SecretCodec, public: PublicCodec) -> None:
    length = VALUES_PER_CIPHERTEXT + 100
    rng = _rng(11)
    a, b, c = (rng.normal(0.0, 0.05, length) for _ in range(3))
    a_blobs, b_blobs, c_blobs = (list(secret.encrypt_all(v)) for v in (a, b, c))

    running = RunningSum(public, 2)
    for blobs in (a_blobs, b_blobs):
        for index, blob in enumerate(blobs):
            running.add(index, public.load(blob))
    assert running.subtract(iter(b_blobs)) == 2
    for index, blob in enumerate(c_blobs):
        running.add(index, public.load(blob))
    rolled_back = list(running.serialized())

    decrypted = np.concatenate([secret.decrypt(x) for x in rolled_back])[:length]
    assert np.abs(decrypted - (a + c)).max() < 1e-7

    # Addition mod q is exact: the result is bit for bit the sum that never saw B.
    direct = RunningSum(public, 2)
    for blobs in (a_blobs, c_blobs):
        for index, blob in enumerate(blobs):
            direct.add(index, public.load(blob))
    assert list(direct.serialized()) == rolled_back


def test_partial_rollback(secret: SecretCodec, public: PublicCodec) -> None:
    """An upload that failed after its first block is removed from that block only."""
    length = VALUES_PER_CIPHERTEXT + 10
    rng = _rng(12)
    a, b = rng.normal(0.0, 0.05, length), rng.normal(0.0, 0.05, length)
    running = RunningSum(public, 2)
    _encrypt_into(secret, public, running, a)
    b_blobs = list(secret.encrypt_all(b))
    running.add(0, public.load(b_blobs[0]))
    assert running.subtract(iter(b_blobs[:1])) == 1
    assert np.abs(_decrypt_sum(secret, running)[:length] - a).max() < 1e-7


def test_subtracting_only_contribution_resets_block(secret: SecretCodec, public: PublicCodec) -> None:
    rng = _rng(13)
    a, c = rng.normal(0.0, 0.05, 50), rng.normal(0.0, 0.05, 50)
    running = RunningSum(public, 1)
    a_blobs = _encrypt_into(secret, public, running, a)
    assert running.subtract(a_blobs) == 1
    with pytest.raises(RuntimeError, match="never added"):
        list(running.serialized())

    _encrypt_into(secret, public, running, c)
    assert np.abs(_decrypt_sum(secret, running)[:50] - c).max() < 1e-7


def test_serialized_refuses_missing_block(secret: SecretCodec, public: PublicCodec) -> None:
    running = RunningSum(public, 2)
    running.add(0, public.load(secret.encrypt(np.ones(3))))
    with pytest.raises(RuntimeError, match="block 1"):
        list(running.serialized())
