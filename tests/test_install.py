"""The server role installs without PyTorch and still serves a federation.

An operator installs the bare package (`pip install -c constraints.txt cipherhive`, from a
checkout); torch, scikit-learn, opacus and safetensors come only with the `node` extra. This
installs it into a fresh venv, as a clean machine would (from the package index; pip's cache may
be empty), prints the venv's size on disk and bounds it, checks that none of the node extra is
importable there, and then runs a real `cipherhive server`, `keygen` and `ctl` from that venv
with real nodes from this test's own, full, environment until one round is published.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.v1 import federation_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
#: The server venv as pip leaves it measured 353 MB, 72 MB of it the bytecode pip compiles at
#: install (the server image installs with --no-compile and runs with PYTHONDONTWRITEBYTECODE);
#: scipy, which dp-accounting needs, is 143 MB of it. The node role's measured 1.28 GB, 754 MB of
#: it torch. The goal bounds the installed files without that bytecode; the whole venv's bound
#: leaves room for version bumps, and the import check catches any package of the node extra.
MAX_SERVER_FILES = 300 * MB
MAX_SERVER_VENV = 400 * MB
#: Import names of the node extra's packages and of grpcio-tools (the dev extra's).
NOT_IN_SERVER = ("torch", "sklearn", "opacus", "safetensors", "grpc_tools")
INSTALL_TIMEOUT = 480.0


@dataclass(frozen=True)
class Venv:
    path: Path
    source: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def cipherhive(self) -> Path:
        return self.path / "bin" / "cipherhive"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_lists_every_subpackage() -> None:
    """A non-editable install (a server's, an image's) holds only the packages pyproject lists.

    The editable install tests run from misses none, so a new subpackage folder left out of
    ``packages`` would only fail on an operator's machine: every folder with an __init__.py under
    the package-dir mapping must be listed."""
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = {ROOT / folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for folder, name in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            # A folder mapped to a package of its own is that package's, not a subpackage here.
            if init.parent == folder or init.parent not in folders:
                found.add(".".join([name, *relative.parts]))
    assert found <= set(setuptools["packages"]), sorted(found - set(setuptools["packages"]))


def _env() -> dict[str, str]:
    """This process's environment, less what would point a child at this test's own venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(
    args: list[str | Path], timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
        # Not the checkout's root: `python -c` puts the working directory first on sys.path, and
        # there `cipherhive/` is the source folder, not the venv's package.
        cwd=cwd or Path(os.sep),
        check=False,
    )


def _copy_checkout(dest: Path) -> Path:
    """What pip builds the package from: pyproject.toml's files and its package-dir folders.

    A copy, so the build's by-products (build/, *.egg-info) stay out of the shared work tree."""
    folders = {Path(d).parts[0] for d in _pyproject()["tool"]["setuptools"]["package-dir"].values()}
    dest.mkdir()
    for name in ("pyproject.toml", "constraints.txt", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in sorted(folders):
        shutil.copytree(
            ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]")
        )
    return dest


