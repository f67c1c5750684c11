"""`cipherhive node report`: a member's own report, from its state directory and privacy ledger
only (docs/how-to/member.md, "Your own report"); and the round history it is drawn from
(node/state/round_history.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from cipherhive.ckks import keys
from cipherhive.cli import main
from cipherhive.demo.federation import LocalFederation
from cipherhive.node.daemon import Node
from cipherhive.node.privacy.ledger import LedgerEntry, PrivacyLedger, ledger_path
from cipherhive.node.report import render_node_report
from cipherhive.node.report_figures import NodeFigures, PrivacyFigures, epsilon_points, read_figures
from cipherhive.node.state import round_history as history
from cipherhive.node.training import federated_eval
from cipherhive.node.training.update import leading
from cipherhive.privacy.accountant import DPEvent, epsilon
from cipherhive.privacy.schedule import PrivacySchedule
from cipherhive.runtime.fsutil import LOCK_FILE
from cipherhive.v1 import federation_pb2 as pb
from tests.test_node_state import FakeStub, _node, _publish, _sum_ready, _took_part


class _Page(HTMLParser):
    """The report's table rows (cell texts) and every tag and attribute, to check it fetches nothing."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(document)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def table(self, columns: int) -> list[list[str]]:
        """The rows of the table with ``columns`` cells a row (rounds: 10, ledger: 6)."""
        return [row for row in self.rows if len(row) == columns]


def _self_contained(document: str) -> _Page:
    page = _Page(document)
    assert "http://" not in document and "https://" not in document and "url(" not in document
    assert not {"script", "link", "img", "iframe", "object", "embed", "use", "image"} & set(page.tags)
    assert not {"src", "href", "xlink:href"} & set(page.attrs)
    return page


