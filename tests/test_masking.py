"""Double masks inside the ciphertexts (SecAgg §4): hide one upload, cancel in the sum,
come off the sum without a key, and a sum's second component is checked before decrypting."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cipherhive.ckks import c0_sum, codec, keys, seal_format
from cipherhive.ckks.codec import PublicCodec, SecretCodec
from cipherhive.node.crypto.pool import CryptoPool
from cipherhive.secagg import mask_stream, masking
from cipherhive.secagg.masking import MaskPlan, SeedCheckFailed
from cipherhive.server.ingest.running_sum import RunningSum

MEMBERS = 5
N = codec.POLY_MODULUS_DEGREE


def _pair_keys(n: int) -> dict[tuple[int, int], bytes]:
    return {(i, j): os.urandom(32) for i in range(n) for j in range(i + 1, n)}


def _plans(n: int, q: int, keys_: dict[tuple[int, int], bytes] | None = None) -> list[MaskPlan]:
    """Member i is the higher of (a, i) (sign +1) and the lower of (i, b) (sign -1)."""
    keys_ = _pair_keys(n) if keys_ is None else keys_
    return [
        MaskPlan.fresh([(k, 1 if i == b else -1) for (a, b), k in keys_.items() if i in (a, b)], q)
        for i in range(n)
    ]


def _values(seed: int, count: int = codec.VALUES_PER_CIPHERTEXT) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, count)


def _sum(public: PublicCodec, uploads: list[bytes]) -> object:
    acc = public.load(uploads[0])
    for blob in uploads[1:]:
        public.add_inplace(acc, public.load(blob))
    return acc


def test_masks_hide_each_upload_and_the_released_self_masks_unmask_the_sum(
    secret: SecretCodec, public: PublicCodec
) -> None:
    plans = _plans(MEMBERS, secret.modulus)
    values = [_values(i) for i in range(MEMBERS)]
    block = 7
    uploads = [secret.encrypt_masked(values[i], block, plans[i]) for i in range(MEMBERS)]
    for i, blob in enumerate(uploads):
        alone = secret.decrypt(blob)  # the shared key alone opens nothing
        # Noise of the modulus' size: a uniform polynomial decodes to ~13·q·2^-40 (q·2^-40 ≈ 1e6).
        assert 1 < np.median(np.abs(alone)) / (secret.modulus / codec.SCALE) < 100
        assert abs(np.corrcoef(alone, values[i])[0, 1]) < 0.05
    acc = _sum(public, uploads)
    still_masked = secret.decrypt(public.dump(acc))
    assert np.median(np.abs(still_masked)) > 1e3, "the self-masks hide the sum until they are released"
    public.remove_self_masks(acc, block, [p.self_seed for p in plans])  # type: ignore[arg-type]
    assert np.abs(secret.decrypt(public.dump(acc)) - sum(values)).max() < 1e-8


def test_pairwise_masks_cancel_and_a_wrong_sign_or_missing_pair_does_not() -> None:
    q, n = 1152921504606748673, MEMBERS
    keys_ = _pair_keys(n)
    plans = _plans(n, q, keys_)

    def pairwise_total(plans_: list[MaskPlan]) -> np.ndarray:
        total = np.zeros(N, dtype=np.uint64)
        for plan in plans_:
            c0_sum.add_mod(total, masking.sum_masks(plan.pairs, 2, q, N), np.uint64(q))
        return total

    assert not pairwise_total(plans).any()
    flipped = MaskPlan(
        plans[1].self_seed, ((plans[1].pairs[0][0], -plans[1].pairs[0][1]), *plans[1].pairs[1:]), q
    )
    assert pairwise_total([plans[0], flipped, *plans[2:]]).all()
    missing = MaskPlan(plans[3].self_seed, plans[3].pairs[1:], q)
    assert pairwise_total([*plans[:3], missing, *plans[4:]]).all()


def test_a_missing_pair_leaves_the_unmasked_sum_as_noise(secret: SecretCodec, public: PublicCodec) -> None:
    plans = _plans(3, secret.modulus)
    plans[2] = MaskPlan(plans[2].self_seed, plans[2].pairs[:1], secret.modulus)
    values = [_values(20 + i) for i in range(3)]
    acc = _sum(public, [secret.encrypt_masked(values[i], 0, plans[i]) for i in range(3)])
    public.remove_self_masks(acc, 0, [p.self_seed for p in plans])  # type: ignore[arg-type]
    assert np.median(np.abs(secret.decrypt(public.dump(acc)) - sum(values))) > 1e3


def test_lazy_reduction_matches_term_by_term_addition() -> None:
    """More terms than fit one uint64 (15), mixed signs, against add_mod one at a time."""
    q = 1152921504606748673
    terms = [(os.urandom(32), 1 if i % 3 else -1) for i in range(40)]
    expected = np.zeros(N, dtype=np.uint64)
    for key, sign in terms:
        m = mask_stream.mask(key, 9, q, N)
        (c0_sum.add_mod if sign > 0 else c0_sum.sub_mod)(expected, m, np.uint64(q))
    assert np.array_equal(masking.sum_masks(terms, 9, q, N), expected)


def test_masked_uploads_stay_seeded_and_load_in_the_public_codec(
    secret: SecretCodec, public: PublicCodec
) -> None:
    plan = _plans(3, secret.modulus)[0]
    plain = secret.encrypt(_values(1))
    blob = secret.encrypt_masked(_values(1), 0, plan)
    parsed = seal_format.read_ciphertext(blob)
    assert parsed.seeded and seal_format.read_header(blob).compression == seal_format.COMPR_NONE
    assert len(blob) == 65730 and len(blob) <= len(plain)  # 8.02 bytes per value
    assert len(blob) / codec.VALUES_PER_CIPHERTEXT < 8.1
    ct = public.load(blob)
    assert ct.size() == 2


def test_running_sum_adds_and_rolls_back_masked_uploads_bit_for_bit(
    secret: SecretCodec, public: PublicCodec
) -> None:
    plans = _plans(3, secret.modulus)
    uploads = [
        [secret.encrypt_masked(_values(30 + 2 * i + b), b, plans[i]) for b in range(2)] for i in range(3)
    ]
    running = RunningSum(public, 2)
    for member in uploads[:2]:
        for index, blob in enumerate(member):
            running.add(index, public.load(blob))
    before = list(running.serialized())
    for index, blob in enumerate(uploads[2]):
        running.add(index, public.load(blob))
    assert running.subtract(uploads[2]) == 2
    assert list(running.serialized()) == before


def test_remove_self_masks_needs_only_the_public_context(key_files: keys.KeyFiles) -> None:
    pub = PublicCodec(key_files.public.read_bytes())
    sec = SecretCodec(key_files.secret.read_bytes())
    assert pub.modulus == sec.modulus
    plan = MaskPlan.fresh([], pub.modulus)
    acc = pub.load(sec.encrypt_masked(_values(3), 4, plan))
    pub.remove_self_masks(acc, 4, [plan.self_seed])
    assert np.abs(sec.decrypt(pub.dump(acc)) - _values(3)).max() < 1e-8
    with pytest.raises(masking.MaskError):
        pub.remove_self_masks(acc, 4, [b"short"])


# ----------------------------------------------------------------------------- the seed check


def _masked_sum(secret: SecretCodec, public: PublicCodec, block: int) -> tuple[bytes, list[bytes]]:
    plans = _plans(MEMBERS, secret.modulus)
    uploads = [secret.encrypt_masked(_values(40 + i), block, plans[i]) for i in range(MEMBERS)]
    acc = _sum(public, uploads)
    public.remove_self_masks(acc, block, [p.self_seed for p in plans])  # type: ignore[arg-type]
    return public.dump(acc), [masking.upload_seed(u) for u in uploads]


def test_seed_check_passes_an_honest_sum(secret: SecretCodec, public: PublicCodec) -> None:
    summed, seeds = _masked_sum(secret, public, 5)
    secret.check_seeds(summed, seeds, 5)
    secret.check_seeds(summed, list(reversed(seeds)), 5)  # addition commutes


def test_seed_check_refuses_one_changed_coefficient_of_c1(secret: SecretCodec, public: PublicCodec) -> None:
    summed, seeds = _masked_sum(secret, public, 5)
    ct = seal_format.read_ciphertext(summed)
    coefficients = ct.coefficients.copy()
    coefficients[N + 1234] = (int(coefficients[N + 1234]) + 1) % secret.modulus
    ct.coefficients = coefficients
    with pytest.raises(SeedCheckFailed, match=r"block 5 .*second component differs"):
        secret.check_seeds(ct.to_bytes(), seeds, 5)


def test_seed_check_refuses_a_missing_extra_or_foreign_seed(secret: SecretCodec, public: PublicCodec) -> None:
    summed, seeds = _masked_sum(secret, public, 1)
    with pytest.raises(SeedCheckFailed):
        secret.check_seeds(summed, seeds[:-1], 1)
    with pytest.raises(SeedCheckFailed):
        secret.check_seeds(summed, [*seeds, seeds[0]], 1)
    with pytest.raises(SeedCheckFailed):
        secret.check_seeds(summed, [], 1)
    garbage = seeds[0][:-1] + bytes([seeds[0][-1] ^ 1])
    with pytest.raises(SeedCheckFailed):
        secret.check_seeds(summed, [garbage, *seeds[1:]], 1)
    with pytest.raises(SeedCheckFailed, match="not a ciphertext"):
        secret.check_seeds(summed[:100], seeds, 1)


def test_seed_check_refuses_a_seeded_upload_sent_as_a_sum(secret: SecretCodec) -> None:
    """An individual (unmasked) upload is what a server would like a node to decrypt."""
    blob = secret.encrypt(_values(2))
    with pytest.raises(SeedCheckFailed, match="full two-component"):
        secret.check_seeds(blob, [masking.upload_seed(blob)], 0)


# ----------------------------------------------------------------------------- plan and pool


def test_plan_round_trips_and_refuses_bad_parts() -> None:
    plan = MaskPlan.fresh([(os.urandom(32), 1), (os.urandom(32), -1)], 97)
    assert MaskPlan.from_bytes(plan.to_bytes()) == plan
    assert "self_seed" not in repr(plan) and plan.self_seed.hex() not in repr(plan)
    with pytest.raises(masking.MaskError):
        MaskPlan(b"x" * 31, (), 97)
    with pytest.raises(masking.MaskError):
        MaskPlan(bytes(32), ((bytes(32), 0),), 97)
    with pytest.raises(masking.MaskError):
        MaskPlan(bytes(32), (), 1 << 61)
    with pytest.raises(masking.MaskError):
        MaskPlan.from_bytes(plan.to_bytes()[:-1])


def test_plan_for_another_modulus_is_refused(secret: SecretCodec) -> None:
    with pytest.raises(codec.CodecError, match="data prime"):
        secret.encrypt_masked(_values(0), 0, MaskPlan.fresh([], 97))


@pytest.mark.parametrize("workers", [1, 2])
def test_crypto_pool_masks_blocks_with_their_index(
    key_files: keys.KeyFiles, secret: SecretCodec, public: PublicCodec, workers: int
) -> None:
    size = codec.VALUES_PER_CIPHERTEXT
    vectors = [_values(50 + i, 2 * size + 17) for i in range(3)]
    plans = _plans(3, secret.modulus)
    uploads = []
    with CryptoPool(key_files.secret.read_bytes(), workers) as pool:
        with pytest.raises(masking.MaskError, match="no mask plan"):
            list(pool.encrypt_masked([vectors[0][:size]]))
        for vector, plan in zip(vectors, plans, strict=True):
            pool.set_mask_plan(plan)
            blocks = (vector[s : s + size] for s in range(0, vector.shape[0], size))
            uploads.append(list(pool.encrypt_masked(blocks)))
        pool.clear_mask_plan()
    total = sum(vectors)
    for index in range(3):
        acc = _sum(public, [member[index] for member in uploads])
        public.remove_self_masks(acc, index, [p.self_seed for p in plans])  # type: ignore[arg-type]
        got = secret.decrypt(public.dump(acc))
        part = total[index * size : (index + 1) * size]
        assert np.abs(got[: part.shape[0]] - part).max() < 1e-8


@pytest.mark.parametrize("workers", [1, 2])
def test_crypto_pool_checks_every_block_before_anything_is_decrypted(
    key_files: keys.KeyFiles, secret: SecretCodec, public: PublicCodec, workers: int
) -> None:
    plans = _plans(3, secret.modulus)
    uploads = [
        [secret.encrypt_masked(_values(60 + 3 * i + b), b, plans[i]) for b in range(3)] for i in range(3)
    ]
    summed, seeds = [], []
    for index in range(3):
        acc = _sum(public, [member[index] for member in uploads])
        public.remove_self_masks(acc, index, [p.self_seed for p in plans])  # type: ignore[arg-type]
        summed.append(public.dump(acc))
        seeds.append([masking.upload_seed(member[index]) for member in uploads])
    with CryptoPool(key_files.secret.read_bytes(), workers) as pool:
        pool.check_seeds(summed, seeds, 3)
        swapped = [summed[0], summed[2], summed[1]]  # blocks out of order: each c1 belongs elsewhere
        with pytest.raises(SeedCheckFailed) as err:
            pool.check_seeds(swapped, seeds, 3)
        assert err.value.block_index == 1
        with pytest.raises(SeedCheckFailed, match="seeds for 2"):
            pool.check_seeds(summed, seeds[:2], 3)