def _size(path: Path) -> tuple[int, int]:
    """Bytes of every file under ``path`` (symlinks not followed), and of its bytecode caches."""
    total = bytecode = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            size = os.lstat(os.path.join(folder, name)).st_size
            total += size
            if name.endswith(".pyc"):
                bytecode += size
    return total, bytecode


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """A fresh venv with the server role: the bare package from a copy of this checkout."""
    base = tmp_path_factory.mktemp("install")
    source = _copy_checkout(base / "src")
    venv = Venv(base / "venv", source)
    created = _run([sys.executable, "-m", "venv", venv.path])
    assert created.returncode == 0, created.stderr
    install: list[str | Path] = [
        venv.python,
        "-m",
        "pip",
        "install",
        "-q",
        "-c",
        source / "constraints.txt",
        source,
    ]
    print(f"$ {shlex.join(str(a) for a in install)}")
    done = _run(install, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        yield venv
    finally:
        shutil.rmtree(base, ignore_errors=True)  # a few hundred MB: not kept among pytest's last runs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_server_venv_is_small_and_has_no_torch(server_venv: Venv) -> None:
    total, bytecode = _size(server_venv.path)
    print(
        f"server-role venv: {(total - bytecode) / MB:.0f} MB on disk without bytecode (bound "
        f"{MAX_SERVER_FILES / MB:.0f} MB); {total / MB:.0f} MB ({total} bytes) with the "
        f"{bytecode / MB:.0f} MB of bytecode pip compiled (bound {MAX_SERVER_VENV / MB:.0f} MB)"
    )
    assert total - bytecode <= MAX_SERVER_FILES, f"{(total - bytecode) / MB:.0f} MB without bytecode"
    assert total <= MAX_SERVER_VENV

    torch = _run([server_venv.python, "-c", "import torch"])
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stderr
    probe = "import importlib.util, sys; print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    found = _run([server_venv.python, "-c", probe, *NOT_IN_SERVER])
    assert found.returncode == 0 and found.stdout.split() == [], found.stdout + found.stderr

    # The package it runs is the venv's own copy, not this checkout.
    where = _run([server_venv.python, "-c", "import cipherhive.server; print(cipherhive.server.__file__)"])
    assert where.returncode == 0 and where.stdout.startswith(str(server_venv.path)), (
        where.stdout + where.stderr
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_command_without_the_node_extra_says_how_to_install_it(
    server_venv: Venv, tmp_path: Path
) -> None:
    """Exit 2 and one line: what is missing and the pip command that adds it to this venv."""
    # The interpreter the command runs on: the one its script's first line names.
    python = server_venv.cipherhive.read_text(encoding="utf-8").splitlines()[0].removeprefix("#!")
    constraints = shlex.quote(str(server_venv.source / "constraints.txt"))
    fix = (
        f"{shlex.quote(python)} -m pip install -c {constraints} {shlex.quote(f'{server_venv.source}[node]')}"
    )
    for args in (["node", "--config", "node.toml"], ["demo"], ["simulate", "--plugin", "x:Y"]):
        result = _run([server_venv.cipherhive, *args], cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"cipherhive {args[0]}: error: this command needs cipherhive's 'node' extra, and this "
            "environment lacks torch, scikit-learn, opacus, safetensors (the server and `ctl` need none "
            f"of it); install it with: {fix}"
        ), result.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_server_venv_serves_a_round_to_full_nodes(
    server_venv: Venv, tmp_path: Path, stopper: list[LocalFederation]
) -> None:
    """`keygen`, `certs`, `server` and `ctl` from the server venv; nodes from this environment."""
    workdir = tmp_path / "federation"
    keygen = _run([server_venv.cipherhive, "keygen", "--out", workdir / "keys"])
    assert keygen.returncode == 0, keygen.stderr
    ca = _run([server_venv.cipherhive, "certs", "init", "--ca", tmp_path / "spare-ca"])
    assert ca.returncode == 0, ca.stderr

    fed = LocalFederation(workdir, nodes=3, node_options={"epochs": 1}, rounds={"max_rounds": 1})
    stopper.append(fed)
    fed.setup()  # keeps the keys above; the CA, certificates, configs and the pinned layout
    with open(workdir / "server.log", "ab") as log:
        fed.procs["server"] = subprocess.Popen(
            [str(server_venv.cipherhive), "server", "--config", str(workdir / "server.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=workdir,
        )
    fed.wait_serving()
    for i in range(fed.nodes):
        fed.start_node(i)

    admin = workdir / "admin"
    wait = _run(
        [
            server_venv.cipherhive,
            "ctl",
            "--server",
            f"127.0.0.1:{fed.port}",
            "--server-name",
            "localhost",
            "--cert",
            admin / "operator.crt",
            "--key",
            admin / "operator.key",
            "--ca",
            admin / "ca.crt",
            "round",
            "wait",
            "1",
            "--timeout",
            "180",
        ],
        timeout=200,
    )
    logs = "\n".join(f"--- {k}\n{fed.log(k)[-2000:]}" for k in fed.procs)
    assert wait.returncode == 0, wait.stdout + wait.stderr + logs
    info = fed.get_round(1)
    assert info is not None and info.state == pb.ROUND_SUM_READY, logs
    assert info.participants == fed.nodes, info
    codes = fed.stop_all()
    assert all(c in (0, None) for c in codes.values()), (codes, logs)
