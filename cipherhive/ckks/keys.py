"""Federation key material: `cipherhive keygen`, loading and fingerprints.

The secret context (for member nodes only) holds the CKKS secret key; the
public context (for the server) holds the parameters and the public key and
nothing that decrypts. Both sides compute the same fingerprint from the
public parameters and public key, and compare it at join time, so a node
with another federation's key is refused before it sends anything.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

from cipherhive.ckks import codec
from cipherhive.runtime.fsutil import atomic_write

SECRET_FILE = "secret.ctx"
PUBLIC_FILE = "public.ctx"
FINGERPRINT_FILE = "fingerprint"
_FP_DOMAIN = b"cipherhive/key-fingerprint/v1\0"


def fingerprint(ctx: ts.Context) -> str:
    """SHA-256 over the encryption parameters and the public key (hex)."""
    mem = codec._MemFile()
    parms = ctx.seal_context().data.key_context_data().parms()
    if not ctx.has_public_key():
        raise codec.CodecError("context has no public key; it cannot be fingerprinted")
    digest = hashlib.sha256(_FP_DOMAIN)
    digest.update(mem.saved(parms))
    digest.update(mem.saved(ctx.public_key().data))
    return digest.hexdigest()


#: Values of the key-pair probe: few enough to cost one encryption, random so that a wrong secret
#: key cannot decrypt them by chance.
_PROBE_VALUES = 64
_PROBE_TOLERANCE = 1e-3


def check_key_pair(ctx: ts.Context) -> None:
    """Refuse a secret context whose secret key does not decrypt what its own public key encrypts.

    The fingerprint covers the parameters and the public key only, so a context assembled
    from the right public key and some other secret key (damaged, or handed over by someone
    hostile) would pass every join check and then decrypt every sum to noise. Encrypting
    random values under the public key alone and decrypting them with the secret key catches
    it: with another secret key the result is uniformly wrong.
    """
    if not ctx.has_secret_key():
        raise codec.CodecError(
            "context has no secret key; a member node needs secret.ctx from `cipherhive keygen`"
        )
    public = ctx.copy()
    public.make_context_public()
    probe = [float(x) for x in np.random.default_rng().uniform(-1.0, 1.0, _PROBE_VALUES)]
    sealed = ts.ckks_vector(public, probe).serialize()
    opened = ts.ckks_vector_from(ctx, sealed).decrypt()
    error = max(abs(a - b) for a, b in zip(opened, probe, strict=True))
    if not error < _PROBE_TOLERANCE:
        raise codec.CodecError(
            "its secret key does not belong to its public key: values encrypted under the public "
            f"key decrypt wrong (off by {error:.3g}), so every sum would decrypt to noise. The file "
            "was damaged or assembled from two keys; replace it with the federation's secret.ctx "
            "from a trusted member or from `cipherhive keygen`"
        )


def verified_fingerprint(secret_context: bytes) -> str:
    """The fingerprint of a member's secret context, after :func:`check_key_pair`."""
    ctx = ts.context_from(secret_context)
    check_key_pair(ctx)
    return fingerprint(ctx)


def fingerprint_of_file(path: Path) -> str:
    return fingerprint(ts.context_from(path.read_bytes()))


@dataclass(frozen=True)
class KeyFiles:
    secret: Path
    public: Path
    fingerprint: str


def keygen(out_dir: Path, *, force: bool = False) -> KeyFiles:
    """Create a new federation key in ``out_dir``; refuse to overwrite one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = out_dir / SECRET_FILE, out_dir / PUBLIC_FILE
    if not force and (secret_path.exists() or public_path.exists()):
        raise FileExistsError(
            f"{out_dir} already holds federation keys; a new key would lock every member "
            "out of the federation's history. Choose another --out or pass --force."
        )
    ctx = codec.new_secret_context()
    secret = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    public_ctx = ctx.copy()
    public_ctx.make_context_public()
    public = public_ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    fp = fingerprint(ctx)
    atomic_write(secret_path, secret, mode=0o600)
    atomic_write(public_path, public, mode=0o644)
    atomic_write(out_dir / FINGERPRINT_FILE, (fp + "\n").encode(), mode=0o644)
    return KeyFiles(secret_path, public_path, fp)


def read_secret_context(path: Path) -> bytes:
    """Read a node's secret context, refusing one that others can read."""
    if not path.exists():
        raise FileNotFoundError(
            f"secret context {path} not found; copy secret.ctx from `cipherhive keygen` here"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"secret context {path} has mode {mode:o}; other users could read the federation's "
            f"secret key. Run: chmod 600 {path}"
        )
    return path.read_bytes()


def read_public_context(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(
            f"public context {path} not found; copy public.ctx from `cipherhive keygen` here"
        )
    return path.read_bytes()


def ensure_private_dir(path: Path) -> None:
    """Create a directory only its owner can enter (state that may hold key-derived data)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


_MEMBERS_DOMAIN = b"cipherhive/members-key/v1\0"


def members_key(secret_context: bytes, purpose: str) -> bytes:
    """A 32-byte key every member computes alike and the server cannot: derived from the secret key.

    For values members must agree on that the server must not be able to test guesses
    against (the initial model's fingerprint: a plain hash of a seeded model would let
    the server confirm a guessed seed or checkpoint). It is SHA-256 over a purpose and
    the secret key's coefficients, not the key file's bytes, so a member whose secret.ctx
    was serialized again still derives the same key; nothing about the secret key can be
    learned from it.
    """
    ctx = ts.context_from(secret_context)
    if not ctx.has_secret_key():
        raise codec.CodecError(
            "this context holds no secret key; members need the federation's secret context "
            "(secret.ctx from `cipherhive keygen`)"
        )
    poly = ctx.secret_key().data.data()
    digest = hashlib.sha256(_MEMBERS_DOMAIN + purpose.encode() + b"\0")
    digest.update(b"".join(int(poly[i]).to_bytes(8, "little") for i in range(poly.coeff_count())))
    return digest.digest()
