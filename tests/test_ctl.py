"""`cipherhive ctl` against a real server: every sub-command, both output forms, every exit code.

One federation (a real server and three real nodes, mutual TLS) runs two
rounds for the whole module; the tests only read it. A test that changes a
federation (stops its nodes, opens, closes or withdraws rounds) builds one of
its own, so no test depends on which ran before it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cipherhive.ctl.cli import register
from cipherhive.ctl.report import render_report
from cipherhive.demo.federation import LocalFederation, free_port
from cipherhive.federation.layout import Layout, TensorSpec
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

#: Every test has its own limit; the first one to use the module's federation builds it (about a minute).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ENV_VARS = (
    "CIPHERHIVE_CTL_SERVER",
    "CIPHERHIVE_CTL_SERVER_NAME",
    "CIPHERHIVE_CTL_CERT",
    "CIPHERHIVE_CTL_KEY",
    "CIPHERHIVE_CTL_CA",
    "CIPHERHIVE_CTL_INSECURE",
    "CIPHERHIVE_CTL_TIMEOUT",
)


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        data = json.loads(self.out)
        assert isinstance(data, dict)
        return data


Ctl = Callable[..., Result]


#: Generous bound on a `cipherhive ctl` process of its own (interpreter start included).
PROCESS_TIMEOUT = 120


def _two_rounds(workdir: Path) -> LocalFederation:
    """Three nodes, running two published rounds (max_rounds = 2) before this returns."""
    fed = LocalFederation(
        workdir,
        nodes=3,
        node_options={"epochs": 1},
        rounds={"max_rounds": 2},
        # The opt-in disclosure: ctl's metric columns need the nodes' rounded metrics.
        node_settings={"report_metrics": True},
    )
    fed.setup()
    try:
        fed.start()
        fed.wait_for(
            lambda: sum(r.state == pb.ROUND_SUM_READY for r in fed.list_rounds()) >= 2, 180, "two rounds"
        )
    except BaseException:
        fed.stop_all()
        raise
    return fed


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """Rounds 1 and 2 published, the three nodes online: read-only for every test that uses it."""
    fed = _two_rounds(tmp_path_factory.mktemp("ctl"))
    try:
        yield fed
    finally:
        fed.stop_all()


@pytest.fixture
def stopped(tmp_path: Path) -> Iterator[LocalFederation]:
    """A federation of the test's own, to change: rounds 1 and 2 published, then every node stopped."""
    fed = _two_rounds(tmp_path / "own")
    try:
        for i in range(fed.nodes):
            fed.stop(fed.node_name(i))
        with fed.admin_channel() as ch:
            admin = pb_grpc.AdminStub(ch)
            fed.wait_for(
                lambda: admin.GetStatus(pb.StatusRequest(), timeout=10).nodes_online == 0,
                60,
                "the nodes to go offline",
            )
        yield fed
    finally:
        fed.stop_all()


