"""Tools for the fault-injection tests: a TCP proxy that can cut connections, and the check
that every node ends with a plaintext FedAvg over exactly the acknowledged contributions."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cipherhive.demo.federation import LocalFederation


@dataclass
class TcpProxy:
    """Forwards 127.0.0.1:port to a target; :meth:`cut` drops every open connection."""

    target_port: int
    port: int = 0
    _listener: socket.socket = field(init=False)
    _conns: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    cuts: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        """Reset every connection in flight, as a network failure would."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass
        if conns:
            self.cuts += 1
        return len(conns)

    def close(self) -> None:
        self._listener.close()
        self.cut()


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
        last = max(acknowledged(fed.workdir), default=0)
        rounds = []
        for i in range(fed.nodes):
            path = fed.workdir / f"{fed.node_name(i)}-state" / "checkpoint.pt"
            rounds.append(torch.load(path, weights_only=True)["round"] if path.exists() else 0)
        return all(r == last for r in rounds)

    fed.wait_for(caught_up, 120, "every node to apply the last sum")


def acknowledged(workdir: Path) -> dict[int, list[str]]:
    """Rounds with a published sum -> the nodes whose submissions the server acknowledged."""
    db = sqlite3.connect(workdir / "server-state" / "state.db")
    try:
        rounds = [
            r for (r,) in db.execute("SELECT round FROM rounds WHERE state = 'sum_ready' ORDER BY round")
        ]
        return {
            r: [n for (n,) in db.execute("SELECT node FROM submissions WHERE round = ? ORDER BY node", (r,))]
            for r in rounds
        }
    finally:
        db.close()


def check_fedavg(fed: LocalFederation) -> dict[str, int]:
    """Every published round applied Σ nᵢΔᵢ / Σ nᵢ over exactly its acknowledged nodes, and
    every node ends with the same model. Returns counts for the closing report."""
    records = fed.workdir / "records"
    acked = acknowledged(fed.workdir)
    assert acked, "no round was published"
    double_counts = 0
    for number, nodes in acked.items():
        folder = records / f"round-{number}"
        updates = {
            n: torch.load(folder / f"shard-{int(n.split('-')[1]) - 1}.update.pt", weights_only=True)
            for n in nodes
        }
        total = sum(int(u["samples"]) for u in updates.values())
        plain = sum(int(u["samples"]) * (u["local"] - u["global"]) for u in updates.values()) / total
        applied = [torch.load(p, weights_only=True) for p in sorted(folder.glob("shard-*.applied.pt"))]
        assert applied, f"no node applied round {number}"
        for record in applied:
            error = float((record["mean"] - plain).abs().max())
            if error > 1e-6:
                double_counts += 1
            assert error < 1e-6, f"round {number}: applied mean differs from FedAvg over {nodes} by {error}"
            assert int(record["participants"]) == len(nodes)
    last = max(acked)
    finals = [
        torch.load(fed.workdir / f"{fed.node_name(i)}-state" / "checkpoint.pt", weights_only=True)
        for i in range(fed.nodes)
    ]
    for final in finals:
        assert final["round"] == last, f"a node stopped at round {final['round']}, not {last}"
        for key, tensor in finals[0]["tensors"].items():
            assert torch.equal(tensor, final["tensors"][key]), "nodes hold different models"
    return {
        "rounds_published": len(acked),
        "acknowledged_submissions": sum(len(v) for v in acked.values()),
        "double_counts": double_counts,
    }
