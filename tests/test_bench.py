"""`cipherhive bench` runs end to end and reports every figure (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cipherhive.bench.options import parse_count
from cipherhive.bench.run import FIGURES, PHASES

pytestmark = pytest.mark.slow


def test_parse_count() -> None:
    assert parse_count("1M") == 1_000_000
    assert parse_count("2.5k") == 2500
    assert parse_count("100") == 100
    for bad in ("", "M", "-3", "1X"):
        with pytest.raises(Exception, match="count"):
            parse_count(bad)


def test_bench_smoke_json(tmp_path: object) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cipherhive",
            "bench",
            "--params",
            "16384",
            "--sample",
            "16384",
            "--nodes",
            "2",
            "--rounds",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["modes"]) == {"cipherhive", "unmasked", "plaintext", "tenseal-vector"}
    for mode, figures in report["modes"].items():
        for key, _, _ in FIGURES:
            assert key in figures and figures[key] >= 0, (mode, key)
        assert figures["max_abs_error"] < 1e-6, mode
    ours = report["modes"]["cipherhive"]
    assert 8.0 < ours["upload_bytes_per_param_sample"] < 8.1
    # A masked round's sum is Σ c0 alone: 8 bytes per value down too (cipherhive.c0sum).
    assert 8.0 <= ours["download_bytes_per_param_sample"] < 8.1
    assert 16.0 < report["modes"]["unmasked"]["download_bytes_per_param_sample"] < 16.1
    # Where the time goes (issue 14): every phase of the round, in every mode, and CPU per process.
    for mode, figures in report["modes"].items():
        assert set(figures["phases"]) == set(PHASES), mode
        assert figures["phases"]["total"] > 0, mode
    assert report["ingest_goal"]["workers"] >= 1 and report["ingest_goal"]["speedup_all_vs_1"] > 0
    assert report["round_goal"]["ratio"] > 0 and report["round_goal"]["goal"] == 2.2
    masked = report["masked"]
    for members in (3, 8, 16):
        assert masked[f"masked_vs_unmasked_{members}"] > 0.2
    assert 8.0 < masked["masked_upload_bytes_per_value"] < 8.1
    assert masked["c1_rebuild_ms_per_member_per_block"] > 0 and masked["decrypt_ms_per_block"] > 0
    # The table renders every figure (the same report, without --json).
    from cipherhive.bench.run import render

    text = render(report)
    assert "server ingest on" in text and "encrypted (masked) round vs plaintext round" in text