def _admin_flags(fed: LocalFederation, who: str = "admin", name: str = "operator") -> list[str]:
    folder = fed.workdir / who
    return [
        "--server",
        f"127.0.0.1:{fed.port}",
        "--cert",
        str(folder / f"{name}.crt"),
        "--key",
        str(folder / f"{name}.key"),
        "--ca",
        str(folder / "ca.crt"),
        "--server-name",
        "localhost",
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cipherhive")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    return parser


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection settings from the caller's shell; no forced colours (rich reads these)."""
    for name in (*ENV_VARS, "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def raw(capsys: pytest.CaptureFixture[str]) -> Ctl:
    """Run `cipherhive ctl ARGV…` in-process; the exit code and captured output."""

    def call(*argv: str) -> Result:
        args = _parser().parse_args(["ctl", *argv])
        code = args.func(args)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


def _bound(raw: Ctl, fed: LocalFederation) -> Ctl:
    """Like ``raw``, with the operator's admin certificate for ``fed``."""

    def call(*argv: str) -> Result:
        return raw(*_admin_flags(fed), *argv)

    return call


@pytest.fixture
def ctl(raw: Ctl, federation: LocalFederation) -> Ctl:
    """Like ``raw``, with the operator's admin certificate for the test federation."""
    return _bound(raw, federation)


def _ok(result: Result) -> Result:
    assert result.code == 0, result
    assert result.err == "", result
    return result


# ---------------------------------------------------------------- read-only sub-commands


def test_status(ctl: Ctl, federation: LocalFederation) -> None:
    table = _ok(ctl("status")).out
    assert "latest published sum  2" in table
    assert "nodes online / known  3 / 3" in table
    assert "max rounds            2" in table
    assert "masked rounds         on" in table  # not only in --json
    data = _ok(ctl("--json", "status")).json()
    assert data["latest_sum_round"] == 2 and data["latest_round"] == 2
    assert data["nodes_known"] == 3 and data["open_round"] == 0  # zero fields are present
    assert data["max_rounds"] == 2 and data["auto_start"] is True
    settings = data["settings"]
    assert isinstance(settings, dict) and settings["min_participants"] == 3 and settings["masked"] is True
    assert isinstance(data["uptime_seconds"], float) and data["uptime_seconds"] > 0
    # --json is also accepted after the sub-command.
    assert _ok(ctl("status", "--json")).json()["latest_sum_round"] == 2
    # The layout LocalFederation pinned from node 1's model (`cipherhive node layout`).
    pinned = Layout.read_file(federation.layout_file)
    assert data["layout_hash"] == pinned.hash and data["layout_params"] == pinned.num_params
    assert data["settings"]["layout_hash"] == pinned.hash
    assert f"layout                {pinned.hash} ({pinned.num_params} values)" in table


def _as_env(flags: list[str]) -> dict[str, str]:
    """The variables that stand in for ``_admin_flags``' flags (docs/reference/cli.md)."""
    values = dict(zip(flags[0::2], flags[1::2], strict=True))
    return {f"CIPHERHIVE_CTL_{flag[2:].replace('-', '_').upper()}": value for flag, value in values.items()}


def test_connection_from_environment(
    raw: Ctl, federation: LocalFederation, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every connection flag has a variable, server name included; a flag given wins over it."""
    variables = _as_env(_admin_flags(federation))
    assert set(variables) == {
        "CIPHERHIVE_CTL_SERVER",
        "CIPHERHIVE_CTL_CERT",
        "CIPHERHIVE_CTL_KEY",
        "CIPHERHIVE_CTL_CA",
        "CIPHERHIVE_CTL_SERVER_NAME",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CIPHERHIVE_CTL_TIMEOUT", "20")
    assert _ok(raw("--json", "status")).json()["latest_sum_round"] == 2  # no flag at all

    # The server name: the variable is used (a wrong one fails the handshake), the flag wins.
    monkeypatch.setenv("CIPHERHIVE_CTL_SERVER_NAME", "not-the-server.example")
    wrong = raw("status")
    assert wrong.code == 3 and "not valid for 'not-the-server.example'" in wrong.err
    _ok(raw("--server-name", "localhost", "status"))
    _ok(raw("status", "--server-name", "localhost"))
    monkeypatch.setenv("CIPHERHIVE_CTL_SERVER_NAME", "localhost")

    # The deadline: a bad variable is a usage error that names it; the flag wins.
    monkeypatch.setenv("CIPHERHIVE_CTL_TIMEOUT", "soon")
    bad = raw("status")
    assert bad.code == 2
    assert bad.err == (
        "cipherhive ctl: error: CIPHERHIVE_CTL_TIMEOUT: must be a positive number of seconds, got 'soon'\n"
    )
    _ok(raw("--timeout", "20", "status"))
    bad_flag = raw("--timeout", "0", "status")
    assert bad_flag.code == 2 and "--timeout: must be a positive number of seconds" in bad_flag.err
    monkeypatch.delenv("CIPHERHIVE_CTL_TIMEOUT")

    # Plaintext: the variable is used (a TLS server does not answer it), --no-insecure wins.
    monkeypatch.setenv("CIPHERHIVE_CTL_INSECURE", "1")
    plaintext = raw("--timeout", "3", "status")
    assert plaintext.code == 3, plaintext
    _ok(raw("--no-insecure", "status"))
    monkeypatch.setenv("CIPHERHIVE_CTL_INSECURE", "perhaps")
    assert "CIPHERHIVE_CTL_INSECURE: expected true or false" in raw("status").err
    monkeypatch.delenv("CIPHERHIVE_CTL_INSECURE")

    # A file named by a variable is reported by the variable's name; the flag's file wins.
    missing = tmp_path / "gone.crt"
    monkeypatch.setenv("CIPHERHIVE_CTL_CERT", str(missing))
    gone = raw("status")
    assert gone.code == 2
    assert gone.err == f"cipherhive ctl: error: CIPHERHIVE_CTL_CERT file {str(missing)!r} does not exist\n"
    _ok(raw("--cert", variables["CIPHERHIVE_CTL_CERT"], "status"))

    # A missing value names both the flag and the variable to set.
    monkeypatch.delenv("CIPHERHIVE_CTL_CERT")
    unset = raw("status")
    assert unset.code == 2
    assert unset.err.startswith(
        "cipherhive ctl: error: --cert is required: pass --cert FILE or set CIPHERHIVE_CTL_CERT"
    )


def test_help_names_each_flags_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` shows every connection flag with its variable, at every level."""
    pairs = {
        "--server HOST:PORT": "CIPHERHIVE_CTL_SERVER;",
        "--server-name NAME": "CIPHERHIVE_CTL_SERVER_NAME",
        "--cert FILE": "CIPHERHIVE_CTL_CERT",
        "--key FILE": "CIPHERHIVE_CTL_KEY",
        "--ca FILE": "CIPHERHIVE_CTL_CA",
        "--insecure, --no-insecure": "CIPHERHIVE_CTL_INSECURE",
        "--timeout SECONDS": "CIPHERHIVE_CTL_TIMEOUT",
    }
    for argv in (["ctl"], ["ctl", "status"], ["ctl", "round"], ["ctl", "round", "show"]):
        with pytest.raises(SystemExit) as stopped:
            _parser().parse_args([*argv, "--help"])
        assert stopped.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # unwrapped
        for flag, variable in pairs.items():
            assert f"{flag} " in text and variable in text.split(f"{flag} ", 1)[1][:160], (argv, flag)
    with pytest.raises(SystemExit):
        _parser().parse_args(["ctl", "round", "wait", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CIPHERHIVE_CTL_SERVER_NAME" in text and "give up after SECONDS" in text


def test_flags_before_and_after_the_sub_command(raw: Ctl, federation: LocalFederation) -> None:
    """Connection flags and --json at any level; a later level never resets an earlier flag."""
    flags = _admin_flags(federation)
    assert _ok(raw("status", *flags, "--json")).json()["latest_sum_round"] == 2
    assert _ok(raw("round", *flags, "show", "1", "--json")).json()["round"] == 1
    assert _ok(raw("round", "show", "1", *flags)).out.startswith("round ")
    assert _ok(raw("nodes", "readmit", "node-3", *flags, "--json")).json()["nodes"][0]["name"] == "node-3"
    # Split: the certificates before, the address after; --json before, not repeated after.
    before, after = flags[2:], flags[:2]
    assert _ok(raw("--json", *before, "rounds", "--limit", "1", *after)).json()["rounds"][0]["round"] == 2
    assert _ok(raw(*after, "--json", "round", *before, "wait", "1")).json()["outcome"] == "published"

    parsed = _parser().parse_args(["ctl", "--server", "a:1", "--json", "round", "wait", "3", "--cert", "c"])
    assert (parsed.server, parsed.cert, parsed.json, parsed.number) == ("a:1", "c", True, 3)
    assert not hasattr(parsed, "key") and not hasattr(parsed, "timeout")  # not given: variable, default
    # `round wait` and `round start` keep their own --timeout; the call deadline goes before them.
    parsed = _parser().parse_args(["ctl", "round", "--timeout", "4", "wait", "3", "--timeout", "60"])
    assert (parsed.timeout, parsed.wait_timeout) == ("4", 60.0)
    parsed = _parser().parse_args(["ctl", "--timeout", "4", "round", "start", "--timeout", "60"])
    assert (parsed.timeout, parsed.round_timeout) == ("4", 60.0)
    parsed = _parser().parse_args(["ctl", "--server", "a:1", "status", "--server", "b:2"])
    assert parsed.server == "b:2"  # given twice: the later one, as argparse does for any flag


def test_nodes(ctl: Ctl) -> None:
    lines = _ok(ctl("nodes")).out.splitlines()
    assert lines[0].split()[:3] == ["node", "online", "expected"]
    assert lines[0].split()[-5:] == ["missed", "offences", "excluded", "until", "revoked"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"node-1", "node-2", "node-3"}
    # last round, submissions, missed, offences, excluded until, revoked
    assert all(row[-6:] == ["2", "2", "0", "0", "—", "no"] for row in rows.values())
    assert all(row[1:3] == ["yes", "yes"] for row in rows.values())  # joined, watching: expected
    nodes = _ok(ctl("--json", "nodes")).json()["nodes"]
    assert isinstance(nodes, list)
    assert {n["name"] for n in nodes} == {"node-1", "node-2", "node-3"}
    assert all(n["submissions"] == 2 and n["last_round"] == 2 and n["first_seen_unix"] > 0 for n in nodes)
    assert all(n["missed_rounds"] == 0 and n["expected"] and n["online"] for n in nodes)
    assert all(n["revoked"] is False and n["revoked_reason"] == "" for n in nodes)


def test_readmit_a_member(ctl: Ctl) -> None:
    """``nodes readmit`` answers with the member's row; an unknown name is exit 1, NOT_FOUND."""
    readmitted = _ok(ctl("--json", "nodes", "readmit", "node-2")).json()["nodes"]
    assert [(n["name"], n["excluded_until_round"], n["offences"]) for n in readmitted] == [("node-2", 0, 0)]
    unknown = ctl("nodes", "readmit", "nobody")
    assert unknown.code == 1
    assert unknown.err == (
        "cipherhive ctl: error: NOT_FOUND: no member named 'nobody' has ever joined this server\n"
    )


def test_rounds(ctl: Ctl) -> None:
    lines = _ok(ctl("rounds")).out.splitlines()
    assert lines[0].split() == [
        "round",
        "state",
        "participants",
        "applied/rejected",
        "opened",
        "duration",
        "accuracy",
        "loss",
        "reason",
    ]
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(row[1:4] == ["sum", "ready", "3/3"] for row in rows)

    rounds = _ok(ctl("--json", "rounds")).json()["rounds"]
    assert isinstance(rounds, list) and [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["state"] == "ROUND_SUM_READY" and r["participants"] == 3 and r["expected"] == 3
        assert r["duration_seconds"] == pytest.approx(r["closed_unix"] - r["opened_unix"])
        accuracies = [s["metrics"]["accuracy"] for s in r["submissions"]]
        losses = [s["metrics"]["loss"] for s in r["submissions"]]
        assert r["mean_accuracy"] == pytest.approx(sum(accuracies) / 3)
        assert r["mean_loss"] == pytest.approx(sum(losses) / 3)
        assert 0 < r["mean_accuracy"] <= 1 and r["mean_loss"] > 0
        # The table shows the same means.
        row = rows[r["round"] - 1]
        assert f"{r['mean_accuracy']:.4g}" in row and f"{r['mean_loss']:.4g}" in row

    latest = _ok(ctl("rounds", "--limit", "1", "--json")).json()["rounds"]
    assert isinstance(latest, list) and [r["round"] for r in latest] == [2]


def test_round_show(ctl: Ctl) -> None:
    out = _ok(ctl("round", "show", "1")).out
    assert "participants / expected  3 / 3" in out
    assert "base round               0 (initial model)" in out
    submissions = out[out.index("submissions") :].splitlines()
    assert submissions[1].split() == ["node", "accuracy", "loss", "bytes", "accepted"]
    assert sorted(line.split()[0] for line in submissions[3:]) == ["node-1", "node-2", "node-3"]
    assert all("KiB" in line for line in submissions[3:])

    info = _ok(ctl("round", "show", "1", "--json")).json()
    assert info["round"] == 1 and info["base_round"] == 0 and info["state"] == "ROUND_SUM_READY"
    subs = info["submissions"]
    assert isinstance(subs, list) and len(subs) == 3
    for sub in subs:
        assert set(sub["metrics"]) == {"accuracy", "loss"}
        assert sub["num_bytes"] > 0 and sub["accepted_unix"] >= info["opened_unix"]


def test_watch_replays_history(ctl: Ctl) -> None:
    lines = _ok(ctl("watch", "--since", "0", "--count", "2")).out.splitlines()
    assert len(lines) == 2
    for number, line in zip((1, 2), lines, strict=True):
        assert "SUM_READY" in line and f"round {number} " in line and "participants 3/3" in line
        assert line.endswith("[replay]")
    events = [
        json.loads(line)
        for line in _ok(ctl("--json", "watch", "--since", "0", "--count", "2")).out.splitlines()
    ]
    assert [(e["kind"], e["round"], e["replay"]) for e in events] == [
        ("SUM_READY", 1, True),
        ("SUM_READY", 2, True),
    ]
    assert all(e["participants"] == 3 for e in events)


def test_health(ctl: Ctl) -> None:
    assert _ok(ctl("health")).out == "SERVING\n"
    assert _ok(ctl("--json", "health", "--service", "cipherhive.v1.Admin")).json() == {
        "service": "cipherhive.v1.Admin",
        "status": "SERVING",
    }
    unknown = ctl("health", "--service", "no.such.Service")
    assert unknown.code == 1
    assert unknown.err.startswith("cipherhive ctl: error: NOT_FOUND: ")


class _Page(HTMLParser):
    """Collects what a self-contained report must (not) contain."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs
        self._in_cell = tag == "td"

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells.append(data.strip())


def _check_self_contained(document: str) -> _Page:
    page = _Page()
    page.feed(document)
    page.close()
    assert "http://" not in document and "https://" not in document
    assert not {"script", "link", "img", "iframe", "object", "embed", "use", "image"} & set(page.tags)
    assert not [name for name, _ in page.attrs if name in {"src", "href", "xlink:href"}]
    assert "url(" not in document and "@import" not in document
    return page


def test_report(ctl: Ctl, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = _ok(ctl("report", "--out", str(out)))
    assert result.out == f"wrote {out} (2 rounds)\n"
    document = out.read_text(encoding="utf-8")
    page = _check_self_contained(document)
    assert page.tags.count("svg") == 4 and page.tags.count("polyline") >= 4
    rows = document[document.index("<tbody>") :]
    assert rows.count("<tr") == 2
    assert "1" in page.cells and "2" in page.cells and "sum ready" in page.cells

    again = _ok(ctl("--json", "report", "--out", str(tmp_path / "r2.html"), "--limit", "1")).json()
    assert again == {"out": str(tmp_path / "r2.html"), "rounds": 1}

    missing_dir = ctl("report", "--out", str(tmp_path / "no" / "such" / "report.html"))
    assert missing_dir.code == 2 and "does not exist" in missing_dir.err


def test_render_report_escapes_and_accepts_json_dicts() -> None:
    """The pure renderer: `--json` dicts in, every server string escaped, nothing fetched."""
    rounds: list[dict[str, object]] = [
        {
            "round": "1",  # proto3 JSON's string form of uint64 is accepted too
            "state": "ROUND_FAILED",
            "opened_unix": 100.0,
            "closed_unix": 130.5,
            "expected": 3,
            "participants": 1,
            "reason": '<script>alert("x")</script>',
            "mean_loss": 9.9,  # derived fields are ignored and recomputed
        },
        {
            "round": 2,
            "state": "ROUND_OPEN",
            "opened_unix": 200.0,
            "expected": 3,
            "submissions": [{"node_name": "a", "metrics": {"accuracy": 0.5, "loss": 1.0}}],
        },
    ]
    document = render_report(rounds, {"version": "<b>1</b>", "nodes_known": 3}, now=0.0)
    page = _check_self_contained(document)
    assert "<script>" not in document and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in document
    assert "&lt;b&gt;1&lt;/b&gt;" in document
    assert "30.5 s" in page.cells and "failed" in page.cells and "open" in page.cells
    assert page.tags.count("svg") == 4
    assert render_report([], None).count("no data for this chart yet") == 4


# ---------------------------------------------------------------- exit codes


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(["ctl", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    for line in (
        "0  success",
        "1  the server answered",
        "2  usage error",
        "3  the server could not be reached",
    ):
        assert line in text


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(["ctl", "round", "show", "0"])
    assert stopped.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_unknown_round_is_exit_1(ctl: Ctl) -> None:
    result = ctl("round", "close", "999")
    assert (result.code, result.out) == (1, "")
    assert result.err == "cipherhive ctl: error: NOT_FOUND: round 999 does not exist\n"
    assert ctl("round", "show", "999").code == 1


def test_closing_a_finished_round_is_exit_1(ctl: Ctl) -> None:
    result = ctl("round", "close", "1")
    assert result.code == 1
    assert result.err.startswith("cipherhive ctl: error: FAILED_PRECONDITION: round 1 is not open")


def test_round_wait_for_a_published_round(ctl: Ctl) -> None:
    table = _ok(ctl("round", "wait", "2")).out
    assert "round" in table and "2" in table and "3 / 3" in table
    data = _ok(ctl("--json", "round", "wait", "1")).json()
    assert data["round"] == 1 and data["outcome"] == "published" and data["state"] == "ROUND_SUM_READY"
    late = ctl("round", "wait", "3", "--timeout", "1")  # round 3 is not open (max_rounds = 2)
    assert late.code == 3 and late.out == ""
    assert late.err.startswith("cipherhive ctl: error: round 3 did not end within 1s")
    assert "hint: wait longer (--timeout)" in late.err


def test_unreachable_server_is_exit_3(raw: Ctl, federation: LocalFederation) -> None:
    flags = _admin_flags(federation)
    flags[1] = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = raw(*flags, "--timeout", "2", "status")  # returns (it does not wait for a server)
    assert result.code == 3 and result.out == ""
    assert result.err.startswith("cipherhive ctl: error: UNAVAILABLE: ") or "DEADLINE_EXCEEDED" in result.err
    assert "check --server" in result.err


def test_wrong_server_name_is_exit_3(ctl: Ctl) -> None:
    result = ctl("--server-name", "not-the-server.example", "status")
    assert result.code == 3
    # The diagnosis the node gives too (cipherhive.runtime.transport.diagnose_tls), with ctl's flag names.
    assert (
        "wrong server name: the server's certificate is not valid for 'not-the-server.example'" in result.err
    )
    assert "cipherhive ctl: hint: set --server-name to a name in the server's certificate" in result.err


def test_missing_certificate_file_is_exit_2(raw: Ctl, federation: LocalFederation, tmp_path: Path) -> None:
    flags = _admin_flags(federation)
    missing = tmp_path / "operator.crt"
    flags[3] = str(missing)
    result = raw(*flags, "status")
    assert result.code == 2
    assert result.err == f"cipherhive ctl: error: --cert file {str(missing)!r} does not exist\n"
    no_flags = raw("--server", f"127.0.0.1:{federation.port}", "status")
    assert no_flags.code == 2 and "--cert is required" in no_flags.err


def test_node_certificate_is_refused_exit_1(raw: Ctl, federation: LocalFederation) -> None:
    result = raw(*_admin_flags(federation, "node-1", "node-1"), "status")
    assert result.code == 1
    assert result.err.startswith(
        "cipherhive ctl: error: PERMISSION_DENIED: this call needs a admin certificate"
    )


# ---------------------------------------------------------------- errors under --json


def _json_error(result: Result, code: str, exit_code: int) -> dict[str, Any]:
    """The one JSON object a failure prints under --json: on stdout, nothing on stderr."""
    assert result.code == exit_code and result.err == "", result
    data = result.json()
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"code", "message", "exit_code", "hint"}
    assert error["code"] == code and error["exit_code"] == exit_code, error
    assert isinstance(error["message"], str) and isinstance(error["hint"], str)
    return dict(error)


def test_errors_under_json_are_one_json_object(
    ctl: Ctl, raw: Ctl, federation: LocalFederation, tmp_path: Path
) -> None:
    """Refusals (1), usage and local files (2), unreachable and timeouts (3): same codes as text."""
    error = _json_error(ctl("--json", "round", "close", "999"), "NOT_FOUND", 1)
    assert error["message"] == "NOT_FOUND: round 999 does not exist"
    _json_error(ctl("round", "show", "999", "--json"), "NOT_FOUND", 1)
    _json_error(ctl("--json", "health", "--service", "no.such.Service"), "NOT_FOUND", 1)
    denied = raw(*_admin_flags(federation, "node-1", "node-1"), "--json", "status")
    _json_error(denied, "PERMISSION_DENIED", 1)

    late = _json_error(ctl("round", "wait", "3", "--timeout", "1", "--json"), "TIMEOUT", 3)
    assert late["message"].startswith("round 3 did not end within 1s") and "--timeout" in late["hint"]

    flags = _admin_flags(federation)
    flags[1] = f"127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (("--timeout", "2", "--json", "status"), ("--timeout", "2", "watch", "--json")):
        result = raw(*flags, *argv)
        assert len(result.out.splitlines()) == (1 if "watch" in argv else len(result.out.splitlines()))
        unreachable = _json_error(result, result.json()["error"]["code"], 3)
        assert (
            unreachable["code"] in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
            and "check --server" in unreachable["hint"]
        )

    flags = _admin_flags(federation)
    flags[3] = str(tmp_path / "operator.crt")
    missing = _json_error(raw(*flags, "status", "--json"), "USAGE", 2)
    assert missing["message"] == f"--cert file {str(tmp_path / 'operator.crt')!r} does not exist"
    no_dir = ctl("--json", "report", "--out", str(tmp_path / "no" / "report.html"))
    assert "does not exist" in _json_error(no_dir, "USAGE", 2)["message"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--json", "round", "show", "0"), "argument N: must be at least 1, got 0"),
        (("round", "show", "0", "--json"), "argument N: must be at least 1, got 0"),
        (("round", "--json", "wait"), "the following arguments are required: N"),
        (("--json", "status", "--bogus"), "unrecognized arguments: --bogus"),
        (("--json", "round", "withdraw", "2"), "the following arguments are required: --reason"),
    ],
)
def test_usage_errors_under_json(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    """argparse's own errors too, wherever --json stands (no server needed: parsing fails first)."""
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(["ctl", *argv])
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    error = _json_error(Result(2, out, err), "USAGE", 2)
    assert error["message"] == message and error["hint"].startswith("see `cipherhive ctl ")


# ---------------------------------------------------------------- generic gRPC client


def test_reflection_lists_the_services(federation: LocalFederation) -> None:
    """What grpcurl relies on: reflection over mutual TLS with the admin certificate."""
    folder = federation.workdir / "admin"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(folder / "ca.crt").read_bytes(),
        private_key=(folder / "operator.key").read_bytes(),
        certificate_chain=(folder / "operator.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{federation.port}", creds, options=options) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"cipherhive.v1.Admin", "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------- live stream, then changes


_WATCH_SCRIPT = """
import argparse, sys
from cipherhive.ctl.cli import register
parser = argparse.ArgumentParser(prog="cipherhive")
register(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_watch_exits_0_on_ctrl_c(federation: LocalFederation) -> None:
    argv = [sys.executable, "-c", _WATCH_SCRIPT, "ctl", *_admin_flags(federation), "watch", "--since", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "SUM_READY" in first and "round 1" in first, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=PROCESS_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=PROCESS_TIMEOUT)


def _watch_until_published(fed: LocalFederation, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "cipherhive", "ctl", *_admin_flags(fed), "--json", "watch", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _events(proc: subprocess.Popen[str]) -> list[tuple[str, dict[str, Any]]]:
    """(line, event) until the round's SUM_READY, then Ctrl-C."""
    assert proc.stdout is not None
    events: list[tuple[str, dict[str, Any]]] = []
    while not events or events[-1][1]["kind"] != "SUM_READY":
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=PROCESS_TIMEOUT)
        events.append((line, json.loads(line)))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=PROCESS_TIMEOUT) == 0
    return events


def test_watch_json_leaves_the_blobs_out(tmp_path: Path) -> None:
    """A live masked round: without --with-blobs, counts and the roster hash replace the base64."""
    import base64

    from cipherhive.secagg.roster import roster_hash

    fed = LocalFederation(tmp_path / "live", nodes=3, node_options={"epochs": 1}, rounds={"max_rounds": 1})
    fed.setup()
    watchers: list[subprocess.Popen[str]] = []
    try:
        fed.start_server()
        fed.wait_serving()
        # Started before the nodes: the round opens only once they have joined.
        watchers = [_watch_until_published(fed), _watch_until_published(fed, "--with-blobs")]
        for i in range(fed.nodes):
            fed.start_node(i)
        slim, full = (_events(w) for w in watchers)
    finally:
        for w in watchers:
            if w.poll() is None:
                w.kill()
                w.communicate(timeout=PROCESS_TIMEOUT)
        fed.stop_all()
    kinds = {e["kind"]: (line, e) for line, e in slim}
    blobs = {e["kind"]: (line, e) for line, e in full}
    assert {"ROSTER", "COMMITS", "SUM_READY"} <= set(kinds) and set(kinds) == set(blobs)
    for kind in ("ROSTER", "COMMITS"):
        line, event = kinds[kind]
        full_line, full_event = blobs[kind]
        assert "roster" not in event and "commits" not in event
        assert event["roster_count"] == 3 and len(full_event["roster"]) == 3
        entries = [base64.b64decode(entry) for entry in full_event["roster"]]
        expected = roster_hash(entries, base64.b64decode(full_event["nonce"])).hex()
        assert event["roster_hash"] == full_event["roster_hash"] == expected
        assert len(line) < 1000 < len(full_line), (len(line), len(full_line))
    assert kinds["COMMITS"][1]["commits_count"] == 3 and len(blobs["COMMITS"][1]["commits"]) == 3
    assert kinds["ROSTER"][1]["commits_count"] == 0
    # The hash the server's audit line names when it fixes the roster.
    assert f"hash={kinds['ROSTER'][1]['roster_hash'][:16]}" in fed.log("server")


def test_start_and_close_a_round(raw: Ctl, stopped: LocalFederation) -> None:
    """With the nodes stopped, round 3 stays open until closed, then fails for lack of nodes."""
    ctl = _bound(raw, stopped)
    assert _ok(ctl("--json", "status")).json()["nodes_online"] == 0

    refused = ctl("round", "start", "--timeout", "120")
    assert refused.code == 1 and refused.out == ""
    assert "FAILED_PRECONDITION: only 0 node(s) are online" in refused.err and "--force" in refused.err
    assert _ok(ctl("--json", "status")).json()["open_round"] == 0

    started = _ok(ctl("round", "start", "--timeout", "120", "--force"))
    assert started.out.startswith("round 3 opened: base round 2, expects 0 node(s), deadline ")

    again = ctl("--json", "round", "start")
    assert again.code == 1 and again.err == ""  # under --json the error is JSON on stdout
    assert again.json() == {
        "error": {
            "code": "FAILED_PRECONDITION",
            "message": "FAILED_PRECONDITION: round 3 is still open; close it first",
            "exit_code": 1,
            "hint": "",
        }
    }
    assert _ok(ctl("--json", "status")).json()["open_round"] == 3

    closed = _ok(ctl("--json", "round", "close", "3")).json()
    assert closed["round"] == 3 and closed["state"] == "ROUND_FAILED" and closed["participants"] == 0
    assert closed["mean_accuracy"] is None and closed["duration_seconds"] is not None

    # The other output forms: start in JSON, close as a line of text.
    waiting = ctl("--json", "round", "wait", "3")
    assert waiting.code == 1 and waiting.json()["outcome"] == "failed"
    # A non-zero exit under --json always comes with an "error" key, here beside the round.
    assert waiting.json()["error"]["code"] == "ROUND_FAILED" and waiting.json()["error"]["exit_code"] == 1
    assert waiting.json()["error"]["message"].startswith("round 3 failed: ")
    opened = _ok(ctl("--json", "round", "start", "--timeout", "120", "--force")).json()
    assert opened["round"] == 4 and opened["state"] == "ROUND_OPEN" and opened["base_round"] == 2
    assert opened["duration_seconds"] is None and opened["deadline_unix"] > opened["opened_unix"]
    # `round wait` in its own process blocks while round 4 is open and returns its outcome when it ends.
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cipherhive",
            "ctl",
            *_admin_flags(stopped),
            "round",
            "wait",
            "4",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # While round 4 is open a wait does not end: one bounded by --timeout runs out (exit 3),
        # and the waiter started before it is still waiting.
        bounded = ctl("round", "wait", "4", "--timeout", "2")
        assert bounded.code == 3 and bounded.out == "", bounded
        assert bounded.err.startswith("cipherhive ctl: error: round 4 did not end within 2s"), bounded
        assert waiter.poll() is None, waiter.communicate(timeout=PROCESS_TIMEOUT)
        line = _ok(ctl("round", "close", "4")).out
        assert line.startswith("round 4 closed: failed, 0/0 participants")
        out, err = waiter.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate(timeout=PROCESS_TIMEOUT)
    assert waiter.returncode == 1, err
    assert json.loads(out)["outcome"] == "failed" and json.loads(out)["round"] == 4

    events = _ok(ctl("--json", "watch", "--since", "2", "--count", "2")).out.splitlines()
    assert [(e["kind"], e["round"], e["replay"]) for e in map(json.loads, events)] == [
        ("FAILED", 3, True),
        ("FAILED", 4, True),
    ]
    table = _ok(ctl("rounds")).out.splitlines()
    assert [row.split()[:3] for row in table[-2:]] == [["3", "failed", "0/0"], ["4", "failed", "0/0"]]


# ---------------------------------------------------------------- withdrawal and the pinned layout


def test_withdraw_a_round(raw: Ctl, stopped: LocalFederation, tmp_path: Path) -> None:
    ctl = _bound(raw, stopped)
    # Rounds 1 and 2 are published; round 3, opened with no node online, fails.
    _ok(ctl("round", "start", "--force", "--timeout", "120"))
    assert _ok(ctl("--json", "round", "close", "3")).json()["state"] == "ROUND_FAILED"

    line = _ok(ctl("round", "withdraw", "2", "--reason", "spoiled sum\nforged: line")).out
    assert line.startswith("round 2 withdrawn: withdrawn, 3/3 participants")
    info = _ok(ctl("--json", "round", "show", "2")).json()
    assert info["state"] == "ROUND_WITHDRAWN" and info["withdrawn_unix"] > 0
    # A control character never reaches a log line or a table as itself.
    assert info["withdrawn_reason"] == "spoiled sum\\nforged: line"
    shown = _ok(ctl("round", "show", "2")).out
    assert "withdrawn: spoiled sum\\nforged: line" in shown

    rows = {line.split()[0]: line.split() for line in _ok(ctl("rounds")).out.splitlines()[2:]}
    assert rows["2"][1] == "withdrawn" and rows["1"][1:3] == ["sum", "ready"]
    status = _ok(ctl("--json", "status")).json()
    assert status["rounds_withdrawn"] == 1 and status["latest_sum_round"] == 1
    withdrawn = ctl("--json", "round", "wait", "2")
    assert withdrawn.code == 1 and withdrawn.json()["outcome"] == "withdrawn"
    assert withdrawn.json()["error"] == {
        "code": "ROUND_WITHDRAWN",
        "message": "round 2 withdrawn: spoiled sum\\nforged: line",
        "exit_code": 1,
        "hint": "",
    }

    # Refusals: already withdrawn, failed, unknown, no reason.
    for argv, code, text in [
        (("2", "--reason", "again"), 1, "FAILED_PRECONDITION: round 2 is withdrawn; only a published round"),
        (("3", "--reason", "failed"), 1, "FAILED_PRECONDITION: round 3 is failed"),
        (("99", "--reason", "none"), 1, "NOT_FOUND: round 99 does not exist"),
        (("1", "--reason", ""), 1, "INVALID_ARGUMENT: reason is required"),
        (("1", "--reason", "x" * 201), 1, "INVALID_ARGUMENT: reason has 201 characters"),
    ]:
        result = ctl("round", "withdraw", *argv)
        assert result.code == code and text in result.err, result

    # The next round builds on the latest round that is published and not withdrawn.
    opened = _ok(ctl("--json", "round", "start", "--force", "--timeout", "60")).json()
    assert opened["round"] == 4 and opened["base_round"] == 1 and opened["min_participants"] == 3
    _ok(ctl("round", "close", "4"))

    report = _ok(ctl("--json", "report", "--out", str(tmp_path / "withdrawn.html"))).json()
    document = Path(report["out"]).read_text(encoding="utf-8")
    assert '<tr class="withdrawn">' in document and "withdrawn: spoiled sum" in document


def test_federation_layout_cannot_change_once_published(
    ctl: Ctl, federation: LocalFederation, tmp_path: Path
) -> None:
    same = _ok(ctl("federation", "init", "--layout", str(federation.layout_file))).out
    assert same.startswith(f"layout pinned: {Layout.read_file(federation.layout_file).hash}")
    other = tmp_path / "other.json"
    other.write_text(Layout((TensorSpec("w", (3,)),)).pretty(), encoding="utf-8")
    refused = ctl("federation", "init", "--layout", str(other))
    assert (
        refused.code == 1 and "another layout is pinned already" in refused.err and "--replace" in refused.err
    )
    refused = ctl("federation", "init", "--layout", str(other), "--replace")
    assert refused.code == 1 and "round(s) have been published with it" in refused.err
    refused = ctl("federation", "reset")
    assert refused.code == 1 and "cannot reset the layout" in refused.err
    bad = tmp_path / "bad.json"
    bad.write_text('{"tensors": [["no spaces allowed", [2]]]}', encoding="utf-8")
    usage = ctl("federation", "init", "--layout", str(bad))
    assert usage.code == 2 and "'no spaces allowed'" in usage.err and "a name must be" in usage.err
    audit = federation.log("server")
    assert "layout pin refused" in audit and "actor=operator" in audit


@pytest.fixture
def bare_server(tmp_path: Path) -> Iterator[LocalFederation]:
    """A server with no node running and nothing published (its layout pinned from a file)."""
    fed = LocalFederation(tmp_path / "bare", nodes=1, rounds={"auto_start": False, "min_participants": 2})
    fed.layout = Layout((TensorSpec("dense.weight", (4, 3)), TensorSpec("dense.bias", (4,))))
    fed.setup()
    fed.start_server()
    fed.wait_serving()
    try:
        yield fed
    finally:
        fed.stop_all()


def test_federation_init_and_reset(raw: Ctl, bare_server: LocalFederation) -> None:
    from cipherhive.ckks import keys
    from cipherhive.runtime.transport import ClientTLS, channel

    fed = bare_server

    def ctl(*argv: str) -> Result:
        return raw(*_admin_flags(fed), *argv)

    assert fed.layout is not None
    assert _ok(ctl("--json", "status")).json()["layout_hash"] == fed.layout.hash
    reset = _ok(ctl("--json", "federation", "reset")).json()
    assert reset["layout_hash"] == "" and reset["num_params"] == 0
    assert "not pinned" in _ok(ctl("status")).out

    d = fed.workdir / "node-1"
    tls = ClientTLS(d / "node-1.crt", d / "node-1.key", d / "ca.crt", "localhost")
    fingerprint = keys.fingerprint_of_file(fed.workdir / "keys" / keys.PUBLIC_FILE)
    join = pb.JoinRequest(key_fingerprint=fingerprint, layout=fed.layout.to_proto())
    with channel(f"127.0.0.1:{fed.port}", tls) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.AggregationStub(ch).Join(join, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "has not pinned the federation's model layout yet" in (err.value.details() or "")
        assert "cipherhive node layout" in (err.value.details() or "")
        start = ctl("round", "start", "--force")
        assert start.code == 1 and "has not pinned the federation's model layout yet" in start.err

        pinned = _ok(ctl("federation", "init", "--layout", str(fed.layout_file))).out
        assert pinned == f"layout pinned: {fed.layout.hash} (16 values in 2 tensors)\n"
        assert pb_grpc.AggregationStub(ch).Join(join, timeout=10).settings.layout_hash == fed.layout.hash
        other = fed.workdir / "other.json"
        other.write_text(Layout((TensorSpec("w", (3,)),)).pretty(), encoding="utf-8")
        replaced = _ok(ctl("--json", "federation", "init", "--layout", str(other), "--replace")).json()
        assert replaced["num_params"] == 3 and replaced["num_tensors"] == 1
    audit = fed.log("server")
    assert "join refused" in audit and "layout replaced" in audit and "layout reset" in audit


def _fill_history(db: Path, rounds: int, members: int, layout: Layout) -> None:
    """Write ``rounds`` published rounds of ``members`` submissions each straight into a State."""
    import sqlite3

    from cipherhive.server.storage.state import State

    State(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('layout', ?)", (layout.canonical(),))
        names = [f"member-{i:02d}" for i in range(members)]
        conn.executemany(
            "INSERT INTO nodes (name, first_seen, last_seen, last_round, submissions) VALUES (?, 1, 2, ?, ?)",
            [(n, rounds, rounds) for n in names],
        )
        conn.executemany(
            "INSERT INTO rounds (round, state, base_round, opened, deadline, closed, expected, participants, "
            "reason, min_participants) VALUES (?, 'sum_ready', ?, ?, ?, ?, ?, ?, 'all in', 3)",
            [
                (
                    r,
                    r - 1,
                    1000.0 + r * 10,
                    1000.0 + r * 10 + 600,
                    1000.0 + r * 10 + 5,
                    json.dumps(names),
                    members,
                )
                for r in range(1, rounds + 1)
            ],
        )
        conn.executemany(
            "INSERT INTO submissions (round, node, submission_id, receipt, accepted, num_bytes, metrics) "
            "VALUES (?, ?, ?, 'r', ?, 66000, ?)",
            [
                (r, n, f"sub-{r}-{n}", 1000.0 + r * 10 + 1, json.dumps({"accuracy": 0.9, "loss": 0.3}))
                for r in range(1, rounds + 1)
                for n in names
            ],
        )


def test_paging_through_a_long_history(raw: Ctl, tmp_path: Path) -> None:
    """1,100 rounds of 64 members: `ctl rounds` and `ctl report` page through all of them."""

    layout = Layout((TensorSpec("w", (8,)),))
    fed = LocalFederation(tmp_path / "long", nodes=2, rounds={"auto_start": False}, layout=layout)
    fed.setup()
    (fed.workdir / "server-state").mkdir()
    _fill_history(fed.workdir / "server-state" / "state.db", 1100, 64, layout)
    fed.start_server()
    try:
        fed.wait_serving()

        def ctl(*argv: str) -> Result:
            return raw(*_admin_flags(fed), "--timeout", "60", *argv)

        rounds = _ok(ctl("--json", "rounds")).json()["rounds"]
        assert [r["round"] for r in rounds] == list(range(1, 1101))
        assert all(len(r["submissions"]) == 64 for r in rounds)
        table = _ok(ctl("rounds", "--limit", "250")).out.splitlines()
        assert [line.split()[0] for line in table[2:]] == [str(r) for r in range(851, 1101)]

        out = tmp_path / "long.html"
        assert _ok(ctl("report", "--out", str(out))).out == f"wrote {out} (1100 rounds)\n"
        document = out.read_text(encoding="utf-8")
        assert "The charts show the newest 200 of the 1100 rounds" in document
        assert "The table shows the newest 1000 of the 1100 rounds" in document
        assert len(document) < 2_000_000

        with fed.admin_channel() as ch:
            admin = pb_grpc.AdminStub(ch)
            page = admin.ListRounds(pb.ListRoundsRequest(), timeout=30)
            assert [r.round for r in page.rounds] == list(range(1001, 1101))
            assert page.next_before_round == 1001
            last = admin.ListRounds(pb.ListRoundsRequest(limit=500, before_round=101), timeout=30)
            assert [r.round for r in last.rounds] == list(range(1, 101)) and last.next_before_round == 0
            with pytest.raises(grpc.RpcError) as err:
                admin.ListRounds(pb.ListRoundsRequest(limit=501), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        fed.stop_all()
