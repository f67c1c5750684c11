"""Masked rounds against real processes: what the operator and colluding members see.

A real server and real node processes on loopback with mutual TLS; where the
attack needs a colluding member, the test plays that member itself
(:mod:`tests.member`): it holds the federation's secret context, reads the
server's spool and database as its operator could, and stops at the step it
chooses. Each test fails on a server that does not mask, or on a node that
skips a check.
Spec: docs/spec/masked-round.md.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cipherhive.ckks import codec, seal_format
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import LEADING_VALUES, Layout
from cipherhive.node.state.checkpoint import REJECTED
from cipherhive.secagg import masking
from cipherhive.server.ingest.running_sum import MaskedSum
from cipherhive.server.storage.spool import encode_records, read_records
from cipherhive.v1 import federation_pb2 as pb
from tests.faults import check_fedavg
from tests.federations import admin, wait_online
from tests.member import Member, released_seeds, spooled

pytestmark = pytest.mark.slow

WEIGHT_UNIT = 1000.0


def _federation(workdir: Path, nodes: int, **rounds: object) -> LocalFederation:
    fed = LocalFederation(
        workdir,
        nodes=nodes,
        node_options={"epochs": 1, "record_dir": str(workdir / "records")},
        rounds={"auto_start": False, "timeout_seconds": 60.0, "enrol_seconds": 20.0, **rounds},
    )
    fed.setup()
    return fed


def _wait_applied(fed: LocalFederation, number: int, nodes: int) -> None:
    fed.wait_for(
        lambda: len(list((fed.workdir / "records" / f"round-{number}").glob("*.applied.pt"))) == nodes,
        60,
        f"every node to apply round {number}",
    )


def _start_round(fed: LocalFederation) -> int:
    return int(admin(fed).StartRound(pb.StartRoundRequest(), timeout=30).round)


def _layout(fed: LocalFederation) -> Layout:
    return Layout.read_file(fed.layout_file)


def _update(fed: LocalFederation, number: int, shard: int) -> tuple[np.ndarray, float]:
    """A real node's update of a round and its FedAvg weight (from the demo trainer's records)."""
    record = torch.load(
        fed.workdir / "records" / f"round-{number}" / f"shard-{shard}.update.pt", weights_only=True
    )
    return (record["local"] - record["global"]).numpy(), int(record["samples"]) / WEIGHT_UNIT


def _noise(decrypted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(median magnitude, |correlation with the truth|) of a decryption."""
    corr = float(np.corrcoef(decrypted, truth)[0, 1])
    return float(np.median(np.abs(decrypted))), abs(corr)


def _log_has(fed: LocalFederation, key: str, pattern: str) -> bool:
    return re.search(pattern, fed.log(key)) is not None


def _carries_on_after_rejecting(fed: LocalFederation, name: str, number: int) -> None:
    """After rejecting round ``number``'s sum, the node's last step is to record that nothing is
    left to report (it did not take part in the round: only participants report on a sum,
    docs/spec/sum-checks.md §4); then it keeps following the federation: still running, sending
    no report the server would refuse, it stops cleanly (exit 0) when asked."""
    fed.wait_for(lambda: _rejection_settled(fed, name, number), 60, f"{name} to finish with the rejection")
    assert "could not report" not in fed.log(name)
    assert fed.procs[name].poll() is None, f"{name} exited:\n{fed.log(name)[-2000:]}"
    assert fed.stop(name) == 0, f"{name} did not stop cleanly:\n{fed.log(name)[-2000:]}"


def _rejection_settled(fed: LocalFederation, name: str, number: int) -> bool:
    path = fed.workdir / f"{name}-state" / REJECTED
    try:
        record = json.loads(path.read_text()).get(str(number), {})
    except (OSError, ValueError):
        return False
    return bool(record.get("reported"))


# --------------------------------------------------------------------------- one round, five members


