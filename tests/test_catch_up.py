"""Integration: a member that joins late catches up quietly, and says which floor it enforces.

A real server and real node processes with mutual TLS on loopback. Two members publish
:data:`ROUNDS` masked rounds; then a third one joins and replays every published sum, none of
which it took part in. It must not report their outcomes (the server refuses reports from
non-participants, docs/spec/sum-checks.md §4) and must stay within its call rate
(``[limits] requests_per_second``, here tighter than the default): its log has no
PERMISSION_DENIED or RESOURCE_EXHAUSTED, the server logs no refusal of it and its guard refused
no call. A report that still comes (a node from before the fix) is refused and logged once per
node, not once per round.

Its join line shows its own floor (``[node] min_participants``, the one it enforces) and the
server's beside it, labelled, only when they differ.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from cipherhive.demo.federation import LocalFederation, free_port
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

#: Rounds published before the late member joins.
ROUNDS = 5
LATE = 2  # node-3's index
#: The server's per-member call rate and burst ([limits]): a member that replays sums at full
#: speed (two calls each, in milliseconds for this model) runs out of calls within ROUNDS rounds.
RATE = 15.0
BURST = 8


def _published(fed: LocalFederation) -> int:
    return sum(r.state == pb.ROUND_SUM_READY for r in fed.list_rounds())


def _join_line(fed: LocalFederation, name: str, nth: int = 1) -> str:
    lines = [line for line in fed.log(name).splitlines() if "joined federation" in line]
    assert len(lines) >= nth, fed.log(name)[-2000:]
    return lines[nth - 1]


def _refused_calls(metrics_port: int) -> float:
    """The server guard's refused calls with RESOURCE_EXHAUSTED (its rate and stream limits)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r'^cipherhive_calls_refused_total\{code="resource_exhausted"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """ROUNDS rounds published by node-1 and node-2; node-3 has not started yet."""
    workdir = tmp_path_factory.mktemp("catchup")
    fed = LocalFederation(
        workdir,
        nodes=3,
        node_options={"epochs": 1},
        rounds={"min_participants": 2, "max_rounds": ROUNDS},
        server_settings={"metrics_listen": f"127.0.0.1:{free_port()}"},
    )
    fed.setup()
    # Limits tighter than the defaults (20 calls per second, bursts of 60), which a catch-up at full
    # speed trips after about 28 rounds: here after a handful.
    with (fed.workdir / "server.toml").open("a", encoding="utf-8") as toml:
        toml.write(f"\n[limits]\nrequests_per_second = {RATE}\nrequest_burst = {BURST}\n")
    try:
        fed.start_server()
        fed.wait_serving()
        fed.start_node(0)
        fed.start_node(1)
        fed.wait_for(lambda: _published(fed) >= ROUNDS, 360, f"{ROUNDS} published rounds")
        yield fed
    finally:
        fed.stop_all()


def _metrics_port(fed: LocalFederation) -> int:
    return int(fed.server_settings["metrics_listen"].rpartition(":")[2])


def test_a_late_member_catches_up_without_reports_or_refusals(federation: LocalFederation) -> None:
    fed = federation
    name = fed.node_name(LATE)
    before = _refused_calls(_metrics_port(fed))
    fed.start_node(LATE)
    applied = re.compile(rf"applied round sum \[node={name} round={ROUNDS}\b")
    fed.wait_for(lambda: applied.search(fed.log(name)), 240, f"{name} to catch up to round {ROUNDS}")
    log = fed.log(name)
    for number in range(1, ROUNDS + 1):
        assert re.search(rf"applied round sum \[node={name} round={number}\b", log), log[-3000:]
    for word in ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "could not report", "connection to"):
        assert word not in log, log[-3000:]
    server_log = fed.log("server")
    assert not [line for line in server_log.splitlines() if "refused" in line and f"actor={name}" in line], (
        server_log[-3000:]
    )
    assert _refused_calls(_metrics_port(fed)) == before

    # Its join line: its own floor, the same as the server's here, so nothing beside it.
    line = _join_line(fed, name)
    assert "min_participants=2" in line and "server_min_participants" not in line, line


def test_the_join_line_shows_the_nodes_own_floor_and_the_servers_beside_it(
    federation: LocalFederation,
) -> None:
    """Raised to 3 in its node.toml, the floor it enforces is 3, whatever the server's 2."""
    fed = federation
    name = fed.node_name(LATE)
    fed.stop(name)
    config = fed.workdir / f"{name}.toml"
    text = config.read_text()
    assert "min_participants = 2\n" in text
    config.write_text(text.replace("min_participants = 2\n", "min_participants = 3\n"))
    joins = fed.log(name).count("joined federation")
    try:
        fed.start_node(LATE)
        fed.wait_for(lambda: fed.log(name).count("joined federation") > joins, 120, f"{name} to join")
        line = _join_line(fed, name, joins + 1)
        assert re.search(r"\bmin_participants=3\b", line), line
        assert re.search(r"\bserver_min_participants=2\b", line), line
    finally:
        fed.stop(name)
        config.write_text(text)


def test_a_non_participants_reports_are_refused_and_logged_once(federation: LocalFederation) -> None:
    """A report from a node that did not take part (as a node before the fix sent one per round
    it caught up on): refused every time, audited once with who sent it."""
    fed = federation
    name = fed.node_name(LATE)
    folder = fed.workdir / name
    tls = ClientTLS(folder / f"{name}.crt", folder / f"{name}.key", folder / "ca.crt", "localhost")
    with channel(f"127.0.0.1:{fed.port}", tls) as ch:
        stub = pb_grpc.AggregationStub(ch)
        for number in range(1, ROUNDS + 1):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ReportOutcome(pb.OutcomeReport(round=number, applied=True), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    lines = [
        line
        for line in fed.log("server").splitlines()
        if "outcome report refused" in line and f"actor={name}" in line
    ]
    assert len(lines) == 1, lines
    assert "did not submit to round 1" in lines[0] and "refused unlogged" in lines[0], lines[0]
