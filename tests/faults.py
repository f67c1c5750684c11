"""Tools for the fault-injection tests: the check that every node ends with a plaintext FedAvg
over exactly the acknowledged contributions (the network faults are in :mod:`tests.proxy`)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import torch

from cipherhive.demo.federation import LocalFederation


def settle(fed: LocalFederation) -> None:
    """End a run cleanly: restart the server with rounds no longer opening by themselves,
    close the open round if any, let every node catch up with the last sum, then stop all."""
    import grpc

    from cipherhive.v1 import federation_pb2 as pb
    from cipherhive.v1 import federation_pb2_grpc as pb_grpc

    fed.stop("server")
    fed.start_server(env={"CIPHERHIVE_ROUNDS_AUTO_START": "false"})
    fed.wait_serving()
    with fed.admin_channel() as ch:
        admin = pb_grpc.AdminStub(ch)
        for info in admin.ListRounds(pb.ListRoundsRequest(), timeout=10).rounds:
            if info.state == pb.ROUND_OPEN:
                with contextlib.suppress(grpc.RpcError):  # closed by its deadline meanwhile
                    admin.CloseRound(pb.CloseRoundRequest(round=info.round), timeout=60)

    def caught_up() -> bool:
        last = max(acknowledged(fed), default=0)
        rounds = []
        for i in range(fed.nodes):
            path = fed.workdir / f"{fed.node_name(i)}-state" / "checkpoint.pt"
            rounds.append(torch.load(path, weights_only=True)["round"] if path.exists() else 0)
        return all(r == last for r in rounds)

    fed.wait_for(caught_up, 120, "every node to apply the last sum")


def acknowledged(fed: LocalFederation) -> dict[int, list[str]]:
    """Rounds with a published sum -> the nodes whose submissions the server acknowledged, read
    from the server's round state: its SQLite file, or the PostgreSQL database its [state]
    section names (with the password from its ``password_file``)."""
    database = fed.state_settings.get("database")
    if database:
        import psycopg

        secret = fed.state_settings.get("password_file")
        password = Path(secret).read_text(encoding="utf-8").strip() if secret else None
        with psycopg.connect(database, password=password) as pg:
            rows = pg.execute(
                "SELECT r.round, s.node FROM rounds r LEFT JOIN submissions s ON s.round = r.round "
                "WHERE r.state = 'sum_ready' ORDER BY r.round, s.node"
            ).fetchall()
    else:
        db = sqlite3.connect(fed.workdir / "server-state" / "state.db")
        try:
            rows = db.execute(
                "SELECT r.round, s.node FROM rounds r LEFT JOIN submissions s ON s.round = r.round "
                "WHERE r.state = 'sum_ready' ORDER BY r.round, s.node"
            ).fetchall()
        finally:
            db.close()
    rounds: dict[int, list[str]] = {}
    for number, node in rows:
        rounds.setdefault(int(number), [])
        if node is not None:
            rounds[int(number)].append(str(node))
    return rounds


def check_fedavg(fed: LocalFederation) -> dict[str, int]:
    """Every published round applied Σ nᵢΔᵢ / Σ nᵢ over exactly its acknowledged nodes, and
    every node ends with the same model. Every discrepancy is collected and reported in one
    assertion; returns counts for the closing report."""
    records = fed.workdir / "records"
    acked = acknowledged(fed)
    assert acked, "no round was published"
    problems: list[str] = []
    for number, nodes in acked.items():
        folder = records / f"round-{number}"
        updates = {
            n: torch.load(folder / f"shard-{int(n.split('-')[1]) - 1}.update.pt", weights_only=True)
            for n in nodes
        }
        total = sum(int(u["samples"]) for u in updates.values())
        plain = sum(int(u["samples"]) * (u["local"] - u["global"]) for u in updates.values()) / total
        applied = sorted(folder.glob("shard-*.applied.pt"))
        if not applied:
            problems.append(f"round {number}: no node applied it")
        for path in applied:
            record = torch.load(path, weights_only=True)
            error = float((record["mean"] - plain).abs().max())
            if error > 1e-6:
                problems.append(
                    f"round {number}: {path.name} differs from FedAvg over {nodes} by {error:.3g}"
                )
            if int(record["participants"]) != len(nodes):
                problems.append(
                    f"round {number}: {path.name} counted {int(record['participants'])} participants, "
                    f"the server acknowledged {len(nodes)}"
                )
    last = max(acked)
    finals = [
        torch.load(fed.workdir / f"{fed.node_name(i)}-state" / "checkpoint.pt", weights_only=True)
        for i in range(fed.nodes)
    ]
    for i, final in enumerate(finals):
        if final["round"] != last:
            problems.append(f"{fed.node_name(i)} stopped at round {final['round']}, not {last}")
        elif any(not torch.equal(t, final["tensors"][k]) for k, t in finals[0]["tensors"].items()):
            problems.append(f"{fed.node_name(i)} holds a different model from {fed.node_name(0)}")
    assert not problems, "FedAvg check failed:\n" + "\n".join(problems)
    return {
        "rounds_published": len(acked),
        "acknowledged_submissions": sum(len(v) for v in acked.values()),
    }