def test_spooled_uploads_are_noise_and_the_sum_is_exact(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """The operator holding the whole spool, colluding with one member (its secret.ctx and its own
    masks), decrypts every other member's upload to noise; the round's sum is FedAvg within 1e-7."""
    fed = _federation(tmp_path, nodes=5)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    for i in range(4):
        fed.start_node(i)
    layout = _layout(fed)
    colluder = Member(fed, "node-5", layout, [fed.node_name(i) for i in range(5)])
    colluder.join()
    wait_online(fed, 5)
    number = _start_round(fed)

    part = colluder.enrol(colluder.wait(pb.RoundEvent.OPENED, number))
    roster = part.accept_roster(list(colluder.wait(pb.RoundEvent.ROSTER, number).roster))
    assert len(roster.members) == 5
    rng = np.random.default_rng(5)
    own_update, own_weight = rng.normal(0, 0.01, layout.num_params), 0.25
    colluder.upload(part, colluder.vector(own_update, own_weight), number, 0)
    colluder.commit(part, number)
    commits = colluder.wait(pb.RoundEvent.COMMITS, number)
    fed.wait_for(lambda: len(released_seeds(fed.workdir, number)) == 4, 60, "the honest members' releases")
    spool = spooled(fed.workdir, number)  # the operator's copy, before the round ends
    assert sorted(spool) == [fed.node_name(i) for i in range(5)]
    colluder.release(part, commits)

    assert fed.wait_round(number, 60).state == pb.ROUND_SUM_READY
    fed.wait_for(
        lambda: len(list((fed.workdir / "records" / f"round-{number}").glob("*.applied.pt"))) == 4,
        60,
        "every node to apply the sum",
    )
    assert spooled(fed.workdir, number) == {}, "individual uploads must be deleted when the round ends"

    # Every honest member's upload, decrypted with the shared key: magnitude of the modulus, no signal.
    truths: list[tuple[np.ndarray, float]] = []
    for shard in range(4):
        update, weight = _update(fed, number, shard)
        truths.append((update, weight))
        blob = spool[fed.node_name(shard)][0]
        decrypted = colluder.codec.decrypt(blob)[: layout.num_values]
        magnitude, corr = _noise(decrypted[LEADING_VALUES:], weight * update)
        assert magnitude > 1e4, f"upload of {fed.node_name(shard)} decrypts to values of {magnitude:.3g}"
        assert corr < 0.1, f"upload of {fed.node_name(shard)} correlates {corr:.3f} with its update"
        # The control: an unmasked encryption of the same vector decrypts to it.
        plain = colluder.codec.decrypt(colluder.codec.encrypt(colluder.vector(update, weight)[:8192]))
        assert np.abs(plain[LEADING_VALUES:100] - weight * update[: 100 - LEADING_VALUES]).max() < 1e-6

    total = colluder.checked_sum(number)
    weights = [w for _, w in truths] + [own_weight]
    assert abs(total[0] - sum(weights)) < 1e-6
    assert abs(total[1] - 5) < 1e-6, "the check slot holds the roster size"
    fedavg = (sum(w * u for u, w in truths) + own_weight * own_update) / sum(weights)
    assert np.abs(total[LEADING_VALUES:] / total[0] - fedavg).max() < 1e-7
    info = admin(fed).GetRound(pb.GetRoundRequest(round=number), timeout=10)
    assert info.participants == 5 and info.phase == "done"
    colluder.close()


# --------------------------------------------------------------------------- a forced failure


def test_a_withholding_member_leaves_noise_and_releasers_refuse_the_base(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """Round 1: the colluder enrols and withholds its upload: the round fails before any release
    and the partial sum, with every mask the colluder knows removed, is noise. Round 2: members
    re-enrol with fresh keys; the colluder uploads and commits but withholds its seed after the
    others released. Round 3, on the same base: the members that released refuse it."""
    fed = _federation(tmp_path, nodes=4, timeout_seconds=15.0, enrol_seconds=5.0)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    layout = _layout(fed)
    colluder = Member(fed, "node-4", layout, [fed.node_name(i) for i in range(4)])
    colluder.join()
    wait_online(fed, 4)
    honest = [fed.node_name(i) for i in range(3)]

    # Round 1: enrol, then withhold the upload.
    first = _start_round(fed)
    part1 = colluder.enrol(colluder.wait(pb.RoundEvent.OPENED, first))
    roster1 = part1.accept_roster(list(colluder.wait(pb.RoundEvent.ROSTER, first).roster))
    fed.wait_for(lambda: len(spooled(fed.workdir, first)) == 3, 60, "the honest uploads")
    spool = spooled(fed.workdir, first)
    info = fed.wait_round(first, 60)
    assert info.state == pb.ROUND_FAILED and "node-4 did not upload" in info.reason, info.reason
    assert released_seeds(fed.workdir, first) == {}, (
        "no self-mask may be released in a round that failed early"
    )
    # The partial sum the server held, plus the colluder's own pairwise masks (a zero update masked
    # for this roster, its self-mask removed again): every pairwise mask cancels, the honest
    # members' self-masks stay on.
    public = codec.PublicCodec((fed.workdir / "keys" / "public.ctx").read_bytes())
    plan = part1.mask_plan(colluder.codec.modulus)
    own = colluder.codec.encrypt_masked(np.zeros(colluder.codec.values_per_block), 0, plan)
    blocks = [spool[name][0] for name in honest] + [own]
    partial = MaskedSum(public.upload_parser(), 1)
    for blob in blocks:
        partial.add(0, partial.load(blob))
    partial.remove_self_masks([plan.self_seed])
    [record] = partial.serialized()
    seeds = [masking.upload_seed(blob) for blob in blocks]
    decrypted = colluder.codec.decrypt_c0_sum(record, seeds)[: layout.num_values]
    truth = sum(w * u for u, w in (_update(fed, first, s) for s in range(3)))
    magnitude, corr = _noise(decrypted[LEADING_VALUES:], truth)
    assert magnitude > 1e4 and corr < 0.1, (magnitude, corr)
    # The round's record names the member and the step it missed, and the server leaves it out of
    # the next rosters; the operator (colluding here) lets it back in at once.
    assert info.failed_step == "upload" and list(info.culprits) == ["node-4"], info
    operator = admin(fed)
    [named] = [n for n in operator.ListNodes(pb.ListNodesRequest(), timeout=10).nodes if n.name == "node-4"]
    assert named.offences == 1 and named.excluded_until_round > first and named.last_offence_step == "upload"
    operator.ReadmitNode(pb.ReadmitNodeRequest(name="node-4"), timeout=10)

    # Round 2: fresh keys; the colluder withholds its seed once the others released theirs.
    second = _start_round(fed)
    part2 = colluder.enrol(colluder.wait(pb.RoundEvent.OPENED, second))
    roster2 = part2.accept_roster(list(colluder.wait(pb.RoundEvent.ROSTER, second).roster))
    keys1 = {m.name: m.entry.x25519_public for m in roster1.members}
    keys2 = {m.name: m.entry.x25519_public for m in roster2.members}
    assert all(keys1[n] != keys2[n] for n in honest), "members must enrol with fresh X25519 keys"
    colluder.upload(part2, colluder.vector(np.zeros(layout.num_params), 0.1), second, 0)
    colluder.commit(part2, second)
    colluder.wait(pb.RoundEvent.COMMITS, second)
    fed.wait_for(lambda: len(released_seeds(fed.workdir, second)) == 3, 60, "the honest releases")
    info = fed.wait_round(second, 60)
    assert info.state == pb.ROUND_FAILED and "node-4 withheld the self-mask seed" in info.reason, info.reason

    # Round 3 on the same base: every member that released refuses to upload on it again.
    third = _start_round(fed)
    info = fed.wait_round(third, 60)
    assert info.state == pb.ROUND_FAILED
    for name in honest:
        assert _log_has(fed, name, r"already released a self-mask on base round 0"), fed.log(name)[-2000:]
        assert fed.procs[name].poll() is None, f"{name} exited"
    colluder.close()


# --------------------------------------------------------------------------- a chosen ciphertext


def _tamper_c1(sum_file: Path, secret: codec.SecretCodec) -> None:
    """Publish the sum as full ciphertexts whose c1 the server chose: a chosen ciphertext.

    A masked sum is Σ c0 alone and nodes rebuild c1 from the members' seeds; a server
    that wants a node to decrypt a c1 of its choosing must send full ciphertexts (the
    form sums had before), and then every block's c1 must be Σ expand(seed).
    """
    frame = seal_format.read_ciphertext(secret.encrypt(np.zeros(1)))
    blobs = []
    for index, record in enumerate(read_records(sum_file)):
        c0 = np.frombuffer(record, dtype="<u8")
        c1 = np.full_like(c0, 1 + index)  # known to the server: decryption would give c0 + s
        full = seal_format.Ciphertext(frame.header, frame.meta, 8192, 1, 2, np.concatenate([c0, c1]), b"")
        blobs.append(full.to_bytes())
    sum_file.write_bytes(b"".join(encode_records(blobs)))


def test_a_chosen_ciphertext_is_refused_before_anything_is_decrypted(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    fed = _federation(tmp_path, nodes=4, auto_start=True, max_rounds=1)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    assert fed.wait_round(1, 120).state == pb.ROUND_SUM_READY
    fed.stop("server")
    sum_file = fed.workdir / "server-state" / "sums" / "round-1.sum"
    _tamper_c1(sum_file, codec.SecretCodec((fed.workdir / "keys" / "secret.ctx").read_bytes()))
    fed.start_server()
    fed.wait_serving()
    # A fourth member catches up on round 1; it dies if it ever reaches a decryption.
    fed.start_node(3, env={"CIPHERHIVE_FAILPOINTS": "node.decrypt"})
    fed.wait_for(lambda: _log_has(fed, "node-4", r"rejected the sum of round 1"), 90, "the rejection")
    log = fed.log("node-4")
    assert "nothing was decrypted" in log and "reason=seed_check" in log, log[-2000:]
    assert "failpoint node.decrypt" not in log
    _carries_on_after_rejecting(fed, "node-4", 1)


# --------------------------------------------------------------------------- rosters and split views


def _set_chain_hash(fed: LocalFederation, name: str, value: str) -> None:
    path = fed.workdir / f"{name}-state" / "checkpoint.pt"
    data = torch.load(path, weights_only=True)
    data["chain_hash"] = value
    torch.save(data, path)


def test_forged_roster_and_split_view_are_refused_by_the_members(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """A roster with a name outside a member's pinned membership, and (after a round) members
    whose chain hashes differ, as if the server had shown them different sums: no upload. The
    member that refuses says so (a signed withdrawal); the member whose history differs is left
    out of the roster by the server before any member sees it."""
    fed = _federation(tmp_path, nodes=3, timeout_seconds=20.0, enrol_seconds=5.0)
    stopper.append(fed)
    # node-1 pins a membership without node-3.
    toml = fed.workdir / "node-1.toml"
    toml.write_text(toml.read_text().replace('"node-2", "node-3"', '"node-2"'))
    fed.start()
    wait_online(fed, 3)
    first = _start_round(fed)
    info = fed.wait_round(first, 60)
    # node-1 refuses the roster and withdraws, signed, with its reason: three members and a floor
    # of three leave no room to re-form the round, so it fails at once, naming node-1.
    assert info.state == pb.ROUND_FAILED and info.failed_step == "withdraw", info
    assert "node-1 withdrew (refused the roster: 'node-3' is not in" in info.reason, info.reason
    assert _log_has(fed, "node-1", r"'node-3' is not in this node's pinned membership")

    fed.stop("node-1")
    fed.write_node_config(0)
    # The operator fixed node-1's configuration: it need not sit out the next rounds.
    admin(fed).ReadmitNode(pb.ReadmitNodeRequest(name="node-1"), timeout=10)
    fed.start_node(0)
    wait_online(fed, 3)
    second = _start_round(fed)
    assert fed.wait_round(second, 90).state == pb.ROUND_SUM_READY
    fed.wait_for(
        lambda: len(list((fed.workdir / "records" / f"round-{second}").glob("*.applied.pt"))) == 3,
        60,
        "every node to apply round 2",
    )

    # node-3 now holds another history (a split view): nobody shares a roster with it.
    fed.stop("node-3")
    _set_chain_hash(fed, "node-3", "ab" * 32)
    fed.start_node(2)
    wait_online(fed, 3)
    third = _start_round(fed)
    info = fed.wait_round(third, 60)
    assert info.state == pb.ROUND_FAILED, info.reason
    # An honest server puts only the enrolments that agree in a roster (each member would refuse
    # the others anyway: tests/test_roster.py): node-3 is left out, and two are below the floor.
    assert info.failed_step == "enrol" and "agree on the round's history" in info.reason, info
    assert _log_has(fed, "server", r"left out of the roster \[action=left out of the roster actor=node-3 ")
    assert _log_has(fed, "server", r"chain hash \(applied sums\) differs")
    assert info.participants == 0, "nothing may be uploaded in a round without a roster"


# --------------------------------------------------------------------------- server restart


def test_server_restart_mid_round_resends_the_same_upload(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """The server dies after acknowledging the second upload; after its restart every node
    finishes the round from where it was: nobody trains again, uploads are resent from disk."""
    fed = _federation(tmp_path, nodes=3, auto_start=True, max_rounds=1)
    stopper.append(fed)
    fed.start_server(env={"CIPHERHIVE_FAILPOINTS": "server.acknowledged:2"})
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    fed.wait_for(lambda: fed.procs["server"].poll() is not None, 120, "the failpoint to stop the server")
    fed.start_server()
    fed.wait_serving()
    assert fed.wait_round(1, 120).state == pb.ROUND_SUM_READY
    _wait_applied(fed, 1, 3)
    for i in range(3):
        name = fed.node_name(i)
        assert len(re.findall(r"trained \[", fed.log(name))) == 1, f"{name} trained twice:\n{fed.log(name)}"
    check_fedavg(fed)
    assert not list(fed.workdir.glob("node-*-state/upload-*.ct")), "upload files must go when the round ends"


# --------------------------------------------------------------------------- a member restarts mid-round


def test_a_member_killed_mid_round_finishes_it_after_a_restart(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """Killed right after its upload's receipt, then right after recording its self-mask release
    (before sending it), a member restarts each time and finishes the round with the same upload
    and the same seed: the round publishes, and nobody is left refusing the base on its ledger."""
    fed = _federation(tmp_path, nodes=3, auto_start=True, max_rounds=1)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    fed.start_node(0, env={"CIPHERHIVE_FAILPOINTS": "node.submitted"})
    fed.start_node(1)
    fed.start_node(2)
    fed.wait_for(lambda: fed.procs["node-1"].poll() is not None, 120, "node-1 to die after its receipt")
    fed.start_node(0, env={"CIPHERHIVE_FAILPOINTS": "node.released"})
    fed.wait_for(
        lambda: fed.procs["node-1"].poll() is not None, 120, "node-1 to die after its release record"
    )
    fed.start_node(0)
    assert fed.wait_round(1, 120).state == pb.ROUND_SUM_READY
    _wait_applied(fed, 1, 3)
    log = fed.log("node-1")
    assert log.count("resuming round after a restart with the same upload") == 2, log[-3000:]
    assert len(re.findall(r"trained \[", log)) == 1, "a restarted member must not train (or mask) again"
    check_fedavg(fed)
    assert not list(fed.workdir.glob("node-*-state/round-*.part.json")), "participation files must go"


# --------------------------------------------------------------------------- a hostile member's steps


def test_a_hostile_members_steps_are_refused_and_the_round_still_publishes(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """Enrolling with another member's keys, garbage, a commit that lies about the upload and a
    seed that is not the committed one each get their status; the honest round then completes."""
    import grpc

    from cipherhive.node.secagg.participation import Participation
    from cipherhive.secagg.commit import make_commit, self_mask_digest

    fed = _federation(tmp_path, nodes=4)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    layout = _layout(fed)
    names = [fed.node_name(i) for i in range(4)]
    member = Member(fed, "node-4", layout, names)
    member.join()
    wait_online(fed, 4)
    number = _start_round(fed)
    opened = member.wait(pb.RoundEvent.OPENED, number)

    def code(call: object, request: object) -> grpc.StatusCode:
        try:
            call(request, timeout=30)  # type: ignore[operator]
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        raise AssertionError("accepted")

    # node-1's enrolment keys, sent over node-4's TLS connection.
    stolen = Member(fed, "node-1", layout, names)
    theirs = Participation.enrol(stolen.setup, number, 0, opened.nonce, stolen.chain.value, stolen.blocks)
    enrol = pb.EnrolRequest(round=number, enrolment=theirs.enrolment.encode())
    assert code(member.stub.Enrol, enrol) == grpc.StatusCode.PERMISSION_DENIED
    garbage = pb.EnrolRequest(round=number, enrolment=b"\0" * 300)
    assert code(member.stub.Enrol, garbage) == grpc.StatusCode.INVALID_ARGUMENT
    stolen.close()

    part = member.enrol(opened)
    roster = part.accept_roster(list(member.wait(pb.RoundEvent.ROSTER, number).roster))
    member.upload(part, member.vector(np.zeros(layout.num_params), 0.2), number, 0)
    assert part.upload is not None and part.plan is not None
    lying = make_commit(
        roster=roster,
        cert_fingerprint=member.setup.tls_fingerprint,
        seeds_hash=bytes(32),
        c0_hash=part.upload.blocks_hash,
        self_mask_hash=self_mask_digest(part.plan.self_seed),
        key=member.setup.enrol_key,
    ).encode()
    assert code(member.stub.SubmitCommit, pb.CommitRequest(round=number, commit=lying)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    member.commit(part, number)
    commits = member.wait(pb.RoundEvent.COMMITS, number)
    wrong = pb.ReleaseRequest(round=number, seed=bytes(32))
    assert code(member.stub.ReleaseSeed, wrong) == grpc.StatusCode.INVALID_ARGUMENT
    member.release(part, commits)
    assert fed.wait_round(number, 60).state == pb.ROUND_SUM_READY
    for key in ("enrolment refused", "commit refused", "self-mask release refused"):
        assert key in fed.log("server"), key
    member.close()


# --------------------------------------------------------------------------- an ingest worker dies


def test_a_dead_ingest_worker_stops_the_server_loudly_and_a_restart_finishes_the_round(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """An ingest worker is killed in the middle of an upload (its part of the shared sum may be
    half-added): the server says so and exits 1; restarted, it rebuilds the round's sum from the
    acknowledged spool and the round publishes the exact FedAvg."""
    fed = _federation(tmp_path, nodes=3, auto_start=True, max_rounds=1)
    stopper.append(fed)
    # The second block a worker adds: the first upload is in, the second one is half-way.
    fed.start_server(
        env={"CIPHERHIVE_FAILPOINTS": "ingest.worker:2", "CIPHERHIVE_LIMITS_INGEST_WORKERS": "2"}
    )
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    try:
        code = fed.procs["server"].wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the failpoint did not stop the server:\n{fed.log('server')[-3000:]}")
    assert code == 1, "the server must stop with an error"
    log = fed.log("server")
    assert re.search(r"ingest worker \d \(pid \d+\) exited; stopping so that a restart rebuilds", log), log[
        -3000:
    ]
    fed.start_server(env={"CIPHERHIVE_LIMITS_INGEST_WORKERS": "2"})
    fed.wait_serving()
    assert fed.wait_round(1, 120).state == pb.ROUND_SUM_READY
    _wait_applied(fed, 1, 3)
    check_fedavg(fed)


# --------------------------------------------------------------------------- rollback from the shared sum


def test_a_refused_or_broken_masked_upload_leaves_the_shared_sum_untouched(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """With two ingest workers (19 blocks: both own some), a member's masked upload that carries a
    bad block half-way, then one that stops half-way, are refused and taken off the sum; its
    real upload then completes the round and every member applies a sum with nothing left over."""
    import grpc

    fed = LocalFederation(
        tmp_path,
        nodes=4,
        plugin="cipherhive.bench.synthetic:SyntheticTrainer",
        node_options={"params": 150_000, "record_dir": str(tmp_path / "records")},
        rounds={"auto_start": False, "timeout_seconds": 90.0, "enrol_seconds": 20.0, "weight_unit": 1000.0},
    )
    fed.setup()
    stopper.append(fed)
    fed.start_server(env={"CIPHERHIVE_LIMITS_INGEST_WORKERS": "2"})
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    layout = _layout(fed)
    member = Member(fed, "node-4", layout, [fed.node_name(i) for i in range(4)])
    assert member.blocks == 19
    member.join()
    wait_online(fed, 4)
    number = _start_round(fed)
    part = member.enrol(member.wait(pb.RoundEvent.OPENED, number))
    assert part.accept_roster(list(member.wait(pb.RoundEvent.ROSTER, number).roster)) is not None
    plan = part.mask_plan(member.codec.modulus)
    vector = member.vector(np.zeros(layout.num_params), 0.1)
    step = member.codec.values_per_block
    blobs = [member.codec.encrypt_masked(vector[i * step : (i + 1) * step], i, plan) for i in range(19)]
    assert part.roster is not None
    header = pb.SubmitHeader(
        round=number,
        base_round=0,
        key_fingerprint=member.fingerprint,
        layout_hash=layout.hash,
        num_values=layout.num_values,
        num_ciphertexts=19,
        roster_hash=part.roster.hash,
    )

    def send(submission: str, chunks: list[bytes]) -> grpc.RpcError:
        header.submission_id = submission
        requests = [pb.SubmitRequest(header=header)] + [
            pb.SubmitRequest(chunk=pb.SubmitChunk(index=i, first_ciphertext=i, ciphertexts=[blob]))
            for i, blob in enumerate(chunks)
        ]
        with pytest.raises(grpc.RpcError) as caught:
            member.stub.SubmitUpdate(iter(requests), timeout=60)
        return caught.value

    bad = bytearray(blobs[17])  # a block of the second stripe (worker 1)
    bad[-65] = 9  # the seed trailer's PRNG type: one SEAL does not know
    refused = send("bad-block-upload", [*blobs[:17], bytes(bad), blobs[18]])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "ciphertext 17" in (refused.details() or "")
    short = send("half-an-upload", blobs[:12])
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended after 12 of 19" in (
        short.details() or ""
    )
    member.upload(part, vector, number, 0)  # the real one, written to disk and sent
    member.commit(part, number)
    member.release(part, member.wait(pb.RoundEvent.COMMITS, number))
    assert fed.wait_round(number, 90).state == pb.ROUND_SUM_READY
    total = member.checked_sum(number)
    assert total[1] == pytest.approx(4.0, abs=1e-6), "the check slot counts exactly four uploads"
    assert np.abs(total).max() < 1e3, "a block of a refused upload was left in the sum"
    fed.wait_for(
        lambda: len(list((tmp_path / "records").glob(f"round-{number}-shard-*.json"))) == 3,
        90,
        "every node to apply the sum",
    )
    member.close()


def test_a_sum_with_unreduced_coefficients_is_rejected_and_the_node_keeps_running(
    tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """A compromised server publishes Σ c0 with a coefficient at q (not a value SEAL accepts):
    the catching-up member rejects the sum with its reason, applies nothing and keeps running."""
    fed = _federation(tmp_path, nodes=4, auto_start=True, max_rounds=1)
    stopper.append(fed)
    fed.start_server()
    fed.wait_serving()
    for i in range(3):
        fed.start_node(i)
    assert fed.wait_round(1, 120).state == pb.ROUND_SUM_READY
    fed.stop("server")
    sum_file = fed.workdir / "server-state" / "sums" / "round-1.sum"
    q = codec.SecretCodec((fed.workdir / "keys" / "secret.ctx").read_bytes()).modulus
    records = [bytearray(r) for r in read_records(sum_file)]
    records[0][8 * 100 : 8 * 101] = q.to_bytes(8, "little")
    sum_file.write_bytes(b"".join(encode_records(bytes(r) for r in records)))
    fed.start_server()
    fed.wait_serving()
    fed.start_node(3)
    fed.wait_for(lambda: _log_has(fed, "node-4", r"rejected the sum of round 1"), 90, "the rejection")
    log = fed.log("node-4")
    assert "coefficients SEAL refuses" in log and "reason=seed_check" in log, log[-2000:]
    assert "applied round sum" not in log
    _carries_on_after_rejecting(fed, "node-4", 1)
