"""`cipherhive bench` runs end to end and reports every figure (timings are never asserted)."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from cipherhive.bench import run as bench_run
from cipherhive.bench.options import add_bench_arguments, parse_count
from cipherhive.bench.run import FIGURES, PHASES

pytestmark = pytest.mark.slow


def test_parse_count() -> None:
    assert parse_count("1M") == 1_000_000
    assert parse_count("2.5k") == 2500
    assert parse_count("100") == 100
    for bad in ("", "M", "-3", "1X"):
        with pytest.raises(Exception, match="count"):
            parse_count(bad)


@pytest.mark.timeout(720)  # above its own 600 s subprocess deadline
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
    # A masked round's sum is Σ c0 alone: 8 bytes per value down too (cipherhive.ckks.c0_sum).
    assert 8.0 <= ours["download_bytes_per_param_sample"] < 8.1
    assert 16.0 < report["modes"]["unmasked"]["download_bytes_per_param_sample"] < 16.1
    # Where the time goes : every phase of the round, in every mode, and CPU per process.
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


# ------------------------------------------------------------ secrets and the temporary folder

#: The smallest real run: one mode, two nodes, one round.
SMALL = ["--params", "8192", "--sample", "8192", "--nodes", "2", "--rounds", "1", "--modes", "plaintext"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _bench(*extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "cipherhive", "bench", *SMALL, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_bench_writes_every_secret_at_0600_and_keeps_a_given_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "bench"
    assert set(_bench("--workdir", str(workdir))["modes"]) == {"plaintext"}
    keydir = workdir / "keys"
    # The federation's secret context and the tenseal-vector baseline's (the secret key of each).
    assert _mode(keydir / "secret.ctx") == 0o600
    assert _mode(keydir / "tenseal-secret.ctx") == 0o600
    assert _mode(keydir / "public.ctx") == 0o644 and _mode(keydir / "tenseal-public.ctx") == 0o644
    # Every private key of the run's federation: the CA's, the server's, the nodes' and the operator's.
    private_keys = list(workdir.rglob("*.key"))
    assert len(private_keys) >= 4, private_keys
    assert {p.name: _mode(p) for p in private_keys} == {p.name: 0o600 for p in private_keys}


def test_bench_without_workdir_leaves_no_folder(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    _bench(env=dict(os.environ, TMPDIR=str(scratch)))
    assert not list(scratch.glob("cipherhive-bench-*"))


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_bench_removes_its_folder_on_error_and_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    """The first measurement is cut short (Ctrl-C, or a failure): the folder with the keys goes."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: dict[str, Any] = {}

    def cut_short(mode: str, keydir: Path, *rest: Any) -> dict[str, float]:
        seen["workdir"] = keydir.parent
        seen["modes"] = {p.name: _mode(p) for p in keydir.iterdir()}
        raise error("cut short")

    monkeypatch.setattr(bench_run, "in_process", cut_short)
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    with pytest.raises(error, match="cut short"):
        bench_run.run(parser.parse_args(SMALL))
    assert seen["workdir"].parent == tmp_path and seen["workdir"].name.startswith("cipherhive-bench-")
    assert seen["modes"]["secret.ctx"] == 0o600 and seen["modes"]["tenseal-secret.ctx"] == 0o600
    assert not seen["workdir"].exists()
    assert not list(tmp_path.glob("cipherhive-bench-*"))


# ------------------------------------------------------------ one hostile member (cipherhive.bench.hostile)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hostile_bench_smoke_json(tmp_path: Path) -> None:
    """A baseline and one behaviour for twelve seconds each: figures that add up, the settings
    beside them, the hostile member named, and no folder left behind."""
    from cipherhive.bench.hostile import render

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cipherhive.bench.hostile",
            "--minutes",
            "0.2",
            "--train-seconds",
            "1",
            "--behaviours",
            "refuse-roster",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        env=dict(os.environ, TMPDIR=str(scratch)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    settings = report["settings"]
    assert settings["minutes"] == 0.2 and settings["floor"] == 3 and settings["timeout_seconds"] > 0
    assert set(report["runs"]) == {"refuse-roster"}
    baseline, hostile = report["baseline"], report["runs"]["refuse-roster"]
    for figures in (baseline, hostile):
        assert figures["opened"] >= 1, figures
        assert figures["published"] + figures["failed"] + figures["withdrawn"] <= figures["opened"], figures
        assert figures["share_published"] == pytest.approx(figures["published"] / figures["opened"])
        assert figures["mean_round_seconds"] > 0 and figures["seconds"] > 0, figures
        assert figures["honest_named"] == {} and figures["member_errors"] == [], figures
    # Present and honest in the baseline: in every roster, never named.
    assert baseline["published"] >= 1 and baseline["scripted_in_roster"] == baseline["opened"], baseline
    assert baseline["scripted_named"] == 0, baseline
    # Refusing its first roster gets it named (and left out of the next rounds).
    assert hostile["scripted_in_roster"] >= 1 and hostile["scripted_named"] >= 1, hostile
    assert hostile["share_vs_baseline"] == pytest.approx(
        hostile["share_published"] / baseline["share_published"]
    )
    text = render(report)
    assert "share published" in text and "refuse-roster:" in text and "timeout_seconds" in text
    assert not list(scratch.glob("cipherhive-hostile-*"))


# ------------------------------------------------------------ member-level DP noise (bench.dp_noise)


@pytest.mark.timeout(120)
def test_dp_noise_bench_smoke_json() -> None:
    """The noise benchmark on a small update, pinned to one core: both samplers' figures."""
    from cipherhive.bench.dp_noise import render

    small = ["--values", "20k", "--reference-values", "300", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "cipherhive.bench.dp_noise", *small],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["values"] == 20_000 and figures["reference_values"] == 300
    assert len(figures["cores"]) == 1
    for key in ("reference_us_per_value", "vector_us_per_value", "vector_seconds", "noised_integers_seconds"):
        assert figures[key] > 0, key
    assert figures["goal_seconds"] == pytest.approx(0.04)
    text = render(figures)
    assert "reference sampler" in text and "vectorised sampler" in text and "µs/value" in text
