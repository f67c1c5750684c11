"""The two baselines `cipherhive bench` measures the product against.

* ``plaintext``: float32 values with no encryption at all: what the same
  pipeline costs when only the transport and the bookkeeping remain.
* ``tenseal-vector``: the reference configuration of the best-known open-source
  HE aggregation: each layer a ``tenseal.ckks_vector`` with N=8192, coefficient
  moduli [60, 40, 40], scale 2^40, symmetric encryption, serialized with
  ``serialize()``. A "layer" here is a block of 32768 parameters (8 ciphertexts).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from typing import Any

import numpy as np
import tenseal as ts

PLAIN_BLOCK = 8192
TENSEAL_BLOCK = 32768


class PlainNodeCodec:
    values_per_block = PLAIN_BLOCK

    def __init__(self, _key: bytes = b"") -> None:
        pass

    def encrypt(self, values: np.ndarray) -> bytes:
        block = np.zeros(self.values_per_block, dtype=np.float32)
        block[: values.shape[0]] = values
        return block.tobytes()

    def decrypt(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.float32).astype(np.float64)


class PlainServerCodec:
    values_per_block = PLAIN_BLOCK

    def load(self, data: bytes) -> np.ndarray:
        if len(data) != 4 * self.values_per_block:
            raise ValueError(f"plaintext block of {len(data)} bytes")
        return np.frombuffer(data, dtype=np.float32).astype(np.float64)

    def add_inplace(self, acc: np.ndarray, block: np.ndarray) -> None:
        acc += block

    def sub_inplace(self, acc: np.ndarray, block: np.ndarray) -> None:
        acc -= block

    def dump(self, acc: np.ndarray) -> bytes:
        return acc.astype(np.float32).tobytes()


def tenseal_contexts() -> tuple[bytes, bytes, str]:
    """(secret, public, fingerprint) of a reference-configuration context."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=1,
    )
    ctx.global_scale = 2**40
    secret = ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    # A symmetric context has no public key; the server's copy simply omits the secret one.
    public = ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return secret, public, hashlib.sha256(public).hexdigest()


def _quiet(fn: Any, *args: Any) -> Any:
    """TenSEAL prints a warning for vectors larger than one ciphertext; keep output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


class TensealNodeCodec:
    values_per_block = TENSEAL_BLOCK

    def __init__(self, secret: bytes) -> None:
        self.ctx = ts.context_from(secret, n_threads=1)

    def encrypt(self, values: np.ndarray) -> bytes:
        vector = _quiet(ts.ckks_vector, self.ctx, values.tolist())
        data: bytes = vector.serialize()
        return data

    def decrypt(self, data: bytes) -> np.ndarray:
        vector = _quiet(ts.ckks_vector_from, self.ctx, data)
        out = np.zeros(self.values_per_block)
        values = np.asarray(vector.decrypt())
        out[: values.shape[0]] = values
        return out


class TensealServerCodec:
    values_per_block = TENSEAL_BLOCK

    def __init__(self, public: bytes) -> None:
        self.ctx = ts.context_from(public, n_threads=1)
        if self.ctx.has_secret_key():
            raise ValueError("the server must not hold the secret key")

    def load(self, data: bytes) -> Any:
        return _quiet(ts.ckks_vector_from, self.ctx, data)

    def add_inplace(self, acc: Any, block: Any) -> None:
        acc.add_(block)

    def sub_inplace(self, acc: Any, block: Any) -> None:
        acc.sub_(block)

    def dump(self, acc: Any) -> bytes:
        data: bytes = acc.serialize()
        return data