def _node_toml(tmp_path: Path, **privacy: object) -> Path:
    lines = [
        "[node]",
        'server = "127.0.0.1:1"',
        "insecure = true",
        'name = "acme"',
        f'state_dir = "{tmp_path / "state"}"',
        "[trainer]",
        'plugin = "not.imported:ByTheReport"',
    ]
    if privacy:
        lines.append("[privacy]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in privacy.items()]
    path = tmp_path / "node.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _report(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """The real command, in a process of its own (as a member runs it beside the node)."""
    return subprocess.run(
        [sys.executable, "-m", "cipherhive", "node", "report", "--config", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------- unit


@pytest.mark.timeout(60)
def test_a_missing_or_empty_state_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _node_toml(tmp_path)
    out = tmp_path / "report.html"
    assert main(["node", "report", "--config", str(config), "--out", str(out)]) == 2
    assert f"cipherhive node: error: no node state in {tmp_path / 'state'}" in capsys.readouterr().err
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "chain.json").write_text('{"rounds": [0]}')  # started, no round yet
    assert main(["node", "report", "--config", str(config), "--out", str(out)]) == 2
    assert "nothing to report yet" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["chain.json"]  # nothing written
    history.record_outcome(tmp_path / "state", 1, history.REJECTED, reason="floor: too few")
    missing = tmp_path / "no" / "such" / "report.html"
    assert main(["node", "report", "--config", str(config), "--out", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_history_is_bounded_and_outlives_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "MAX_ROUNDS", 20)  # each write is fsynced: keep the test fast
    for number in range(1, 26):
        history.record_outcome(tmp_path, number, history.APPLIED, participants=3, uploaded=True)
    kept = history.read_history(tmp_path)
    assert [r.round for r in kept] == list(range(6, 26))
    (tmp_path / history.FILE_NAME).write_text('{"format": "cipherhive/v1/round-history", "rounds": [{')
    with pytest.raises(history.HistoryError, match="damaged"):
        history.read_history(tmp_path)
    # The node starts afresh rather than stop: the record is informational.
    history.record_outcome(tmp_path, 7, history.APPLIED, evaluation={"loss": 0.5}, of_round=6)
    history.record_outcome(tmp_path, 8, history.REJECTED, reason="proof: bad commit")
    history.record_outcome(tmp_path, 9, history.APPLIED)
    history.record_undone(tmp_path, 8, "majority rejected")  # rejected here, withdrawn by the server
    history.record_undone(tmp_path, 7, "operator", target=6)  # rolled back from 9 to 6
    by_round = {r.round: r for r in history.read_history(tmp_path)}
    assert by_round[7].outcome == history.WITHDRAWN and by_round[7].evaluation == {
        "of_round": 6.0,
        "loss": 0.5,
    }
    assert by_round[8].outcome == history.WITHDRAWN
    assert by_round[8].reason == "rejected: proof: bad commit; then withdrawn (majority rejected)"
    assert by_round[9].outcome == history.ROLLED_BACK and "round 7 was withdrawn" in by_round[9].reason
    assert (tmp_path / history.FILE_NAME).stat().st_mode & 0o777 == 0o600


@pytest.mark.timeout(120)
def test_render_shows_every_outcome_and_escapes(tmp_path: Path) -> None:
    records = [
        history.RoundRecord(
            1, history.APPLIED, 1.0, 3, True, "", {"of_round": 0, "accuracy": 0.5, "loss": 2}
        ),
        history.RoundRecord(2, history.APPLIED, 2.0, 3, False, "", {"of_round": 1, "accuracy": 0.61}),
        history.RoundRecord(3, history.REJECTED, 3.0, 0, True, "<script>x</script>"),
        history.RoundRecord(4, history.ROLLED_BACK, 4.0, 3, True, "rolled back to round 2"),
    ]
    events = [DPEvent(1.1, 0.07, 18), DPEvent(1.1, 0.07, 18), DPEvent(2.0, 1.0, 1)]
    entries = [LedgerEntry(i + 1, e) for i, e in enumerate(events)]
    eps = epsilon_points(events, 1e-5)
    privacy = PrivacyFigures(True, "acme-data", 1e-5, 8.0, tmp_path / "l", entries, eps)
    assert eps[1] == pytest.approx(epsilon(events[:2], 1e-5), rel=1e-9)  # equal runs merged, same ε
    figures = NodeFigures("acme <1>", tmp_path, records, 2, privacy)
    document = render_node_report(figures, now=0.0)
    page = _self_contained(document)
    assert "acme &lt;1&gt;" in document and "<script>x" not in document
    assert [row[:2] for row in page.table(10)] == [
        ["4", "rolled back"],
        ["3", "rejected"],
        ["2", "applied"],
        ["1", "applied"],
    ]
    assert page.table(10)[2][3] == "—"  # sat round 2 out: no update of its own
    assert "0.61" in page.table(10)[2] and "2" in page.table(10)[3]
    assert page.tags.count("svg") == 4  # accuracy, loss, ε, timeline
    assert [row[1] for row in page.table(6)] == ["member-level", "record-level", "record-level"]
    assert [row[5] for row in page.table(6)] == [f"{eps[i]:.4f}" for i in (2, 1, 0)]
    assert "no differential privacy" in render_node_report(
        NodeFigures("acme", tmp_path, records, 2, PrivacyFigures(False)), now=0.0
    )


#: Three members' evaluations of a round's base model: (validation examples, metrics).
EVALUATIONS = [(100, {"loss": 1.0, "accuracy": 0.5}), (200, {"loss": 0.5, "accuracy": 0.7})]
EVALUATIONS.append((300, {"loss": 0.2, "accuracy": 0.9}))


def _members(node: Node, seed: int) -> list[np.ndarray]:
    """Three honest members' plaintext vectors, each with its evaluation in the slots."""
    rng = np.random.default_rng(seed)
    out = []
    for samples, evaluated in zip((400, 600, 900), EVALUATIONS, strict=True):
        w = samples / 1000.0
        slots = federated_eval.encode(evaluated, 1000.0, 64).slots
        out.append(np.concatenate([leading(w, slots), w * rng.normal(0.0, 0.05, node.layout.num_params)]))
    return out


@pytest.mark.timeout(120)
def test_a_node_records_what_it_did_with_each_sum(key_files: keys.KeyFiles, tmp_path: Path) -> None:
    """A real Node against a fake server: applied (with and without its own update), rejected,
    withdrawn and rolled back rounds land in history.json where the node handles them, with the
    evaluation it decrypted, and in the report."""
    node = _node(key_files, tmp_path / "state", keep_checkpoints=3)
    stub = FakeStub(node.layout.hash, node.layout.num_values)
    try:
        for number in (1, 2, 3):
            _publish(key_files, stub, number, _members(node, number))
            if number != 2:  # it sits round 2 out, and applies its sum all the same
                _took_part(node, number)
            node._handle(stub, _sum_ready(number, number - 1))  # type: ignore[arg-type]
        hostile = np.zeros(node.layout.num_values)
        hostile[0], hostile[1] = -100.0, 1.0  # a negative total weight: rejected
        _publish(key_files, stub, 4, [*_members(node, 4), hostile], participants=4)
        _took_part(node, 4)
        node._handle(stub, _sum_ready(4, 3, participants=4))  # type: ignore[arg-type]
        assert node.applied_round == 3
        withdrawn = pb.RoundEvent(kind=pb.RoundEvent.WITHDRAWN, round=2, reason="operator")
        node._handle(stub, withdrawn)  # type: ignore[arg-type]
        assert node.applied_round == 1
    finally:
        node.close()
    records = {r.round: r for r in history.read_history(tmp_path / "state")}
    assert {n: r.outcome for n, r in records.items()} == {
        1: history.APPLIED,
        2: history.WITHDRAWN,
        3: history.ROLLED_BACK,
        4: history.REJECTED,
    }
    assert [records[n].uploaded for n in (1, 2, 3, 4)] == [True, False, True, True]
    assert records[4].reason.startswith("bad_weight: the total weight is not a positive number")
    assert "round 2 was withdrawn (operator)" in records[3].reason
    total = sum(n for n, _ in EVALUATIONS)
    expected = {
        name: federated_eval.round4(sum(n * m[name] for n, m in EVALUATIONS) / total)
        for name in ("loss", "accuracy")
    }
    assert records[1].evaluation == {"of_round": 0.0, "examples": float(total), **expected}
    assert records[3].evaluation["of_round"] == 2.0 and not records[4].evaluation
    document = render_node_report(read_figures(node.config), now=0.0)
    rows = {int(row[0]): row for row in _self_contained(document).table(10)}
    assert [rows[n][1] for n in (1, 2, 3, 4)] == ["applied", "withdrawn", "rolled back", "rejected"]
    assert rows[1][5:8] == [str(total), f"{expected['accuracy']:.4g}", f"{expected['loss']:.4g}"]
    assert "current global model</dt><dd>round 1<" in document


# ---------------------------------------------------------------- real federations


def _applied_lines(fed: LocalFederation, index: int) -> dict[int, dict[str, object]]:
    """Node ``index``'s "applied round sum" log lines (JSON), by round."""
    lines = [json.loads(x) for x in fed.log(fed.node_name(index)).splitlines() if x.startswith("{")]
    return {int(x["round"]): x for x in lines if x.get("msg") == "applied round sum"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_member_report_of_a_real_federation(tmp_path: Path, stopper: list[LocalFederation]) -> None:
    """Two real nodes, three masked rounds with federated evaluation: node-1's report, written
    while it runs and again once it stopped, shows the figures it decrypted and logged."""
    fed = LocalFederation(tmp_path, nodes=2, rounds={"max_rounds": 3}, node_log_json=True)
    stopper.append(fed)
    fed.setup()
    fed.start()
    assert fed.wait_round(3, 180).state == pb.ROUND_SUM_READY
    fed.wait_for(lambda: len(_applied_lines(fed, 0)) == 3, 60, "node-1 applied 3 rounds")
    logged = _applied_lines(fed, 0)
    config = tmp_path / "node-1.toml"
    assert (tmp_path / "node-1-state" / LOCK_FILE).exists()  # the node runs and holds its lock

    def check(out: Path) -> None:
        done = _report(config, out)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"wrote {out} (3 rounds)\n"
        page = _self_contained(out.read_text(encoding="utf-8"))
        rows = {int(row[0]): row for row in page.table(10)}
        assert sorted(rows) == [1, 2, 3]
        for number, line in logged.items():
            row = rows[number]
            assert row[1] == "applied" and row[2] == "2" and row[3] == "sent"
            assert row[4] == str(line["eval_of_round"]) == str(number - 1)
            assert row[5] == str(line["eval_examples"])
            assert row[6] == f"{line['eval_accuracy']:.4g}" and row[7] == f"{line['eval_loss']:.4g}"
        assert "no differential privacy" in out.read_text(encoding="utf-8")
        assert out.stat().st_mode & 0o777 == 0o600

    check(tmp_path / "running.html")
    assert fed.procs["node-1"].poll() is None  # the report neither stopped nor blocked the node
    codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), codes
    check(tmp_path / "stopped.html")


#: Two rounds of 4 DP-SGD steps.
SCHEDULE = PrivacySchedule("record", 2, 0.1, 1.0, 4, 1.0)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_member_report_under_differential_privacy(tmp_path: Path, stopper: list[LocalFederation]) -> None:
    """Record-level DP: the report shows ε after every round, as the ledger's accountant computes
    it, and says why there is no federated evaluation."""
    fed = LocalFederation(
        tmp_path,
        nodes=2,
        insecure=True,
        node_log_json=True,
        node_options={"epochs": 1},
        rounds={"max_rounds": SCHEDULE.rounds},
        server_privacy={
            "dp_mode": "record",
            "dp_rounds": SCHEDULE.rounds,
            "dp_sample_rate": SCHEDULE.sample_rate,
            "dp_noise_multiplier": SCHEDULE.noise_multiplier,
            "dp_steps_per_round": SCHEDULE.steps_per_round,
            "dp_max_grad_norm": SCHEDULE.max_grad_norm,
        },
        node_privacy={"max_epsilon": SCHEDULE.epsilon(1e-5) * 1.0001},
    )
    stopper.append(fed)
    fed.setup()
    fed.start()
    assert fed.wait_round(SCHEDULE.rounds, 180).state == pb.ROUND_SUM_READY
    fed.wait_for(lambda: len(_applied_lines(fed, 1)) == SCHEDULE.rounds, 60, "node-2 applied")
    codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), codes
    section = fed.privacy_section(1)
    ledger = PrivacyLedger(ledger_path(Path(section["ledger_dir"]), section["dataset"]), section["dataset"])
    entries = ledger.entries()
    assert [e.round for e in entries] == [1, 2]
    out = tmp_path / "report.html"
    done = _report(tmp_path / "node-2.toml", out)
    assert done.returncode == 0, done.stderr
    document = out.read_text(encoding="utf-8")
    page = _self_contained(document)
    assert [row[:2] for row in reversed(page.table(10))] == [["1", "applied"], ["2", "applied"]]
    expected = [f"{epsilon([e.event for e in entries[: i + 1]], 1e-5):.4f}" for i in range(len(entries))]
    assert [row[0] for row in page.table(6)] == ["2", "1"]
    assert [row[5] for row in reversed(page.table(6))] == expected
    assert expected[-1] == f"{ledger.epsilon(1e-5):.4f}"
    assert f"ε = {expected[-1]} of" in document
    assert "under differential privacy nodes send no evaluation" in document
