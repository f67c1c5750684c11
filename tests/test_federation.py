"""Integration: a real server and three real node processes on loopback, mutual TLS.

Checks the product's central promise: after each round every node holds the
same model, equal to a plaintext FedAvg over exactly the submitted updates,
while the server process only ever held the public context.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tenseal as ts
import torch

from cipherhive.ckks import keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import EVAL_METRICS
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def _records(workdir: Path, number: int, kind: str) -> list[dict[str, torch.Tensor]]:
    folder = workdir / "records" / f"round-{number}"
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob(f"shard-*.{kind}.pt"))]


def _checkpoint(workdir: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = torch.load(workdir / f"{name}-state" / "checkpoint.pt", weights_only=True)
    return data


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("federation")
    fed = LocalFederation(
        workdir,
        nodes=3,
        node_options={"epochs": 1, "record_dir": str(workdir / "records")},
        rounds={"max_rounds": 2},
    )
    fed.setup()
    fed.start()
    try:
        fed.wait_for(
            lambda: sum(r.state == pb.ROUND_SUM_READY for r in fed.list_rounds()) >= 2, 180, "two rounds"
        )
        fed.wait_for(lambda: len(_records(workdir, 2, "applied")) == 3, 60, "nodes to apply round 2")
        yield fed
    finally:
        codes = fed.stop_all()
        assert all(c in (0, None) for c in codes.values()), (codes, fed.log("server"))


def test_nodes_match_plaintext_fedavg(federation: LocalFederation) -> None:
    """Each round's applied average equals Σ nᵢΔᵢ / Σ nᵢ computed in the clear."""
    workdir = federation.workdir
    for number in (1, 2):
        updates = _records(workdir, number, "update")
        applied = _records(workdir, number, "applied")
        assert len(updates) == 3 and len(applied) == 3
        base = updates[0]["global"]
        assert all(torch.equal(u["global"], base) for u in updates), "nodes trained from different bases"
        total = sum(int(u["samples"]) for u in updates)
        plain = sum(int(u["samples"]) * (u["local"] - u["global"]) for u in updates) / total
        for record in applied:
            assert float((record["mean"] - plain).abs().max()) < 1e-6
            assert int(record["participants"]) == 3
            expected = (base + plain).float().double()
            assert float((record["global"] - expected).abs().max()) < 1e-6
    # The final checkpoints are bit-identical across nodes.
    checkpoints = [_checkpoint(workdir, federation.node_name(i)) for i in range(3)]
    assert {c["round"] for c in checkpoints} == {2}
    first = checkpoints[0]["tensors"]
    for other in checkpoints[1:]:
        assert all(torch.equal(first[k], other["tensors"][k]) for k in first)  # type: ignore[index]


def test_rounds_are_recorded_without_metrics(federation: LocalFederation) -> None:
    rounds = [r for r in federation.list_rounds() if r.state == pb.ROUND_SUM_READY]
    assert [r.round for r in rounds][:2] == [1, 2]
    assert rounds[0].base_round == 0 and rounds[1].base_round == 1
    for info in rounds[:2]:
        assert info.participants == 3
        assert sorted(s.node_name for s in info.submissions) == ["node-1", "node-2", "node-3"]
        for sub in info.submissions:
            # By default nodes send no plaintext metrics: rounded accuracies reveal sample counts.
            assert dict(sub.metrics) == {}
    # Nodes still show their metrics locally.
    assert "accuracy" in federation.log("node-1")


def _applied_lines(log: str) -> dict[int, dict[str, str]]:
    """Fields of every "applied round sum" line of a node's log, by round."""
    out: dict[int, dict[str, str]] = {}
    for line in log.splitlines():
        if "applied round sum" in line and "[" in line:
            fields = dict(re.findall(r"(\w+)=(\S+?)(?=\s\w+=|\]$)", line[line.index("[") :].strip()))
            out[int(fields["round"])] = fields
    return out


def _plaintext_evaluations(workdir: Path, shards: int) -> dict[int, tuple[int, dict[str, float]]]:
    """Σn and Σn·metric/Σn per evaluated model, from the trainers' own full-precision records."""
    by_base: dict[int, list[dict[str, float]]] = {}
    for shard in range(shards):
        path = workdir / "records" / f"shard-{shard}.evaluations.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            by_base.setdefault(int(record["base_round"]), []).append(record)
    out = {}
    for base, records in by_base.items():
        assert len(records) == shards, f"model of round {base} evaluated {len(records)} times"
        total = sum(int(r["examples"]) for r in records)
        out[base] = (total, {m: sum(r["examples"] * r[m] for r in records) / total for m in EVAL_METRICS})
    return out


def _same_to_4_digits(shown: float, exact: float) -> bool:
    """``shown`` is ``exact`` rounded to 4 significant digits (either way at a rounding boundary)."""
    if float(f"{exact:.4g}") == shown:
        return True
    step = 10 ** (math.floor(math.log10(abs(exact))) - 3) if exact else 0.0
    return abs(shown - exact) <= 0.5 * step + 1e-9


