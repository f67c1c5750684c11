"""The package is ruff- and mypy-clean, and the generated protobuf code is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _import_tree(tmp_path: Path) -> Path:
    """Lay the repository out under its import names so mypy sees `cipherhive.*`."""
    top = tmp_path / "cipherhive"
    top.mkdir()
    for source in (ROOT / "cipherhive").iterdir():
        if source.suffix in (".py", ".typed") or (source / "__init__.py").exists():
            (top / source.name).symlink_to(source, target_is_directory=source.is_dir())
    for folder in ("server", "node", "demo", "ctl", "bench"):
        (top / folder).symlink_to(ROOT / folder, target_is_directory=True)
    (top / "v1").symlink_to(ROOT / "proto" / "cipherhive" / "v1", target_is_directory=True)
    return tmp_path


def test_generated_protobuf_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_clean(tmp_path: Path) -> None:
    tree = _import_tree(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "-p",
            "cipherhive",
        ],
        capture_output=True,
        text=True,
        cwd=tree,
        timeout=240,  # about 30 s with a cold cache; under the test's own 300 s limit
    )
    assert result.returncode == 0, result.stdout + result.stderr
