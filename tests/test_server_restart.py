"""Restarting the server: the nodes hear it is restarting, come back at once and go on with the rounds.

Real server and node processes on loopback with mutual TLS. The server is stopped with SIGTERM while
an upload is in flight, which holds it in its grace period (uploads keep ``grace_seconds`` to finish,
docs/explanation/reliability.md): every node must have logged "the server is restarting" while the
server process is still running, i.e. from the status that ended its round-event stream, not from a
keepalive or a deadline. The server is then started again on the same port and state directory, and
the next round must publish with every node in it (docs/how-to/operator.md#restart-the-server).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cipherhive.demo.federation import LocalFederation, free_port
from cipherhive.node.connect import SERVER_SHUTTING_DOWN, explain
from cipherhive.pki import certs
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.server.api.guard import SHUTTING_DOWN
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc
from tests.federations import wait_online

#: Hang limits only (nothing is timed): how long each step may take on a loaded 2-core machine.
STEP_LIMIT = 60.0
#: The server's grace period: long enough that the test, not the clock, ends the held upload.
GRACE_SECONDS = 60.0
#: What a node logs once when the server tells it it is shutting down (node/connect.py).
NOTICE = "the server is restarting"
BACK = "is back after its restart"
#: What a node must not have needed to find out (docs/troubleshooting.md#the-server-is-restarting).
LATE_SIGNS = ("DEADLINE_EXCEEDED", "Deadline Exceeded", "keepalive", "connection to")


def test_the_node_knows_the_words_the_server_stops_with() -> None:
    """A wire contract between versions: the node matches the server's words exactly."""
    assert SERVER_SHUTTING_DOWN == SHUTTING_DOWN


