"""The Prometheus endpoints of a real server and a real node, scraped over HTTP and parsed."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cipherhive.demo.federation import LocalFederation, free_port
from cipherhive.federation.layout import LEADING_VALUES
from cipherhive.v1 import federation_pb2 as pb

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, int, int]]:
    workdir: Path = tmp_path_factory.mktemp("metrics")
    server_port, node_port = free_port(), free_port()
    fed = LocalFederation(
        workdir,
        nodes=3,
        node_options={"epochs": 1},
        rounds={"max_rounds": 2},
        server_settings={"metrics_listen": f"127.0.0.1:{server_port}"},
    )
    fed.setup()
    fed.node_settings = {"metrics_listen": f"127.0.0.1:{node_port}"}
    fed.write_node_config(0)
    fed.start()
    try:
        fed.wait_for(
            lambda: sum(r.state == pb.ROUND_SUM_READY for r in fed.list_rounds()) >= 2, 180, "rounds"
        )
        fed.wait_for(
            lambda: scrape(node_port).get(("cipherhive_node_applied_round", ())) == 2, 60, "node-1 to apply"
        )
        yield fed, server_port, node_port
    finally:
        fed.stop_all()


def test_server_metrics(federation: tuple[LocalFederation, int, int]) -> None:
    _, port, _ = federation
    m = scrape(port)
    assert m[("cipherhive_nodes_online", ())] == 3
    assert m[("cipherhive_rounds_total", (("outcome", "opened"),))] >= 2
    assert m[("cipherhive_rounds_total", (("outcome", "published"),))] == 2
    assert m[("cipherhive_submissions_total", (("result", "accepted"),))] == 6
    assert m[("cipherhive_received_bytes_total", ())] > 6 * 60_000
    # 4810 parameters, the FedAvg weight, the check slot and the evaluation slots, per submission
    assert m[("cipherhive_ingested_values_total", ())] == 6 * (4810 + LEADING_VALUES)
    assert m[("cipherhive_ingest_values_per_second", ())] > 0
    assert m[("cipherhive_round_duration_seconds_count", ())] == 2
    assert m[("cipherhive_calls_in_progress", ())] >= 3  # the nodes' watch streams, at least


def test_node_metrics(federation: tuple[LocalFederation, int, int]) -> None:
    _, _, port = federation
    m = scrape(port)
    assert m[("cipherhive_node_applied_round", ())] == 2
    assert m[("cipherhive_node_rounds_joined_total", ())] >= 2
    for phase in ("train", "encrypt_upload", "download_decrypt", "apply"):
        assert m[("cipherhive_node_phase_seconds_count", (("phase", phase),))] >= 2
    # The federated evaluation the round-2 sum carried: of round 1's model, over the digits test set.
    assert m[("cipherhive_node_federated_eval_round", ())] == 1
    assert m[("cipherhive_node_federated_eval_examples", ())] == 450
    accuracy = m[("cipherhive_node_federated_eval", (("metric", "accuracy"),))]
    assert 0.0 <= accuracy <= 1.0 and accuracy == float(f"{accuracy:.4g}")
    assert m[("cipherhive_node_federated_eval", (("metric", "loss"),))] > 0
