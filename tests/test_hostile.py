"""Hostile clients against a real server process: every bad request gets the right status,
the server keeps serving, and the next round still sums exactly the honest members' updates.

The test plays the members itself (it holds the federation's secret key), so it
knows every plaintext and every ciphertext it sent, and can check afterwards
that none of them was left in any file or log of the server.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cipherhive.ckks import codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import Layout, TensorSpec
from cipherhive.node.training.update import leading
from cipherhive.pki import certs
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

LAYOUT = Layout((TensorSpec("dense.weight", (100, 150)), TensorSpec("dense.bias", (100,))))
NUM_VALUES = LAYOUT.num_values  # 15100 parameters + LEADING_VALUES -> 2 ciphertexts
NUM_CTS = codec.num_ciphertexts(NUM_VALUES)
S = grpc.StatusCode


@dataclass
class Env:
    fed: LocalFederation
    secret: codec.SecretCodec
    fingerprint: str
    other_key_ct: bytes
    other_params_ct: bytes
    round: int = 0

    def tls(self, who: str) -> ClientTLS:
        d = self.fed.workdir / who
        return ClientTLS(d / f"{who}.crt", d / f"{who}.key", d / "ca.crt", "localhost")

    def channel(self, who: str) -> grpc.Channel:
        if who == "admin":
            return self.fed.admin_channel()
        return channel(f"127.0.0.1:{self.fed.port}", self.tls(who))

    def header(self, **overrides: object) -> pb.SubmitHeader:
        fields: dict[str, object] = {
            "round": self.round,
            "base_round": 0,
            "submission_id": "hostile-" + os.urandom(6).hex(),
            "layout_hash": LAYOUT.hash,
            "key_fingerprint": self.fingerprint,
            "num_values": NUM_VALUES,
            "num_ciphertexts": NUM_CTS,
        }
        fields.update(overrides)
        return pb.SubmitHeader(**fields)  # type: ignore[arg-type]

    def valid_cts(self, vector: np.ndarray | None = None) -> list[bytes]:
        if vector is None:
            vector = np.full(NUM_VALUES, 0.25)
        return list(self.secret.encrypt_all(vector))


def _chunks(cts: list[bytes], per: int = 16, start_index: int = 0) -> Iterator[pb.SubmitRequest]:
    for i in range(0, len(cts), per):
        yield pb.SubmitRequest(
            chunk=pb.SubmitChunk(
                index=start_index + i // per, first_ciphertext=i, ciphertexts=cts[i : i + per]
            )
        )


def _submit(ch: grpc.Channel, messages: list[pb.SubmitRequest]) -> pb.SubmitReceipt:
    return pb_grpc.AggregationStub(ch).SubmitUpdate(iter(messages), timeout=30)


def _join(ch: grpc.Channel, fingerprint: str, layout: Layout = LAYOUT) -> pb.JoinReply:
    return pb_grpc.AggregationStub(ch).Join(
        pb.JoinRequest(key_fingerprint=fingerprint, layout=layout.to_proto()), timeout=30
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("hostile")
    fed = LocalFederation(
        workdir,
        masked=False,
        nodes=3,
        rounds={"min_participants": 3, "auto_start": False, "timeout_seconds": 600.0},
        layout=LAYOUT,  # the operator pins the layout these test-held members use
    )
    fed.setup()
    ca = workdir / "ca"
    for name in ("mallory", "revoked"):
        certs.issue(ca, "node", name, workdir / name)
    certs.revoke(ca, "revoked")
    # A second federation: its own CA and its own key.
    certs.create_ca(workdir / "other-ca")
    certs.issue(workdir / "other-ca", "node", "outsider", workdir / "outsider")
    other = keys.keygen(workdir / "other-keys")
    other_codec = codec.SecretCodec(other.secret.read_bytes())
    import tenseal as ts

    bigger = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    bigger.global_scale = 2**40
    mem = codec._MemFile()
    import tenseal.sealapi as seal

    sc = bigger.seal_context().data
    enc = seal.Encryptor(sc, bigger.secret_key().data)
    plain = seal.Plaintext()
    seal.CKKSEncoder(sc).encode([0.5] * 16, 2.0**40, plain)
    other_params_ct = mem.saved(enc.encrypt_symmetric(plain))

    # The server, with limits high enough that the battery below is not rate limited.
    text = (workdir / "server.toml").read_text()
    text += "\n[limits]\nrequests_per_second = 500.0\nrequest_burst = 1000\nmax_streams_per_identity = 8\n"
    text += f'\n[log]\naudit_file = "{workdir / "audit.jsonl"}"\n'
    (workdir / "server.toml").write_text(text)
    fed.start_server()
    fed.wait_serving()
    secret_bytes = (workdir / "keys" / keys.SECRET_FILE).read_bytes()
    e = Env(
        fed,
        codec.SecretCodec(secret_bytes),
        keys.fingerprint_of_file(workdir / "keys" / keys.PUBLIC_FILE),
        other_codec.encrypt(np.full(100, 0.5)),
        other_params_ct,
    )
    try:
        yield e
    finally:
        codes = fed.stop_all()
        assert codes["server"] == 0, fed.log("server")[-3000:]


#: How long a case waits for the server to finish unwinding the previous case's upload.
UNWIND_SECONDS = 10.0


def _refused_while_the_last_unwinds(call: Callable[[], object]) -> object:
    """Run one case; retry while the server still counts the previous case's upload as running.

    A stream the transport cut (an oversized message) ends on the wire before its handler has
    unwound, and the server allows one upload per member at a time: for a moment the next
    upload is refused with RESOURCE_EXHAUSTED "already has an upload in progress", as an honest
    member's immediate retry would be (it backs off). That refusal is the one-upload limit at
    work, not this case's answer, so the case is sent again.
    """
    deadline = time.monotonic() + UNWIND_SECONDS
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            busy = exc.code() == S.RESOURCE_EXHAUSTED and "in progress" in (exc.details() or "")
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_hostile_battery_then_exact_honest_round(env: Env) -> None:
    fed = env.fed
    honest = {fed.node_name(i): env.channel(fed.node_name(i)) for i in range(3)}
    mallory = env.channel("mallory")
    admin = env.channel("admin")
    admin_stub = pb_grpc.AdminStub(admin)
    for ch in [*honest.values(), mallory]:
        _join(ch, env.fingerprint)
    # force: the test plays the members without watch streams, so none of them is online.
    opened = admin_stub.StartRound(pb.StartRoundRequest(timeout_seconds=600, force=True), timeout=30)
    env.round = opened.round
    valid = env.valid_cts()
    cases: list[tuple[str, S, Callable[[], object]]] = []

    def case(name: str, code: S, call: Callable[[], object]) -> None:
        cases.append((name, code, call))

    def sub(messages: list[pb.SubmitRequest], ch: grpc.Channel = mallory) -> Callable[[], object]:
        return lambda: _submit(ch, messages)

    h = env.header
    rng = random.Random(7)
    hdr = pb.SubmitRequest
    # --- stream structure
    case("empty stream", S.INVALID_ARGUMENT, sub([]))
    case("chunk before header", S.INVALID_ARGUMENT, sub(list(_chunks(valid))))
    case("two headers", S.INVALID_ARGUMENT, sub([hdr(header=h()), hdr(header=h()), *_chunks(valid)]))
    case("no chunks", S.INVALID_ARGUMENT, sub([hdr(header=h())]))
    case("truncated stream", S.INVALID_ARGUMENT, sub([hdr(header=h()), *_chunks(valid[:1])]))
    case(
        "chunk index skips", S.INVALID_ARGUMENT, sub([hdr(header=h()), *_chunks(valid, per=1, start_index=1)])
    )
    case(
        "chunk offset lies",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h()), hdr(chunk=pb.SubmitChunk(index=0, first_ciphertext=1, ciphertexts=valid))]),
    )
    case(
        "empty chunk",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h()), hdr(chunk=pb.SubmitChunk(index=0, first_ciphertext=0))]),
    )
    case(
        "too many ciphertexts in a chunk",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h(num_ciphertexts=NUM_CTS)), *_chunks(valid * 9, per=18)]),
    )
    case(
        "more ciphertexts than announced",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h()), *_chunks(valid + valid[:1])]),
    )
    case(
        "oversized message",
        S.RESOURCE_EXHAUSTED,
        sub(
            [
                hdr(header=h()),
                hdr(chunk=pb.SubmitChunk(index=0, first_ciphertext=0, ciphertexts=[b"x" * (5 << 20)])),
            ]
        ),
    )
    # --- header fields
    for bad_id in ["", "short", "x" * 65, "has space!", "../../etc/pw", "ünïcödé-id-00", "id\nwith-newline"]:
        case(
            f"submission id {bad_id[:12]!r}",
            S.INVALID_ARGUMENT,
            sub([hdr(header=h(submission_id=bad_id)), *_chunks(valid)]),
        )
    for i in range(20):
        values = rng.choice([NUM_VALUES + rng.randint(1, 10**6), rng.randint(1, NUM_VALUES - 1)])
        case(
            f"random size claim #{i}",
            S.INVALID_ARGUMENT,
            sub(
                [
                    hdr(header=h(num_values=values, num_ciphertexts=codec.num_ciphertexts(values))),
                    *_chunks(valid),
                ]
            ),
        )
    for i in range(10):
        case(
            f"random round #{i}",
            S.FAILED_PRECONDITION,
            sub([hdr(header=h(round=env.round + rng.randint(1, 2**40))), *_chunks(valid)]),
        )
    case("round zero", S.INVALID_ARGUMENT, sub([hdr(header=h(round=0)), *_chunks(valid)]))
    for wrong_round in [env.round + 1, env.round + 1000, 2**63]:
        case(
            f"round {wrong_round}",
            S.FAILED_PRECONDITION,
            sub([hdr(header=h(round=wrong_round)), *_chunks(valid)]),
        )
    case(
        "base round from the future",
        S.FAILED_PRECONDITION,
        sub([hdr(header=h(base_round=5)), *_chunks(valid)]),
    )
    case(
        "other layout hash",
        S.FAILED_PRECONDITION,
        sub([hdr(header=h(layout_hash="0" * 64)), *_chunks(valid)]),
    )
    case(
        "other key fingerprint",
        S.FAILED_PRECONDITION,
        sub([hdr(header=h(key_fingerprint="f" * 64)), *_chunks(valid)]),
    )
    for values, cts in [
        (NUM_VALUES - 1, NUM_CTS),
        (NUM_VALUES + 9000, NUM_CTS + 1),
        (NUM_VALUES, NUM_CTS + 1),
        (0, 0),
        (NUM_VALUES, 0),
    ]:
        case(
            f"announces {values} values in {cts} ciphertexts",
            S.INVALID_ARGUMENT,
            sub([hdr(header=h(num_values=values, num_ciphertexts=cts)), *_chunks(valid)]),
        )
    case(
        "NaN metric",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h(metrics={"loss": float("nan")})), *_chunks(valid)]),
    )
    case(
        "infinite metric",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h(metrics={"loss": float("inf")})), *_chunks(valid)]),
    )
    case(
        "bad metric name",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h(metrics={"a b<script>": 1.0})), *_chunks(valid)]),
    )
    case(
        "too many metrics",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h(metrics={f"m{i}": 1.0 for i in range(17)})), *_chunks(valid)]),
    )
    # --- ciphertext bytes
    for i in range(100):
        size = rng.choice([0, 1, 15, 16, 17, 100, 4096, 65_740, 70_000, 131_200, 139_999])
        blob = rng.randbytes(size)
        if i % 3 == 0 and size >= 16:  # a plausible SEAL header in front of random bytes
            blob = valid[0][:16] + blob[16:]
        case(
            f"random ciphertext #{i} ({size} B)",
            S.INVALID_ARGUMENT,
            sub([hdr(header=h()), *_chunks([blob, valid[1]])]),
        )
    for cut in [1, 8, 16, 17, 100, 1000, 30_000, len(valid[0]) - 1]:
        case(
            f"ciphertext truncated to {cut}",
            S.INVALID_ARGUMENT,
            sub([hdr(header=h()), *_chunks([valid[0][:cut], valid[1]])]),
        )
    for pos in [0, 1, 2, 3, 4, 5, 8, 9, 15]:
        flipped = bytearray(valid[0])
        flipped[pos] ^= 0xFF
        case(
            f"header byte {pos} flipped",
            S.INVALID_ARGUMENT,
            sub([hdr(header=h()), *_chunks([bytes(flipped), valid[1]])]),
        )
    case(
        "ciphertext of 140 kB",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h()), *_chunks([b"\0" * 140_001, valid[1]])]),
    )
    case(
        "ciphertext with other parameters",
        S.INVALID_ARGUMENT,
        sub([hdr(header=h()), *_chunks([env.other_params_ct, valid[1]])]),
    )
    other_fp = keys.fingerprint_of_file(fed.workdir / "other-keys" / keys.PUBLIC_FILE)
    case(
        "ciphertext under another key (honest about it)",
        S.FAILED_PRECONDITION,
        sub([hdr(header=h(key_fingerprint=other_fp)), *_chunks([env.other_key_ct, env.other_key_ct])]),
    )
    # --- joins
    case("join with another key", S.FAILED_PRECONDITION, lambda: _join(mallory, other_fp))
    case("join with an empty fingerprint", S.FAILED_PRECONDITION, lambda: _join(mallory, ""))
    other_layout = Layout((TensorSpec("dense.weight", (100, 151)),))
    case(
        "join with another layout",
        S.FAILED_PRECONDITION,
        lambda: _join(mallory, env.fingerprint, other_layout),
    )
    case("join with an empty layout", S.INVALID_ARGUMENT, lambda: _join(mallory, env.fingerprint, Layout(())))
    case(
        "join with a lying num_params",
        S.INVALID_ARGUMENT,
        lambda: pb_grpc.AggregationStub(mallory).Join(
            pb.JoinRequest(
                key_fingerprint=env.fingerprint,
                layout=pb.Layout(tensors=LAYOUT.to_proto().tensors, num_params=5),
            ),
            timeout=10,
        ),
    )
    # --- downloads
    case(
        "fetch the open round",
        S.FAILED_PRECONDITION,
        lambda: list(
            pb_grpc.AggregationStub(mallory).FetchAggregate(pb.FetchRequest(round=env.round), timeout=10)
        ),
    )
    case(
        "fetch a round that never was",
        S.NOT_FOUND,
        lambda: list(pb_grpc.AggregationStub(mallory).FetchAggregate(pb.FetchRequest(round=777), timeout=10)),
    )
    # --- identities and roles
    case(
        "node certificate calls Admin.GetStatus",
        S.PERMISSION_DENIED,
        lambda: pb_grpc.AdminStub(mallory).GetStatus(pb.StatusRequest(), timeout=10),
    )
    case(
        "node certificate starts a round",
        S.PERMISSION_DENIED,
        lambda: pb_grpc.AdminStub(mallory).StartRound(pb.StartRoundRequest(), timeout=10),
    )
    case(
        "node certificate closes the round",
        S.PERMISSION_DENIED,
        lambda: pb_grpc.AdminStub(mallory).CloseRound(pb.CloseRoundRequest(round=env.round), timeout=10),
    )
    case("admin certificate submits", S.PERMISSION_DENIED, sub([hdr(header=h()), *_chunks(valid)], admin))
    case("admin certificate joins", S.PERMISSION_DENIED, lambda: _join(admin, env.fingerprint))
    revoked = env.channel("revoked")
    case("revoked certificate joins", S.PERMISSION_DENIED, lambda: _join(revoked, env.fingerprint))
    case("revoked certificate submits", S.PERMISSION_DENIED, sub([hdr(header=h()), *_chunks(valid)], revoked))
    no_cert = grpc.secure_channel(
        f"127.0.0.1:{fed.port}",
        grpc.ssl_channel_credentials(root_certificates=(fed.workdir / "admin" / "ca.crt").read_bytes()),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    case("no client certificate", S.UNAVAILABLE, lambda: _join(no_cert, env.fingerprint))
    outsider = channel(
        f"127.0.0.1:{fed.port}",
        ClientTLS(
            fed.workdir / "outsider" / "outsider.crt",
            fed.workdir / "outsider" / "outsider.key",
            fed.workdir / "admin" / "ca.crt",
            "localhost",
        ),
    )
    case("certificate from another CA", S.UNAVAILABLE, lambda: _join(outsider, env.fingerprint))
    plaintext = grpc.insecure_channel(f"127.0.0.1:{fed.port}")
    case("plaintext connection to a TLS server", S.UNAVAILABLE, lambda: _join(plaintext, env.fingerprint))
    # --- the same battery from another angle: each honest node's first real upload,
    # then a different second upload (refused) and a replay of the first (same receipt).
    receipts: dict[str, pb.SubmitReceipt] = {}
    rng_np = np.random.default_rng(3)
    weights = {"node-1": 0.4, "node-2": 0.7, "node-3": 1.9}
    vectors: dict[str, np.ndarray] = {}
    sent_cts: dict[str, list[bytes]] = {}
    for name in weights:
        delta = rng_np.normal(0, 0.05, LAYOUT.num_params)
        vectors[name] = np.concatenate([leading(weights[name]), weights[name] * delta])

    failures = []
    for name, code, call in cases:
        try:
            _refused_while_the_last_unwinds(call)
        except grpc.RpcError as exc:
            if exc.code() != code:
                failures.append(f"{name}: expected {code.name}, got {exc.code().name}: {exc.details()}")
        else:
            failures.append(f"{name}: expected {code.name}, call succeeded")
    # A flood of streams from one identity: the limit refuses the excess, nobody else notices.
    flood = env.channel("mallory")
    streams = [
        pb_grpc.AggregationStub(flood).WatchRounds(pb.WatchRequest(since_round=10**6)) for _ in range(24)
    ]
    refused = 0
    for stream in streams:
        try:
            next(stream)  # a heartbeat or an event; refused streams raise at once
        except grpc.RpcError as exc:
            if exc.code() == S.RESOURCE_EXHAUSTED:
                refused += 1
            else:
                failures.append(f"flood: unexpected {exc.code().name}")
        except StopIteration:
            pass
    for stream in streams:
        stream.cancel()
    flood.close()
    assert refused >= 24 - 8, f"only {refused} of 24 concurrent streams refused"
    assert not failures, "\n".join(failures)
    assert len(cases) + 24 >= 200, len(cases)

    # The server is still up and serving.
    with env.channel("admin") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert (
        pb_grpc.AdminStub(admin).GetRound(pb.GetRoundRequest(round=env.round), timeout=10).participants == 0
    )

    # The honest round: each member submits once, retries once (same id), tries a second update.
    for name, vector in vectors.items():
        sent_cts[name] = env.valid_cts(vector)
        first = env.header(submission_id=f"{name}-round-{env.round}", metrics={"loss": 0.5})
        receipts[name] = _submit(honest[name], [hdr(header=first), *_chunks(sent_cts[name])])
        assert not receipts[name].duplicate
        again = _submit(honest[name], [hdr(header=first), *_chunks(sent_cts[name])])
        assert again.duplicate and again.receipt == receipts[name].receipt
        with pytest.raises(grpc.RpcError) as err:
            _submit(honest[name], [hdr(header=env.header()), *_chunks(sent_cts[name])])
        assert err.value.code() == S.ALREADY_EXISTS
    # Nobody was watching when the round opened, so the operator closes it.
    info = admin_stub.CloseRound(pb.CloseRoundRequest(round=env.round), timeout=30)
    assert info.state == pb.ROUND_SUM_READY, info.reason
    assert info.participants == 3
    assert sorted(s.node_name for s in info.submissions) == sorted(weights)
    blobs = [
        blob
        for chunk in pb_grpc.AggregationStub(honest["node-1"]).FetchAggregate(
            pb.FetchRequest(round=env.round), timeout=30
        )
        for blob in chunk.ciphertexts
    ]
    summed = np.concatenate([env.secret.decrypt(b) for b in blobs])[:NUM_VALUES]
    expected = sum(vectors.values())
    assert np.abs(summed - expected).max() < 1e-7
    with pytest.raises(grpc.RpcError) as err:
        list(
            pb_grpc.AggregationStub(mallory).FetchAggregate(
                pb.FetchRequest(round=env.round, first_ciphertext=99), timeout=10
            )
        )
    assert err.value.code() == S.OUT_OF_RANGE

    # Nothing individual is left: no file or log of the server holds a member's ciphertext
    # or a run of its plaintext values, now that the round is over.
    needles = []
    for name in weights:
        for blob in sent_cts[name]:
            needles += [blob[1000:1064], blob[40_000:40_064]]
        needles.append(vectors[name][200:204].tobytes())
    haystacks = [p for p in (fed.workdir / "server-state").rglob("*") if p.is_file()]
    haystacks += [fed.workdir / "server.log", fed.workdir / "audit.jsonl"]
    for path in haystacks:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{path} holds an individual member's data"

    # The audit trail names who did what.
    audit = [json.loads(line) for line in (fed.workdir / "audit.jsonl").read_text().splitlines()]
    actions = {(a["action"], a["actor"]) for a in audit}
    assert ("round opened", "operator") in actions
    assert ("round closed", "operator") in actions
    for name in weights:
        assert ("submission accepted", name) in actions and ("join", name) in actions
    refusals = [a for a in audit if a["action"] == "submission refused" and a["actor"] == "mallory"]
    assert len(refusals) >= 100 and all(a["reason"] for a in refusals)
    assert any(a["action"] == "join refused" and a["actor"] == "mallory" for a in audit)
    for ch in [*honest.values(), mallory, admin, revoked, no_cert, outsider, plaintext]:
        ch.close()


def test_node_cannot_speak_for_another(env: Env) -> None:
    """The name in a request is ignored under mutual TLS: the certificate decides."""
    with env.channel("mallory") as ch:
        reply = pb_grpc.AggregationStub(ch).Join(
            pb.JoinRequest(key_fingerprint=env.fingerprint, layout=LAYOUT.to_proto(), node_name="node-1"),
            timeout=10,
        )
    assert reply.node_name == "mallory"


def test_unsafe_paths_stay_inside_state_dir(env: Env) -> None:
    state = env.fed.workdir / "server-state"
    for path in state.rglob("*"):
        assert Path(os.path.realpath(path)).is_relative_to(os.path.realpath(state))


def _peak_rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmHWM:"))) * 1024


def _layout_msg(tensors: list[tuple[str, list[int]]], base: str = "") -> pb.Layout:
    total = 1
    for _, shape in tensors:
        size = 1
        for d in shape:
            size *= max(d, 0)
        total += size
    return pb.Layout(
        tensors=[pb.TensorSpec(name=n, shape=s) for n, s in tensors],
        num_params=total - 1,
        base_model_hash=base,
    )


def test_bogus_layouts_are_refused_without_allocating(env: Env) -> None:
    """Issue 10, item 4: a layout is bounded wherever it enters (SetLayout, Join), and the
    pinned one does not move: 2^38 values, a 3.9 MB layout and odd names are refused
    with INVALID_ARGUMENT naming the tensor and the rule, before anything is sized from them."""
    server_pid = env.fed.procs["server"].pid
    before = _peak_rss(server_pid)
    huge = _layout_msg([("dense.weight", [2**19, 2**19])])  # 2^38 values
    big = _layout_msg([(f"t{i:06d}" + "x" * 183, [1]) for i in range(19_500)])  # 3.9 MB
    assert 3_800_000 < big.ByteSize() < 4_000_000
    cases = [
        (huge, "'dense.weight': brings the layout past 2147483648 values"),
        (big, "more than 10000 tensors"),
        (_layout_msg([("dense weight", [2])]), "'dense weight': a name must be 1-200 characters"),
        (_layout_msg([("a\nb", [2])]), "a name must be"),
        (_layout_msg([("w" * 201, [2])]), "a name must be 1-200 characters"),
        (_layout_msg([("w", [0])]), "'w': dimension 0 must be an integer from 1"),
        (_layout_msg([("w", [-5])]), "dimension -5 must be"),
        (_layout_msg([("w", [1] * 9)]), "'w': has 9 dimensions"),
        (_layout_msg([("w", [2]), ("w", [2])]), "appears twice"),
        (_layout_msg([("w", [2])], base="not-a-hash"), "base_model_hash must be empty or 64"),
        (
            pb.Layout(
                tensors=[pb.TensorSpec(name="w", shape=[2])], num_params=2, initial_model_hash="x" * 65
            ),
            "initial_model_hash must be empty or 64",
        ),
        (pb.Layout(tensors=[pb.TensorSpec(name="w", shape=[2])], num_params=2**38), "is not the sum"),
    ]
    with env.channel("mallory") as mallory, env.channel("admin") as admin:
        for layout, message in cases:
            join = pb.JoinRequest(key_fingerprint=env.fingerprint, layout=layout)
            pin = pb.SetLayoutRequest(layout=layout, replace=True)
            for method, request in (
                (pb_grpc.AggregationStub(mallory).Join, join),
                (pb_grpc.AdminStub(admin).SetLayout, pin),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    method(request, timeout=30)
                assert err.value.code() == S.INVALID_ARGUMENT, (message, err.value.details())
                assert message in (err.value.details() or ""), (message, err.value.details())
        # A member cannot pin or reset the layout at all.
        for admin_call in (
            lambda: pb_grpc.AdminStub(mallory).SetLayout(pb.SetLayoutRequest(layout=huge), timeout=10),
            lambda: pb_grpc.AdminStub(mallory).ResetLayout(pb.ResetLayoutRequest(), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as err:
                admin_call()
            assert err.value.code() == S.PERMISSION_DENIED
        status = pb_grpc.AdminStub(admin).GetStatus(pb.StatusRequest(), timeout=10)
        assert status.layout_hash == LAYOUT.hash and status.settings.layout_hash == LAYOUT.hash
        # Nothing was sized from the claims: the server grew by far less than one "2^38" vector.
        assert _peak_rss(server_pid) - before < 150 * 1024 * 1024
        # The honest members still join with the pinned layout.
        with env.channel("node-1") as honest:
            assert _join(honest, env.fingerprint).settings.layout_hash == LAYOUT.hash
    audit = [json.loads(line) for line in (env.fed.workdir / "audit.jsonl").read_text().splitlines()]
    assert any(
        a["action"] == "join refused" and a["actor"] == "mallory" and "2147483648" in a["reason"]
        for a in audit
    )
    assert any(a["action"] == "layout pin refused" and a["actor"] == "operator" for a in audit)