@pytest.mark.timeout(60)
def test_a_lost_connection_says_what_it_means() -> None:
    """gRPC's own words (``DEADLINE_EXCEEDED: Deadline Exceeded``) come after what they mean."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with channel(address, None) as ch:
        stub = pb_grpc.AggregationStub(ch)
        with pytest.raises(grpc.RpcError) as waited:
            stub.Join(pb.JoinRequest(), timeout=0.5, wait_for_ready=True)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(pb.JoinRequest(), timeout=10)
    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert explain(waited.value).startswith("the server did not answer in time: it is down or unreachable")
    assert "(DEADLINE_EXCEEDED: " in explain(waited.value)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert explain(refused.value).startswith("nothing is listening at that address")


class HeldUpload:
    """A SubmitUpdate stream from a member of its own that sends nothing until released: an upload
    in flight, which the server's shutdown must wait for (and not cut) within its grace period."""

    def __init__(self, fed: LocalFederation) -> None:
        folder = fed.workdir / "holder"
        if not (folder / "holder.crt").exists():
            certs.issue(fed.workdir / "ca", "node", "holder", folder)
        tls = ClientTLS(folder / "holder.crt", folder / "holder.key", folder / "ca.crt", "localhost")
        self._channel = channel(f"127.0.0.1:{fed.port}", tls)
        self._stub = pb_grpc.AggregationStub(self._channel)
        self._release = threading.Event()
        self._call: grpc.Future | None = None

    def _silence(self) -> Iterator[pb.SubmitRequest]:
        self._release.wait()
        yield from ()

    def start(self) -> None:
        """Until the server holds this upload: a second one from the same member is refused
        while the first is in progress (server/api/limits.py), which is the proof."""
        for _ in range(50):
            self._call = self._stub.SubmitUpdate.future(self._silence())
            try:
                self._stub.SubmitUpdate(iter(()), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in progress" in (
                    exc.details() or ""
                ):
                    return
            self._call.cancel()  # the probe came first and took the member's one upload: again
        raise AssertionError("the server never held the upload")

    def release(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._release.set()
        self._channel.close()


class OpenStreams:
    """Streams an operator's tools hold open: round events, a health watch, and a reflection stream
    that waits on its client, not on the server. Each is read to its end in a thread of its own."""

    def __init__(self, fed: LocalFederation) -> None:
        self._channel = fed.admin_channel()
        self._quiet = threading.Event()
        self.calls: dict[str, Any] = {
            "WatchEvents": pb_grpc.AdminStub(self._channel).WatchEvents(pb.WatchRequest(since_round=0)),
            "health Watch": health_pb2_grpc.HealthStub(self._channel).Watch(health_pb2.HealthCheckRequest()),
            "reflection": reflection_pb2_grpc.ServerReflectionStub(self._channel).ServerReflectionInfo(
                self._one_question()
            ),
        }
        self._opened = {name: threading.Event() for name in self.calls}
        self._ended: dict[str, tuple[grpc.StatusCode, str]] = {}
        for name in self.calls:
            threading.Thread(target=self._read, args=(name,), daemon=True).start()

    def _one_question(self) -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        self._quiet.wait()

    def _read(self, name: str) -> None:
        call = self.calls[name]
        try:
            for _reply in call:
                self._opened[name].set()
            self._ended[name] = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            self._ended[name] = (exc.code(), exc.details() or "")

    def opened(self) -> bool:
        """Every stream has had its first reply: the server serves all of them."""
        return all(event.is_set() for event in self._opened.values())

    def statuses(self) -> dict[str, tuple[grpc.StatusCode, str] | None]:
        """How each ended; None for one still open after the hang limit."""
        return {name: self._wait_ended(name) for name in self.calls}

    def _wait_ended(self, name: str) -> tuple[grpc.StatusCode, str] | None:
        deadline = time.monotonic() + STEP_LIMIT
        while name not in self._ended and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._ended.get(name)

    def close(self) -> None:
        self._quiet.set()
        for call in self.calls.values():
            call.cancel()
        self._channel.close()


def _tails(fed: LocalFederation) -> str:
    keys = ["server"] + [fed.node_name(i) for i in range(fed.nodes)]
    return "\n".join(
        f"----- {key} (last 40 lines)\n" + "\n".join(fed.log(key).splitlines()[-40:]) for key in keys
    )


def _lines_after_last_start(fed: LocalFederation, key: str) -> list[str]:
    """The node's log lines since it last started (the log file is appended to)."""
    lines = fed.log(key).splitlines()
    starts = [i for i, line in enumerate(lines) if "node starting" in line]
    return lines[starts[-1] if starts else 0 :]


def _published(fed: LocalFederation) -> list[int]:
    return [r.round for r in fed.list_rounds() if r.state == pb.ROUND_SUM_READY]


@pytest.fixture
def federation(tmp_path: Path, stopper: list[LocalFederation]) -> LocalFederation:
    fed = LocalFederation(
        tmp_path,
        nodes=2,
        node_options={"epochs": 1},
        server_settings={"grace_seconds": GRACE_SECONDS},
    )
    stopper.append(fed)
    fed.setup()
    return fed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nodes_hear_the_restart_and_the_next_round_publishes(federation: LocalFederation) -> None:
    """SIGTERM with an upload in flight: while the server waits for it, every node has logged
    that the server is restarting and every other stream has ended with the same words; after
    the restart on the same port and state directory every node rejoins and the next round
    publishes with all of them, and no node needed a deadline or keepalive to find out."""
    fed = federation
    holder: HeldUpload | None = None
    streams: OpenStreams | None = None
    try:
        fed.start()
        fed.wait_for(lambda: _published(fed), STEP_LIMIT * 2, "a first round to publish")
        wait_online(fed, fed.nodes)
        holder = HeldUpload(fed)
        holder.start()
        streams = OpenStreams(fed)
        fed.wait_for(streams.opened, STEP_LIMIT, "the operator's streams to open")

        server = fed.procs["server"]
        server.send_signal(signal.SIGTERM)
        address = f"127.0.0.1:{fed.port}"

        def every_node_heard() -> bool:
            return all(
                any(f"{NOTICE}: {address}" in line for line in _lines_after_last_start(fed, fed.node_name(i)))
                for i in range(fed.nodes)
            )

        fed.wait_for(every_node_heard, STEP_LIMIT, "every node to log that the server is restarting")
        # The held upload keeps the server in its grace period: the nodes heard it from the server,
        # and every other stream to a client has ended already, with the same words.
        ended = streams.statuses()
        assert server.poll() is None, "the server exited before every node had heard it was restarting"
        assert all(status == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN) for status in ended.values()), ended
        holder.release()
        assert server.wait(STEP_LIMIT) == 0
        server_log = fed.log("server")
        assert "shutting down [signal=SIGTERM]" in server_log and "server stopped" in server_log

        fed.start_server()  # the same server.toml: the same port and state directory
        fed.wait_serving(STEP_LIMIT)
        before = max((r.round for r in fed.list_rounds()), default=0)
        published = fed.wait_for(
            lambda: [n for n in _published(fed) if n > before], STEP_LIMIT * 2, "a round after the restart"
        )
        after = published[0]
        info = fed.get_round(after)
        assert info is not None and info.participants == fed.nodes, info

        for i in range(fed.nodes):
            name = fed.node_name(i)
            fed.wait_for(
                lambda name=name: any(
                    "applied round sum" in line and f" round={after} " in line
                    for line in _lines_after_last_start(fed, name)
                ),
                STEP_LIMIT,
                f"{name} to apply round {after}",
            )
            lines = _lines_after_last_start(fed, name)
            notices = [n for n, line in enumerate(lines) if NOTICE in line]
            assert len(notices) == 1, f"{name} should say it once: {notices}"
            back = next(n for n, line in enumerate(lines) if BACK in line)
            applied = next(
                n
                for n, line in enumerate(lines)
                if "applied round sum" in line and f" round={after} " in line
            )
            assert notices[0] < back < applied, (notices, back, applied)
            late = [line for line in lines[: back + 1] if any(sign in line for sign in LATE_SIGNS)]
            assert not late, f"{name} found out from a deadline or keepalive, or said so: {late}"
            assert any("joined federation" in line for line in lines[back:]), f"{name} did not rejoin"
    except BaseException:
        print(_tails(fed), flush=True)
        raise
    finally:
        if streams is not None:
            streams.close()
        if holder is not None:
            holder.release()
