"""Property-based tests of what the server accepts: random headers, chunk sequences and bytes.

Whatever arrives, the ingest path either accepts a complete, well-formed
upload or refuses it with a RoundError carrying a client-error status, and a
refusal leaves the round's encrypted sum bit-for-bit as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cipherhive.ckks import codec, keys
from cipherhive.federation.layout import Layout, TensorSpec
from cipherhive.server.config import ServerConfig
from cipherhive.server.ingest.upload_stream import SUBMISSION_ID, validate_header
from cipherhive.server.rounds.manager import RoundError, RoundManager
from cipherhive.server.storage.spool import Spool
from cipherhive.server.storage.state import State
from cipherhive.v1 import federation_pb2 as pb
from tests.ingesting import ingest_messages

LAYOUT = Layout((TensorSpec("w", (9000,)),))  # 9000 parameters + LEADING_VALUES -> 2 ciphertexts
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RoundManager, codec.SecretCodec, int]]:
    tmp = tmp_path_factory.mktemp("validators")
    files = keys.keygen(tmp / "keys")
    config = ServerConfig(insecure=True, state_dir=tmp / "state", public_context=files.public)
    config.state_dir.mkdir()
    state = State(config.state_dir / "state.db")
    public = codec.PublicCodec(files.public.read_bytes())
    manager = RoundManager(config, state, Spool(config.state_dir), public, files.fingerprint)
    manager.set_layout(LAYOUT, actor="test")  # the operator pins it; joining no longer does
    manager.join("honest", files.fingerprint, LAYOUT)
    row = manager.start_round(timeout=3600, force=True)  # nobody watches: below the floor
    secret = codec.SecretCodec(files.secret.read_bytes())
    # One honest upload first, so every block of the sum exists and can be compared.
    header = _header(row.round, files.fingerprint, "honest-upload-1")
    cts = list(secret.encrypt_all(np.full(LAYOUT.num_values, 0.125)))
    ingest_messages(manager, "honest", [pb.SubmitRequest(header=header), *_chunks(cts)])
    yield manager, secret, row.round
    state.close()


def _header(number: int, fingerprint: str, sid: str) -> pb.SubmitHeader:
    return pb.SubmitHeader(
        round=number,
        base_round=0,
        submission_id=sid,
        layout_hash=LAYOUT.hash,
        key_fingerprint=fingerprint,
        num_values=LAYOUT.num_values,
        num_ciphertexts=codec.num_ciphertexts(LAYOUT.num_values),
    )


def _chunks(cts: list[bytes]) -> list[pb.SubmitRequest]:
    return [
        pb.SubmitRequest(chunk=pb.SubmitChunk(index=i, first_ciphertext=i, ciphertexts=[c]))
        for i, c in enumerate(cts)
    ]


def _sum_bytes(manager: RoundManager) -> list[bytes]:
    current = manager._open
    assert current is not None
    return list(current.running.serialized())


metric_values = st.floats(allow_nan=True, allow_infinity=True)
headers = st.builds(
    pb.SubmitHeader,
    round=st.integers(0, 2**64 - 1),
    base_round=st.integers(0, 2**64 - 1),
    submission_id=st.text(max_size=80),
    layout_hash=st.text(max_size=70),
    key_fingerprint=st.text(max_size=70),
    num_values=st.integers(0, 2**64 - 1),
    num_ciphertexts=st.integers(0, 2**32 - 1),
    metrics=st.dictionaries(st.text(max_size=40), metric_values, max_size=20),
)


@given(headers)
@settings(max_examples=300, deadline=None)
def test_validate_header_accepts_or_says_why(header: pb.SubmitHeader) -> None:
    try:
        metrics = validate_header(header)
    except RoundError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.message
        return
    assert header.round >= 1 and SUBMISSION_ID.match(header.submission_id)
    assert all(math.isfinite(v) for v in metrics.values()) and len(metrics) <= 16


@given(st.binary(max_size=200_000))
@settings(max_examples=200, deadline=None)
def test_check_header_never_crashes(blob: bytes) -> None:
    try:
        codec.check_header(blob)
    except codec.CodecError as exc:
        assert str(exc)


#: One upload as a sequence of operations on the honest ciphertexts and some noise.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("ct"), st.integers(0, 1)),
        st.tuples(st.just("junk"), st.binary(max_size=300)),
        st.tuples(st.just("truncate"), st.integers(0, 1)),
        st.tuples(st.just("skip-index"), st.just(0)),
        st.tuples(st.just("header"), st.just(0)),
    ),
    max_size=5,
)


@given(steps=steps, header_fields=st.sampled_from(["ok", "round", "layout", "values", "base", "sid"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_refused_uploads_leave_the_sum_untouched(
    world: tuple[RoundManager, codec.SecretCodec, int], steps: list[tuple[str, object]], header_fields: str
) -> None:
    manager, secret, number = world
    before = _sum_bytes(manager)
    header = _header(number, manager.fingerprint, "fuzz-" + "a" * 8)
    if header_fields == "round":
        header.round = number + 1
    elif header_fields == "layout":
        header.layout_hash = "0" * 64
    elif header_fields == "values":
        header.num_values += 1
    elif header_fields == "base":
        header.base_round = 3
    elif header_fields == "sid":
        header.submission_id = "bad id"
    cts = list(secret.encrypt_all(np.full(LAYOUT.num_values, 0.5)))
    messages = [pb.SubmitRequest(header=header)]
    sent = 0
    for kind, arg in steps:
        if kind == "ct":
            blob = cts[int(arg)]  # type: ignore[call-overload]
        elif kind == "junk":
            blob = bytes(arg)  # type: ignore[call-overload]
        elif kind == "truncate":
            blob = cts[int(arg)][:-7]  # type: ignore[call-overload]
        elif kind == "skip-index":
            messages.append(pb.SubmitRequest(chunk=pb.SubmitChunk(index=sent + 5, first_ciphertext=sent)))
            continue
        else:
            messages.append(pb.SubmitRequest(header=header))
            continue
        messages.append(
            pb.SubmitRequest(chunk=pb.SubmitChunk(index=sent, first_ciphertext=sent, ciphertexts=[blob]))
        )
        sent += 1
    test_refused_uploads_leave_the_sum_untouched.runs += 1  # type: ignore[attr-defined]
    node = f"fuzzer-{test_refused_uploads_leave_the_sum_untouched.runs}"  # type: ignore[attr-defined]
    try:
        ingest_messages(manager, node, messages)
    except RoundError as exc:
        assert exc.code in CLIENT_ERRORS, exc
        assert _sum_bytes(manager) == before
    else:
        # Accepted: it must have been complete and in order, and the sum grew by exactly it.
        assert header_fields == "ok" and sent == 2
        after = _sum_bytes(manager)
        added = [m.chunk.ciphertexts[0] for m in messages[1:] if m.WhichOneof("part") == "chunk"]
        for old, new, blob in zip(before, after, added, strict=True):
            grown = secret.decrypt(new) - secret.decrypt(old)
            assert np.abs(grown - secret.decrypt(blob)).max() < 1e-6


test_refused_uploads_leave_the_sum_untouched.runs = 0  # type: ignore[attr-defined]


def test_state_dir_is_not_left_with_partials(world: tuple[RoundManager, codec.SecretCodec, int]) -> None:
    manager, _, number = world
    assert list(Path(manager.spool.round_dir(number)).glob("*.partial")) == []


def test_an_error_after_acceptance_does_not_uncount_the_upload(
    world: tuple[RoundManager, codec.SecretCodec, int],
) -> None:
    """finish_upload made it durable and counted: a later failure of the call must not subtract it."""
    manager, secret, number = world
    header = _header(number, manager.fingerprint, "accepted-then-error")
    begun = manager.begin_upload("late-error", header)
    assert not isinstance(begun, pb.SubmitReceipt)
    current, upload = begun
    for blob in secret.encrypt_all(np.full(LAYOUT.num_values, 0.25)):
        manager.add_block(current, upload, blob, manager.codec.load(blob))
    manager.finish_upload(current, upload, {})
    counted = _sum_bytes(manager)
    manager.abort_upload(current, upload, "the reply could not be sent")
    assert _sum_bytes(manager) == counted
    assert "late-error" in current.accepted
