"""Seeded, complex-packed CKKS: the one place that turns floats into ciphertexts.

Why this encoding (design.md, "Measured facts"): CKKS at N=8192 with a single
60-bit data prime ([60, 60]) and scale 2^40 needs no multiplicative depth,
which is all an aggregator needs; packing two reals into each complex slot
carries 8192 values per ciphertext; and SEAL's symmetric encryption saves the
ciphertext *seeded* (its random half replaced by a PRNG seed), so an upload
costs about 8 bytes per value. An unmasked round's sum is a full ciphertext
(about 16 bytes per value); a masked round's is Σ c0 alone (8 bytes per value,
:mod:`cipherhive.ckks.c0_sum`), whose c1 nodes rebuild from the members' seeds.

Three roles use this module:

* node, encode + encrypt: :class:`SecretCodec.encrypt`;
* server, load + add: :class:`PublicCodec.load` / :class:`RunningSum` (masked rounds:
  :class:`cipherhive.ckks.c0_sum.UploadParser` / ``MaskedSum``, no SEAL);
* node, decrypt + decode: :class:`SecretCodec.decrypt` (masked: :meth:`SecretCodec.decrypt_c0_sum`).

Double masking (SecAgg, Bonawitz et al., CCS 2017, §4; docs/spec/masked-round.md §3) hooks in
here without changing the ciphertext format (see :mod:`cipherhive.secagg.masking`):
:meth:`SecretCodec.encrypt_masked` adds the masks to c0 of the seeded upload,
the server takes the released self-masks off Σ c0 (no key), and
:meth:`SecretCodec.decrypt_c0_sum` rebuilds the sum's second component from the
members' seeds (:meth:`SecretCodec.check_seeds` verifies it, for a sum published
as full ciphertexts) before anything is decrypted.

SEAL's Python bindings only save to and load from a path, so each codec
keeps an in-memory file (``memfd``) per thread for that.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal

from cipherhive.ckks import c0_sum, seal_format
from cipherhive.runtime.errors import UserError
from cipherhive.secagg import masking

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 60)
SCALE_BITS = 40
SCALE = float(2**SCALE_BITS)
SLOTS = POLY_MODULUS_DEGREE // 2
VALUES_PER_CIPHERTEXT = 2 * SLOTS

#: Largest magnitude a decrypted *sum* may reach and still decode exactly:
#: the data prime is 60 bits and the scale 40, leaving 2^19 with one bit of
#: margin for the sign and noise. Nodes check their share of it before encrypting.
VALUE_RANGE = float(2**18)

_SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, reserved, size
#: A seeded upload is ~65.7 KB; a full ciphertext ~131 KB. Anything larger is refused
#: before SEAL reads it.
MAX_CIPHERTEXT_BYTES = 140_000


class CodecError(UserError, ValueError):
    """A ciphertext or key that does not belong to this federation's encoding."""


