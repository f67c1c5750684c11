"""`python -m cipherhive.bench.trace_round --json` traces a real masked round and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cipherhive.bench.trace_round import COLUMNS

pytestmark = pytest.mark.slow


@pytest.mark.timeout(700)  # above its own 600 s subprocess deadline
def test_trace_round_smoke_json(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cipherhive.bench.trace_round", "--json", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["round"] == 2
    window = report["window"]
    assert window["end"] > window["start"]
    # The window's ends come from the trace itself, not from the logs' coarser timestamps.
    assert window["start_source"].startswith("trace:"), window
    assert all(src.startswith("trace:") for src in window["end_sources"].values()), window

    overall = report["overall"]
    figures = overall["figures"]
    for key in COLUMNS:
        assert isinstance(figures[key], int) and figures[key] >= 0, (key, figures)
    assert figures["files"] > 5 and figures["steps"] >= figures["files"], figures
    assert figures["hops"] >= 2, figures  # server -> node -> server at least
    assert any(f.startswith("server/") for f in overall["files"]), overall["files"]
    assert any(f.startswith("node/") for f in overall["files"]), overall["files"]
    assert not any(f.startswith(("tests/", ".venv/")) for f in overall["files"]), overall["files"]
    assert len(overall["steps"]) == figures["steps"]

    for party in ("server", "node-1", "node-2", "node-3"):
        figs = report["parties"][party]["figures"]
        assert figs["files"] >= 1 and figs["steps"] >= figs["files"], (party, figs)
        assert figs["crossings"] < figs["steps"] and figs["returns"] < figs["steps"], (party, figs)
    # Every daemon stopped cleanly and wrote its whole trace (atexit after SIGTERM).
    assert all(code == 0 for code in report["exit_codes"].values()), report["exit_codes"]
    daemons = [p for p in report["processes"] if p["party"]]
    assert {p["party"] for p in daemons} == {"server", "node-1", "node-2", "node-3"}
    assert all(p["complete"] for p in daemons), daemons
    assert (workdir / "trace").is_dir()  # --workdir keeps the run