def test_federated_evaluation_matches_the_plaintext_weighted_mean(federation: LocalFederation) -> None:
    """Every node logs the same federated evaluation of each round's base model, equal (to 4
    significant digits) to Σ n·metric / Σ n over the members' own evaluations."""
    plain = _plaintext_evaluations(federation.workdir, 3)
    logs = [_applied_lines(federation.log(federation.node_name(i))) for i in range(3)]
    for number in (1, 2):
        shown = [log[number] for log in logs]
        keys_shown = ("eval_examples", "eval_loss", "eval_accuracy", "eval_of_round")
        assert all(s.keys() >= set(keys_shown) for s in shown), shown
        assert len({tuple(s[k] for k in keys_shown) for s in shown}) == 1, "nodes disagree"
        base = int(shown[0]["eval_of_round"])
        assert base == number - 1  # round r's sum carries the validation of round r - 1's model
        total, means = plain[base]
        assert int(shown[0]["eval_examples"]) == total == 450  # the digits demo's whole test set
        for name, exact in means.items():
            assert _same_to_4_digits(float(shown[0][f"eval_{name}"]), exact), (name, shown[0], exact)
            assert len(shown[0][f"eval_{name}"].lstrip("0.").replace(".", "")) <= 4, "not rounded"
    # The after_round hook gets the same (rounded) figures.
    applied = _records(federation.workdir, 2, "applied")
    assert {float(f"{v:.4g}") for v in applied[0]["federated_eval"].values()} == set(
        applied[0]["federated_eval"].values()
    )
    assert all(r["federated_eval"] == applied[0]["federated_eval"] for r in applied)


def test_the_server_holds_none_of_the_federated_evaluation(federation: LocalFederation) -> None:
    """The server's log, its database and what ctl sees hold no evaluation figure nor its names."""
    figures: set[str] = set()
    for fields in _applied_lines(federation.log("node-1")).values():
        figures |= {fields["eval_loss"], fields["eval_accuracy"]}
    for shard in range(3):
        path = federation.workdir / "records" / f"shard-{shard}.evaluations.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():  # each member's own figures too
            record = json.loads(line)
            figures |= {f"{record[m]:.4g}" for m in EVAL_METRICS}
    # Figures of 4 significant digits only: "1" or "0.5" are in any log for other reasons.
    figures = {f for f in figures if len(f.replace(".", "").lstrip("0")) == 4}
    assert len(figures) >= 4
    with sqlite3.connect(federation.workdir / "server-state" / "state.db") as db:
        database = "\n".join(db.iterdump())
    ctl = "\n".join(str(info) for info in federation.list_rounds())
    for where, text in (("server log", federation.log("server")), ("database", database), ("ctl", ctl)):
        assert text, where
        assert not re.search(r"\beval_|federated.eval|evaluat", text, re.I), where
        for figure in figures:
            assert not re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", text), (where, figure)


def _memory_contains(pid: int, needle: bytes) -> bool:
    """Scan a live process's readable memory for ``needle`` (we run as its owner)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addresses, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in addresses.split("-"))
            if end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if needle in chunk:
                found = True
                break
    return found


def test_server_memory_never_holds_the_secret_key(federation: LocalFederation) -> None:
    """The secret key's coefficients are in a node's memory and nowhere in the server's.

    The node half is the positive control: it shows the scan finds the key
    where it is, so the server half is a real check, not one that cannot fail.
    """
    secret = ts.context_from((federation.workdir / "keys" / keys.SECRET_FILE).read_bytes())
    poly = secret.secret_key().data.data()
    needle = b"".join(int(poly[i]).to_bytes(8, "little") for i in range(100, 108))
    node = federation.procs["node-1"]
    server = federation.procs["server"]
    assert node.poll() is None and server.poll() is None
    assert _memory_contains(node.pid, needle), "control failed: the scan does not find the key in a node"
    assert not _memory_contains(server.pid, needle), "the server process holds the secret key"


def test_node_certificate_cannot_fetch_a_failed_or_missing_round(federation: LocalFederation) -> None:
    d = federation.workdir / "node-1"
    tls = ClientTLS(d / "node-1.crt", d / "node-1.key", d / "ca.crt", "localhost")
    with channel(f"127.0.0.1:{federation.port}", tls) as ch:
        stub = pb_grpc.AggregationStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchAggregate(pb.FetchRequest(round=99), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.AdminStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_server_refuses_a_secret_context(tmp_path: Path) -> None:
    files = keys.keygen(tmp_path / "keys")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cipherhive",
            "server",
            "--insecure",
            "--public-context",
            str(files.secret),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "SECRET key" in result.stderr and "public.ctx" in result.stderr
    assert not (tmp_path / "state").exists(), "the server created state before refusing"