def num_ciphertexts(num_values: int) -> int:
    """Ciphertexts needed to carry ``num_values`` reals with this module's encoding."""
    return -(-num_values // VALUES_PER_CIPHERTEXT)


class _MemFile:
    """A per-thread anonymous in-memory file that SEAL can save to and load from."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _fd(self) -> int:
        fd: int | None = getattr(self._local, "fd", None)
        if fd is None:
            fd = os.memfd_create("cipherhive-seal", os.MFD_CLOEXEC)
            self._local.fd = fd
        return fd

    def path(self) -> str:
        return f"/proc/self/fd/{self._fd()}"

    def write(self, data: bytes) -> str:
        fd = self._fd()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return self.path()

    def saved(self, obj: object) -> bytes:
        """Bytes of ``obj.save(path)`` for any SEAL object."""
        fd = self._fd()
        os.ftruncate(fd, 0)
        obj.save(self.path())  # type: ignore[attr-defined]
        return os.pread(fd, os.fstat(fd).st_size, 0)


def check_header(data: bytes) -> None:
    """Refuse bytes that are not one plausible SEAL ciphertext, before SEAL parses them."""
    if len(data) < _HEADER.size:
        raise CodecError(f"ciphertext of {len(data)} bytes is shorter than a SEAL header")
    if len(data) > MAX_CIPHERTEXT_BYTES:
        raise CodecError(
            f"ciphertext of {len(data)} bytes exceeds {MAX_CIPHERTEXT_BYTES}; "
            "it was not made with this federation's parameters"
        )
    magic, header_size, _major, _minor, compr, _res, size = _HEADER.unpack_from(data)
    if magic != _SEAL_MAGIC or header_size != _HEADER.size:
        raise CodecError("bytes are not a SEAL object (bad magic or header size)")
    if size != len(data):
        raise CodecError(f"SEAL header announces {size} bytes but {len(data)} arrived")
    if compr not in (0, 1, 2):
        raise CodecError(f"unknown SEAL compression mode {compr}")


def _load_ciphertext(context: seal.SEALContext, mem: _MemFile, data: bytes) -> seal.Ciphertext:
    """SEAL's own parsing and validation, after our header check, with a clear error."""
    check_header(data)
    ct = seal.Ciphertext()
    try:
        ct.load(context, mem.write(data))
    except Exception as exc:
        raise CodecError(f"SEAL refused the ciphertext: {exc}") from exc
    return ct


def _ckks_context(data: bytes, n_threads: int) -> ts.Context:
    try:
        return ts.context_from(data, n_threads=n_threads)
    except Exception as exc:
        raise CodecError(f"not a TenSEAL context: {exc}") from exc


def _check_parameters(ctx: ts.Context) -> None:
    parms = ctx.seal_context().data.key_context_data().parms()
    bits = tuple(m.bit_count() for m in parms.coeff_modulus())
    if parms.poly_modulus_degree() != POLY_MODULUS_DEGREE or bits != COEFF_MOD_BIT_SIZES:
        raise CodecError(
            f"context has N={parms.poly_modulus_degree()} and coefficient moduli {list(bits)}; "
            f"this version needs N={POLY_MODULUS_DEGREE} and {list(COEFF_MOD_BIT_SIZES)} "
            "(make keys with `cipherhive keygen`)"
        )


@dataclass(frozen=True)
class _Seal:
    """The SEAL objects shared by both codecs."""

    context: ts.Context
    seal_context: seal.SEALContext
    evaluator: seal.Evaluator
    #: The data prime q, read from the context: masks are uniform modulo it.
    modulus: int


def _open(data: bytes, n_threads: int) -> _Seal:
    ctx = _ckks_context(data, n_threads)
    _check_parameters(ctx)
    sc = ctx.seal_context().data
    modulus = sc.first_context_data().parms().coeff_modulus()[0].value()
    return _Seal(ctx, sc, seal.Evaluator(sc), modulus)


class ServerCodec(Protocol):
    """What the server needs of an encoding: parse and validate a block, add, subtract, save.

    The product has one implementation, :class:`PublicCodec`; the benchmark plugs
    its baselines in here to run them through the very same pipeline.
    """

    values_per_block: int

    def load(self, data: bytes) -> Any: ...

    def add_inplace(self, acc: Any, block: Any) -> None: ...

    def sub_inplace(self, acc: Any, block: Any) -> None: ...

    def dump(self, acc: Any) -> bytes: ...


class NodeCodec(Protocol):
    """What a node needs of an encoding: one block of values to bytes and a sum back."""

    values_per_block: int

    def encrypt(self, values: np.ndarray) -> bytes: ...

    def decrypt(self, data: bytes) -> np.ndarray: ...


def blocks_for(num_values: int, values_per_block: int) -> int:
    """Blocks (ciphertexts) needed to carry ``num_values`` values."""
    return -(-num_values // values_per_block)


class PublicCodec:
    """Server side: load and add ciphertexts with a context that holds no secret key."""

    values_per_block = VALUES_PER_CIPHERTEXT

    def __init__(self, public_context: bytes) -> None:
        s = _open(public_context, n_threads=1)
        if s.context.has_secret_key() or s.context.is_private():
            raise CodecError(
                "this context holds the federation's SECRET key; the server must only be "
                "given the public context (public.ctx from `cipherhive keygen`)"
            )
        self._s = s
        self._parms_id = list(s.seal_context.first_parms_id())
        self._mem = _MemFile()
        # SEAL's header (magic, version) as this SEAL writes it: the template for
        # plaintexts built by hand (the released self-masks).
        self._plain_header = seal_format.read_header(self._mem.saved(seal.Plaintext()))

    @property
    def modulus(self) -> int:
        return self._s.modulus

    def upload_parser(self) -> c0_sum.UploadParser:
        """What a masked round's sum needs to check and add uploads without SEAL."""
        return c0_sum.UploadParser(tuple(self._parms_id), SCALE, self._s.modulus)

    def load(self, data: bytes) -> seal.Ciphertext:
        """Parse and validate one ciphertext against the federation's parameters."""
        ct = _load_ciphertext(self._s.seal_context, self._mem, data)
        if ct.size() != 2:
            raise CodecError(f"ciphertext has {ct.size()} polynomials; a fresh one has 2")
        if list(ct.parms_id()) != self._parms_id or not ct.is_ntt_form():
            raise CodecError("ciphertext was made with other encryption parameters")
        if ct.scale != SCALE:
            raise CodecError(f"ciphertext scale {ct.scale} differs from 2^{SCALE_BITS}")
        return ct

    def add_inplace(self, acc: seal.Ciphertext, ct: seal.Ciphertext) -> None:
        self._s.evaluator.add_inplace(acc, ct)

    def sub_inplace(self, acc: seal.Ciphertext, ct: seal.Ciphertext) -> None:
        """Exact inverse of :meth:`add_inplace` (arithmetic mod q), used for rollback."""
        self._s.evaluator.sub_inplace(acc, ct)

    def dump(self, ct: seal.Ciphertext) -> bytes:
        return self._mem.saved(ct)

    def remove_self_masks(self, sum_ct: seal.Ciphertext, block_index: int, seeds: list[bytes]) -> None:
        """Subtract Σ PRG(b_i, block) mod q from ``sum_ct`` in place: SecAgg §4's unmasking.

        Needs no key: the released self-mask seeds give a plaintext (NTT form,
        this context's parms_id and scale, built with :mod:`cipherhive.ckks.seal_format`
        since sealapi cannot set a plaintext's coefficients) that SEAL subtracts.
        """
        coeffs = masking.self_mask_sum(seeds, block_index, self._s.modulus, POLY_MODULUS_DEGREE)
        data = seal_format.plaintext_bytes(self._plain_header, tuple(self._parms_id), SCALE, coeffs)
        plain = seal.Plaintext()
        plain.load(self._s.seal_context, self._mem.write(data))
        self._s.evaluator.sub_plain_inplace(sum_ct, plain)


class SecretCodec:
    """Node side: encrypt update blocks and decrypt sums with the federation's secret key."""

    values_per_block = VALUES_PER_CIPHERTEXT

    def __init__(self, secret_context: bytes) -> None:
        s = _open(secret_context, n_threads=1)
        if not s.context.has_secret_key():
            raise CodecError(
                "this context holds no secret key; nodes need the federation's secret "
                "context (secret.ctx from `cipherhive keygen`)"
            )
        sk = s.context.secret_key().data
        self._s = s
        self._encoder = seal.CKKSEncoder(s.seal_context)
        self._encryptor = seal.Encryptor(s.seal_context, sk)
        self._decryptor = seal.Decryptor(s.seal_context, sk)
        self._mem = _MemFile()
        # A seeded upload is (header, metadata, c0 array header) ‖ c0 ‖ seed, of fixed sizes:
        # the frame a c0-only sum is put back into (decrypt_c0_sum).
        fresh = masking.mask_ciphertext(
            self.encrypt(np.zeros(1)), 0, masking.MaskPlan.fresh([], s.modulus), POLY_MODULUS_DEGREE
        )
        self._head = fresh[: c0_sum.UPLOAD_BYTES - c0_sum.SEED_TRAILER_BYTES - c0_sum.RECORD_BYTES]
        self._zero_c0 = bytes(c0_sum.RECORD_BYTES)

    def encrypt(self, values: np.ndarray) -> bytes:
        """Encrypt up to VALUES_PER_CIPHERTEXT reals into one seeded ciphertext."""
        n = values.shape[0]
        if n > VALUES_PER_CIPHERTEXT:
            raise ValueError(f"{n} values do not fit one ciphertext")
        block = np.zeros(VALUES_PER_CIPHERTEXT, dtype=np.float64)
        block[:n] = values
        plain = seal.Plaintext()
        self._encoder.encode(block.view(np.complex128).tolist(), SCALE, plain)
        return self._mem.saved(self._encryptor.encrypt_symmetric(plain))

    @property
    def modulus(self) -> int:
        """The data prime q (what a :class:`cipherhive.secagg.masking.MaskPlan` needs)."""
        return self._s.modulus

    def encrypt_masked(self, values: np.ndarray, block_index: int, plan: masking.MaskPlan) -> bytes:
        """:meth:`encrypt`, then the plan's double masks added to c0 (SecAgg §4).

        Adding to c0 of the seeded ciphertext is adding to the encoded plaintext
        (c0 = -a·s + e + m) and keeps the seed, so the upload stays ~8 B/value;
        it is written back uncompressed (random coefficients do not compress).
        """
        if plan.modulus != self._s.modulus:
            raise CodecError("the mask plan was made for another data prime")
        return masking.mask_ciphertext(self.encrypt(values), block_index, plan, POLY_MODULUS_DEGREE)

    def check_seeds(self, sum_bytes: bytes, seeds: list[bytes], block_index: int = 0) -> None:
        """Raise :class:`cipherhive.secagg.masking.SeedCheckFailed` unless c1 of the sum is Σ expand(seed).

        Run on every block *before* decrypting it: a sum whose second component is
        not the one the members' signed seeds produce could be a ciphertext chosen by
        the server, and decrypting chosen ciphertexts recovers a CKKS key (Li and
        Micciancio, EUROCRYPT 2021). Each seed is expanded by SEAL itself: a seeded
        ciphertext with c0 = 0 and that seed is loaded (SEAL regenerates c1) and added.
        No secret key is used; ``block_index`` only labels the error.
        """

        def fail(why: str) -> masking.SeedCheckFailed:
            return masking.SeedCheckFailed(block_index, f"block {block_index} of the sum {why}")

        try:
            summed = seal_format.read_ciphertext(sum_bytes)
        except seal_format.FormatError as exc:
            raise fail(f"is not a ciphertext ({exc})") from exc
        if summed.seeded or summed.size != 2 or summed.coeff_modulus_size != 1:
            raise fail("is not a full two-component ciphertext at the data prime")
        if not seeds:
            raise fail("comes with no seeds")
        acc: seal.Ciphertext | None = None
        for seed in seeds:
            try:
                ct = _load_ciphertext(self._s.seal_context, self._mem, masking.seeded_zero(summed, seed))
            except (CodecError, seal_format.FormatError) as exc:
                raise fail("comes with a seed SEAL cannot expand") from exc
            if acc is None:
                acc = ct
            else:
                self._s.evaluator.add_inplace(acc, ct)
        assert acc is not None
        expected = seal_format.read_ciphertext(self._mem.saved(acc)).poly(1)
        if not np.array_equal(expected, summed.poly(1)):
            raise fail("does not match the members' seeds (second component differs)")

    def decrypt_c0_sum(self, record: bytes, seeds: list[bytes], block_index: int = 0) -> np.ndarray:
        """Decrypt one block of a masked round's sum, published as Σ c0 alone (:mod:`cipherhive.ckks.c0_sum`).

        c1 is rebuilt here as Σ expand(seed_i) by SEAL itself: Σ c0 is loaded with the
        first member's seed, then each other member's seeded zero is loaded and added.
        The server chooses nothing in c1 (Li and Micciancio, EUROCRYPT 2021); ``seeds``
        must already be checked against the members' signed commits. SEAL's load also
        refuses coefficients of Σ c0 that are not reduced modulo q.
        """

        def fail(why: str) -> masking.SeedCheckFailed:
            return masking.SeedCheckFailed(block_index, f"block {block_index} of the sum {why}")

        if len(record) != c0_sum.RECORD_BYTES:
            raise fail(f"is {len(record)} bytes; Σ c0 of one block is {c0_sum.RECORD_BYTES}")
        if not seeds:
            raise fail("comes with no seeds")
        acc: seal.Ciphertext | None = None
        for seed in seeds:
            first = acc is None
            data = self._head + (record if first else self._zero_c0) + seed
            try:
                ct = _load_ciphertext(self._s.seal_context, self._mem, data)
            except CodecError as exc:
                why = "holds coefficients SEAL refuses" if first else "comes with a seed SEAL cannot expand"
                raise fail(why) from exc
            if acc is None:
                acc = ct
            else:
                self._s.evaluator.add_inplace(acc, ct)
        assert acc is not None
        plain = seal.Plaintext()
        self._decryptor.decrypt(acc, plain)
        decoded = np.asarray(self._encoder.decode_complex(plain), dtype=np.complex128)
        return decoded.view(np.float64)

    def encrypt_all(self, values: np.ndarray) -> Iterable[bytes]:
        for start in range(0, values.shape[0], VALUES_PER_CIPHERTEXT):
            yield self.encrypt(values[start : start + VALUES_PER_CIPHERTEXT])

    def decrypt(self, data: bytes) -> np.ndarray:
        """Decrypt one (sum) ciphertext into VALUES_PER_CIPHERTEXT float64 values."""
        ct = _load_ciphertext(self._s.seal_context, self._mem, data)
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        decoded = np.asarray(self._encoder.decode_complex(plain), dtype=np.complex128)
        return decoded.view(np.float64)


def new_secret_context() -> ts.Context:
    """A fresh federation key: CKKS with this module's parameters, no evaluation keys."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
        n_threads=1,
    )
    ctx.global_scale = SCALE
    return ctx
