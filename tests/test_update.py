"""Tests for cipherhive.node.training.update (weighting, FedAvg mean, model <-> vector) and the layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cipherhive.ckks import codec, keys
from cipherhive.ckks.codec import VALUE_RANGE, PublicCodec, SecretCodec
from cipherhive.federation.layout import (
    CHECK_SLOT,
    EVAL_VALUES,
    LEADING_VALUES,
    Layout,
    TensorSpec,
    describe_difference,
)
from cipherhive.node.sums.checks import (
    CheckedApplier,
    SumLimits,
    SumRejected,
    check_participant_slot,
    check_participants,
)
from cipherhive.node.training import update
from cipherhive.node.training.update import UpdateError
from cipherhive.server.ingest.running_sum import RunningSum
from cipherhive.v1 import federation_pb2 as pb


@pytest.fixture(scope="module")
def codecs(tmp_path_factory: pytest.TempPathFactory) -> tuple[SecretCodec, PublicCodec]:
    files = keys.keygen(tmp_path_factory.mktemp("keys"))
    return SecretCodec(files.secret.read_bytes()), PublicCodec(files.public.read_bytes())


# --------------------------------------------------------------------------- weighted_vector


def test_weighted_vector_layout() -> None:
    local = np.array([1.0, 2.0, -3.0])
    global_ = np.array([0.5, 2.0, 1.0])
    out = update.weighted_vector(local, global_, num_samples=250, weight_unit=1000.0, max_participants=64)
    assert out.dtype == np.float64
    # [w, check slot, evaluation slots (zeros: no evaluation), w·Δ…]
    np.testing.assert_array_equal(out, [0.25, 1.0, *[0.0] * EVAL_VALUES, 0.125, 0.0, -1.0])
    # The inputs are left alone.
    np.testing.assert_array_equal(local, [1.0, 2.0, -3.0])


def test_weighted_vector_empty_update() -> None:
    out = update.weighted_vector(np.zeros(0), np.zeros(0), 10, 10.0, 8)
    np.testing.assert_array_equal(out, [1.0, 1.0, *[0.0] * EVAL_VALUES])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weighted_vector_refuses_non_finite(bad: float) -> None:
    local = np.array([0.0, bad, 1.0])
    with pytest.raises(UpdateError, match="NaN or infinite"):
        update.weighted_vector(local, np.zeros(3), 10, 1000.0, 64)
    with pytest.raises(UpdateError, match="NaN or infinite"):
        update.weighted_vector(np.zeros(3), local, 10, 1000.0, 64)


@pytest.mark.parametrize("samples", [0, -5])
def test_weighted_vector_refuses_no_samples(samples: int) -> None:
    with pytest.raises(UpdateError, match="at least one"):
        update.weighted_vector(np.zeros(3), np.zeros(3), samples, 1000.0, 64)


def test_weighted_vector_range_limit() -> None:
    max_participants = 64
    limit = VALUE_RANGE / max_participants
    # weight 1: the weighted delta is the delta itself.
    at_limit = np.array([limit, -limit])
    out = update.weighted_vector(at_limit, np.zeros(2), 1000, 1000.0, max_participants)
    assert np.abs(out).max() == limit

    with pytest.raises(UpdateError, match="beyond the") as info:
        update.weighted_vector(np.array([0.0, -limit * 1.01]), np.zeros(2), 1000, 1000.0, max_participants)
    assert f"{max_participants} members" in str(info.value)

    # A larger federation leaves each member a smaller share of the range.
    update.weighted_vector(np.array([limit / 2]), np.zeros(1), 1000, 1000.0, max_participants)
    with pytest.raises(UpdateError):
        update.weighted_vector(np.array([limit / 2]), np.zeros(1), 1000, 1000.0, 4 * max_participants)


def test_weighted_vector_weight_itself_is_range_checked() -> None:
    # weight = samples / weight_unit; a tiny weight_unit makes the weight slot overflow.
    with pytest.raises(UpdateError, match="beyond the"):
        update.weighted_vector(np.zeros(3), np.zeros(3), 10_000, 1e-3, 64)


# --------------------------------------------------------------------------- mean_from_sum


@pytest.mark.parametrize("members", [3, 4, 5])
def test_mean_from_sum_end_to_end(codecs: tuple[SecretCodec, PublicCodec], members: int) -> None:
    secret, public = codecs
    rng = np.random.default_rng(members)
    num_params = codec.VALUES_PER_CIPHERTEXT + 1234  # the parameters span two blocks
    global_ = rng.normal(0.0, 1.0, num_params)
    locals_ = [global_ + rng.normal(0.0, 0.05, num_params) for _ in range(members)]
    samples = [int(n) for n in rng.integers(200, 2000, members)]

    blocks = codec.num_ciphertexts(num_params + LEADING_VALUES)
    running = RunningSum(public, blocks)
    for local, n in zip(locals_, samples, strict=True):
        vector = update.weighted_vector(local, global_, n, 1000.0, 64)
        for index, blob in enumerate(secret.encrypt_all(vector)):
            running.add(index, public.load(blob))
    summed = np.concatenate([secret.decrypt(blob) for blob in running.serialized()])

    mean = update.mean_from_sum(summed, num_params)
    deltas = [local - global_ for local in locals_]
    expected = sum(n * d for n, d in zip(samples, deltas, strict=True)) / sum(samples)
    assert mean.shape == (num_params,)
    assert np.abs(mean - expected).max() < 1e-7
    assert abs(summed[0] - sum(samples) / 1000.0) < 1e-7
    assert abs(summed[1] - members) < 1e-7  # the check slot counts the contributors


@pytest.mark.parametrize("weight", [0.0, 1e-12, -1.0, np.nan, np.inf])
def test_mean_from_sum_refuses_bad_weight(weight: float) -> None:
    summed = np.array([weight, 1.0, *[0.0] * EVAL_VALUES, 1.0, 2.0, 0.0])
    with pytest.raises(UpdateError, match="total weight"):
        update.mean_from_sum(summed, 2)


# --------------------------------------------------------------------------- model <-> vector


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors = list(model.named_parameters())
    tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return tensors


def test_flatten_apply_split_round_trip() -> None:
    model = _model()
    tensors = _tensors(model)
    layout = update.layout_of(tensors, "base")
    base = update.flatten(tensors)
    assert base.dtype == np.float64
    assert base.shape == (layout.num_params,)
    assert layout.num_params == sum(t.numel() for _, t in tensors)
    assert layout.tensors[0] == TensorSpec("0.weight", (4, 3))
    assert layout.base_model_hash == "base"

    delta = np.random.default_rng(0).normal(0.0, 0.1, base.shape[0])
    update.apply_vector(tensors, base, delta)
    after = update.flatten(tensors)
    np.testing.assert_array_equal(after, (base + delta).astype(np.float32).astype(np.float64))
    # Tensors keep their identity and dtype (the optimizer still points at them).
    assert [t for _, t in tensors] == [t for _, t in _tensors(model)]
    assert all(t.dtype == torch.float32 for _, t in tensors)

    parts = update.split(tensors, delta)
    assert list(parts) == [name for name, _ in tensors]
    offset = 0
    for name, tensor in tensors:
        assert parts[name].shape == tensor.shape
        assert parts[name].dtype == torch.float64
        n = tensor.numel()
        np.testing.assert_array_equal(parts[name].reshape(-1).numpy(), delta[offset : offset + n])
        offset += n
    # split copies: changing the vector does not change the parts.
    delta[:] = 0.0
    assert float(parts["0.weight"].abs().sum()) > 0.0


def test_flatten_empty() -> None:
    assert update.flatten([]).shape == (0,)


def test_flatten_float32_is_exact() -> None:
    t = torch.tensor([0.1, 1e-30, 3.4e38], dtype=torch.float32)
    out = update.flatten([("t", t)])
    np.testing.assert_array_equal(out, t.numpy().astype(np.float64))


# --------------------------------------------------------------------------- Layout


def _layout(**changes: object) -> Layout:
    tensors = changes.pop("tensors", (TensorSpec("a", (2, 3)), TensorSpec("b", (4,)), TensorSpec("c", ())))
    return Layout(tensors, changes.pop("base_model_hash", ""))  # type: ignore[arg-type]


def test_layout_sizes() -> None:
    layout = _layout()
    assert [t.size for t in layout.tensors] == [6, 4, 1]
    assert layout.num_params == 11
    assert layout.num_values == 11 + 2 + EVAL_VALUES  # [w, 1.0, e…, w·Δ…]


def test_layout_hash_stable() -> None:
    layout = _layout()
    assert layout.hash == _layout().hash
    assert layout.hash == hashlib.sha256(layout.canonical().encode()).hexdigest()
    assert len(layout.hash) == 64
    assert Layout.from_canonical(layout.canonical()) == layout
    assert Layout.from_canonical(layout.canonical()).hash == layout.hash


@pytest.mark.parametrize(
    "other",
    [
        _layout(tensors=(TensorSpec("a", (3, 2)), TensorSpec("b", (4,)), TensorSpec("c", ()))),
        _layout(tensors=(TensorSpec("a", (6,)), TensorSpec("b", (4,)), TensorSpec("c", ()))),
        _layout(tensors=(TensorSpec("x", (2, 3)), TensorSpec("b", (4,)), TensorSpec("c", ()))),
        _layout(tensors=(TensorSpec("b", (4,)), TensorSpec("a", (2, 3)), TensorSpec("c", ()))),
        _layout(tensors=(TensorSpec("a", (2, 3)), TensorSpec("b", (4,)))),
        _layout(base_model_hash="abc"),
    ],
    ids=["shape", "reshape", "name", "order", "missing", "base-hash"],
)
def test_layout_hash_changes(other: Layout) -> None:
    assert other.hash != _layout().hash


def test_describe_difference() -> None:
    ours = _layout()
    assert describe_difference(ours, _layout()) == "layouts are equal"

    theirs = _layout(tensors=(TensorSpec("a", (2, 3)), TensorSpec("b", (5,)), TensorSpec("c", ())))
    assert describe_difference(ours, theirs) == "tensor #1 is b[5] but the federation has b[4]"

    fewer = _layout(tensors=(TensorSpec("a", (2, 3)),))
    assert describe_difference(ours, fewer) == "1 tensors sent but the federation has 3"

    message = describe_difference(_layout(base_model_hash="0123456789abcdefXYZ"), ours)
    assert message == "base model hash (none) differs from the federation's 0123456789ab"
    message = describe_difference(ours, _layout(base_model_hash="fedcba9876543210"))
    assert message == "base model hash fedcba987654 differs from the federation's (none)"


def test_layout_proto_round_trip() -> None:
    layout = _layout(base_model_hash="h" * 64)
    msg = layout.to_proto()
    assert msg.num_params == layout.num_params
    assert [t.name for t in msg.tensors] == ["a", "b", "c"]
    wire = pb.Layout.FromString(msg.SerializeToString())
    back = Layout.from_proto(wire)
    assert back == layout
    assert back.hash == layout.hash


# --------------------------------------------------------------------------- streaming


def test_weighted_blocks_need_room_for_the_leading_values() -> None:
    with pytest.raises(ValueError, match="leading values"):
        list(update.weighted_blocks(np.zeros(3), np.zeros(3), 0.5, LEADING_VALUES - 1))


@pytest.mark.parametrize("per_block", [LEADING_VALUES, LEADING_VALUES + 1, 7, 8, 11, 100])
def test_weighted_blocks_and_sum_applier_stream(per_block: int) -> None:
    """Block by block, both ways, equals the whole-vector computation for any block size."""
    rng = np.random.default_rng(per_block)
    global_ = rng.normal(0, 1, 13).astype(np.float32)
    local = (global_ + rng.normal(0, 0.05, 13)).astype(np.float32)
    blocks = list(update.weighted_blocks(local, global_, 0.5, per_block))
    assert all(b.shape[0] <= per_block for b in blocks)
    whole = update.weighted_vector(local, global_, 500, 1000.0, 64)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    # Pretend three members sent the same update: the sum is 3x, the mean is the update.
    out = np.empty_like(global_)
    mean = np.empty(13)
    limits = SumLimits(floor=3, max_update=10.0, max_participants=64, participants=3)
    applier = CheckedApplier(global_, out, per_block, limits, mean)
    for block in blocks:
        padded = np.zeros(per_block)
        padded[: block.shape[0]] = 3 * block
        applier.feed(padded)
    np.testing.assert_allclose(mean, local.astype(np.float64) - global_, atol=1e-12)
    np.testing.assert_array_equal(out, (global_.astype(np.float64) + mean).astype(np.float32))


def test_flat_params_views_and_copies() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).double())
    tensors = list(model.named_parameters())
    flat = update.FlatParams(tensors)
    assert not flat.views  # one float64 layer: values are gathered and scattered
    values = flat.read().copy()
    flat.load(values + 1)
    assert torch.allclose(model[1].bias, torch.from_numpy(values[-2:] + 1).double())
    model32 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    tensors32 = _tensors(model32)
    flat32 = update.FlatParams(tensors32)
    assert flat32.views
    flat32.read()[:] = 7.0  # writing the buffer writes the model
    assert float(model32[1].running_mean[0]) == 7.0
    assert float(model32[0].weight.detach()[0, 0]) == 7.0


# --------------------------------------------------------------------------- checks before applying a sum


def _encrypted_sum(
    secret: SecretCodec, public: PublicCodec, vectors: list[np.ndarray], others: list[bytes] | None = None
) -> list[bytes]:
    """The server's part: add the members' ciphertexts, return the serialized sum."""
    blocks = codec.num_ciphertexts(vectors[0].shape[0])
    running = RunningSum(public, blocks)
    for vector in vectors:
        for index, blob in enumerate(secret.encrypt_all(vector)):
            running.add(index, public.load(blob))
    for index, blob in enumerate(others or []):
        running.add(index, public.load(blob))
    return list(running.serialized())


_NUM_PARAMS = codec.VALUES_PER_CIPHERTEXT + 500  # two blocks: a rejection can come after a block was written


def _honest(rng: np.random.Generator, global_: np.ndarray, samples: int) -> np.ndarray:
    local = global_ + rng.normal(0.0, 0.05, global_.shape[0]).astype(np.float32)
    return update.weighted_vector(local, global_, samples, 1000.0, 64)


def _apply(
    secret: SecretCodec, blobs: list[bytes], global_: np.ndarray, limits: SumLimits
) -> tuple[np.ndarray, CheckedApplier]:
    out = global_.copy()
    applier = CheckedApplier(global_, out, codec.VALUES_PER_CIPHERTEXT, limits, np.empty(global_.shape[0]))
    for blob in blobs:
        applier.feed(secret.decrypt(blob))
    applier.finish(len(blobs))
    return out, applier


def _limits(**changes: object) -> SumLimits:
    fields: dict[str, object] = {
        "floor": 3,
        "max_update": 10.0,
        "max_participants": 64,
        "participants": 4,
        "own_weight": 0.5,
    }
    fields.update(changes)
    return SumLimits(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def honest_round(codecs: tuple[SecretCodec, PublicCodec]) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(10)
    global_ = rng.normal(0.0, 1.0, _NUM_PARAMS).astype(np.float32)
    return global_, [_honest(rng, global_, n) for n in (500, 800, 1200)]


def test_checked_applier_applies_an_honest_sum(
    codecs: tuple[SecretCodec, PublicCodec], honest_round: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    secret, public = codecs
    global_, vectors = honest_round
    out, applier = _apply(secret, _encrypted_sum(secret, public, vectors), global_, _limits(participants=3))
    summed = sum(vectors)
    expected = summed[LEADING_VALUES:] / summed[0]
    assert applier.mean is not None
    assert np.abs(applier.mean - expected).max() < 1e-7
    np.testing.assert_array_equal(out, (global_ + applier.mean).astype(np.float32))


def _weighted(weight: float, delta: float | np.ndarray, size: int = _NUM_PARAMS) -> np.ndarray:
    vector = np.zeros(size + LEADING_VALUES)
    vector[:LEADING_VALUES] = update.leading(weight)  # counts itself: the later checks are reached
    vector[LEADING_VALUES:] = weight * np.asarray(delta)
    return vector


@pytest.mark.parametrize(
    ("hostile", "reason", "words"),
    [
        # One member's [-100, 0, 0, …]: the total weight turns negative.
        (_weighted(-100.0, 0.0), "bad_weight", "not a positive number"),
        # Exactly cancels the honest weights: zero.
        (_weighted(-2.5, 0.0), "bad_weight", "not a positive number"),
        # Positive, but less than this node's own share of it.
        (_weighted(-2.3, 0.0), "bad_weight", "below this node's own weight"),
        # More weight than four members can encode.
        (_weighted(20_000.0, 0.0), "bad_weight", "exceeds what 4 members"),
        # A tiny weight carrying a huge update: the mean moves by ~400 per value.
        (_weighted(1e-6, 1e9), "update_too_large", "bound of 10 per value"),
        # A huge value in the second block (after the first was written into out).
        (
            np.concatenate(
                [update.leading(0.1), np.zeros(codec.VALUES_PER_CIPHERTEXT + 100), [4000.0], np.zeros(399)]
            ),
            "update_too_large",
            "bound of 10",
        ),
    ],
    ids=[
        "negative-weight",
        "zero-weight",
        "below-own-weight",
        "implausible-weight",
        "tiny-weight",
        "late-block",
    ],
)
def test_checked_applier_rejects_a_hostile_sum(
    codecs: tuple[SecretCodec, PublicCodec],
    honest_round: tuple[np.ndarray, list[np.ndarray]],
    hostile: np.ndarray,
    reason: str,
    words: str,
) -> None:
    """Each hostile share of the sum is rejected with its own reason, and ``out`` is the
    global model again afterwards (the daemon never applies a part of a rejected sum)."""
    secret, public = codecs
    global_, vectors = honest_round
    blobs = _encrypted_sum(secret, public, [*vectors, hostile])
    with pytest.raises(SumRejected) as err:
        _apply(secret, blobs, global_, _limits())
    assert err.value.reason == reason
    assert words in err.value.message
    # The message names no decrypted value.
    assert not any(ch.isdigit() for ch in err.value.message.replace("10 per", "").replace("4 members", ""))
    out = global_.copy()
    applier = CheckedApplier(global_, out, codec.VALUES_PER_CIPHERTEXT, _limits(), None)
    with pytest.raises(SumRejected):
        for blob in blobs:
            applier.feed(secret.decrypt(blob))
    np.testing.assert_array_equal(out, global_)


def test_checked_applier_restores_out_after_a_late_rejection(
    codecs: tuple[SecretCodec, PublicCodec], honest_round: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    secret, public = codecs
    global_, vectors = honest_round
    late = np.concatenate(
        [update.leading(0.1), np.zeros(codec.VALUES_PER_CIPHERTEXT + 100), [4000.0], np.zeros(399)]
    )
    blobs = _encrypted_sum(secret, public, [*vectors, late])
    out = global_.copy()
    applier = CheckedApplier(global_, out, codec.VALUES_PER_CIPHERTEXT, _limits(), None)
    applier.feed(secret.decrypt(blobs[0]))
    assert not np.array_equal(out, global_)  # the first block was written
    with pytest.raises(SumRejected, match="bound"):
        applier.feed(secret.decrypt(blobs[1]))
    np.testing.assert_array_equal(out, global_)


def test_checked_applier_rejects_a_sum_under_another_key(
    codecs: tuple[SecretCodec, PublicCodec],
    honest_round: tuple[np.ndarray, list[np.ndarray]],
    tmp_path: Path,
) -> None:
    """A well-formed ciphertext under another key decrypts to values spread over the modulus."""
    secret, public = codecs
    global_, vectors = honest_round
    other = SecretCodec(keys.keygen(tmp_path / "other").secret.read_bytes())
    mallory = list(other.encrypt_all(_weighted(1.0, 0.01)))
    blobs = _encrypted_sum(secret, public, vectors, mallory)
    with pytest.raises(SumRejected) as err:
        _apply(secret, blobs, global_, _limits())
    assert err.value.reason in ("participants_mismatch", "out_of_range", "bad_weight")
    # Alone, too (a server that made the whole "sum" up).
    with pytest.raises(SumRejected):
        _apply(secret, mallory, global_, _limits())


def _first_block(weight: float = 1.0, check: float = 4.0) -> np.ndarray:
    """A first block of 8 values: weight, check slot, zero evaluation slots, two mean updates."""
    return np.array([weight, check, *[0.0] * EVAL_VALUES, 0.2, 0.3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_checked_applier_rejects_non_finite(bad: float) -> None:
    global_ = np.zeros(10, dtype=np.float32)
    out = global_.copy()
    applier = CheckedApplier(global_, out, 8, _limits(own_weight=0.0), None)
    applier.feed(_first_block())
    with pytest.raises(SumRejected) as err:
        applier.feed(np.array([0.1, bad, *[0.0] * 6]))
    assert err.value.reason == "out_of_range"
    np.testing.assert_array_equal(out, global_)
    with pytest.raises(SumRejected) as err:
        CheckedApplier(global_, out, 8, _limits(own_weight=0.0), None).feed(_first_block(weight=bad))
    assert err.value.reason == "bad_weight"
    with pytest.raises(SumRejected) as err:
        CheckedApplier(global_, out, 8, _limits(own_weight=0.0), None).feed(_first_block(check=bad))
    assert err.value.reason == "participants_mismatch"
    spoiled = _first_block()
    spoiled[LEADING_VALUES - 1] = bad  # an evaluation slot: a value like any other here
    with pytest.raises(SumRejected) as err:
        CheckedApplier(global_, out, 8, _limits(own_weight=0.0), None).feed(spoiled)
    assert err.value.reason == "out_of_range"


def test_checked_applier_counts_blocks() -> None:
    global_ = np.zeros(10, dtype=np.float32)
    out = global_.copy()
    applier = CheckedApplier(global_, out, 8, _limits(own_weight=0.0), None)
    applier.feed(_first_block())
    with pytest.raises(SumRejected) as err:
        applier.finish(2)
    assert err.value.reason == "malformed"
    np.testing.assert_array_equal(out, global_)
    applier = CheckedApplier(global_, out, 8, _limits(own_weight=0.0), None)
    for _ in range(2):
        applier.feed(_first_block())
    with pytest.raises(SumRejected, match="more blocks"):
        applier.feed(_first_block())


@pytest.mark.parametrize(
    ("announced", "extra"),
    [
        (4, None),  # the server announces a fourth member that never contributed
        (2, None),  # or fewer than it summed
        (4, 0.0),  # a fourth upload that does not count itself
        (4, 2.0),  # a member that counts twice
    ],
    ids=["server-inflates", "server-deflates", "uncounted-upload", "double-count"],
)
def test_checked_applier_rejects_a_sum_whose_check_slot_is_not_the_participants(
    codecs: tuple[SecretCodec, PublicCodec],
    honest_round: tuple[np.ndarray, list[np.ndarray]],
    announced: int,
    extra: float | None,
) -> None:
    """Every member encodes 1.0 in the check slot: the decrypted sum counts its contributors,
    so a server that lies about a round's participants is caught (docs/spec/sum-checks.md §3)."""
    secret, public = codecs
    global_, vectors = honest_round
    members = list(vectors)
    if extra is not None:
        spoiled = _weighted(0.5, 0.0)
        spoiled[CHECK_SLOT] = extra
        members.append(spoiled)
    blobs = _encrypted_sum(secret, public, members)
    with pytest.raises(SumRejected) as err:
        _apply(secret, blobs, global_, _limits(participants=announced, floor=2, own_weight=0.0))
    assert err.value.reason == "participants_mismatch"
    assert f"the {announced} participants the server announced" in err.value.message
    # The honest sum with the true count passes, the slot within CKKS error of 3.
    _out, applier = _apply(secret, _encrypted_sum(secret, public, vectors), global_, _limits(participants=3))
    assert applier.blocks == len(blobs)


def test_check_slot_tolerance() -> None:
    check_participant_slot(3.0 + 5e-4, 3)
    for bad in (3.0 + 2e-3, 2.0, float("nan"), float("inf")):
        with pytest.raises(SumRejected) as err:
            check_participant_slot(bad, 3)
        assert err.value.reason == "participants_mismatch"


@pytest.mark.parametrize(("participants", "floor"), [(2, 3), (0, 2), (4, 5)])
def test_participants_below_the_floor(participants: int, floor: int) -> None:
    with pytest.raises(SumRejected) as err:
        check_participants(participants, floor)
    assert err.value.reason == "too_few_participants"
    check_participants(floor, floor)
