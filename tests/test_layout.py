"""Guards that keep the repository's layout what the docs say it is.

* every module path and plug-in string the docs name imports;
* the built wheel holds every module of the tree and imports each one from a fresh venv, away
  from the repository (an editable install, or a top-level ``cipherhive/`` folder on the path,
  would hide a subpackage missing from pyproject);
* layering: the daemons never import each other, and the library imports no program except
  from the root CLI, ``__main__`` and the facade.
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
PROGRAMS = ("server", "node", "ctl", "bench", "demo")
# Dotted names in the docs that are not import paths.
NOT_MODULES = {
    "cipherhive.audit",  # the audit trail's logger name
    "cipherhive.json",  # a file name
    "cipherhive.live",  # gRPC health service names (server/daemon.py: LIVE_HEALTH, STANDBY_HEALTH)
    "cipherhive.standby",
    "cipherhive.svc",  # Kubernetes DNS names (cipherhive.svc.cluster.local)
    "cipherhive.svc.cluster.local",
}
BUILD_LEFTOVERS = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _module_files() -> dict[str, Path]:
    """Every module of the source tree by import name, found through pyproject's package-dir
    (a folder with an __init__.py below a mapped folder is a subpackage)."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            folders = [base.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]
            if any(not (f / "__init__.py").exists() for f in folders):
                continue  # not inside a package (e.g. proto/generate.py beside the package)
            name = ".".join((package, *rel.with_suffix("").parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _doc_names() -> set[str]:
    names: set[str] = set()
    for doc in DOCS:
        for match in re.finditer(r"`[^`\n]*`", doc.read_text(encoding="utf-8")):
            for name in re.findall(
                r"(?<![\w.])(cipherhive(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?)", match.group(0)
            ):
                names.add(name)
    return {n for n in names if n.split(":")[0] not in NOT_MODULES}


def _resolve(name: str) -> object:
    """Import ``module`` or ``module:attr``; a dotted ``module.attr`` is tried as both."""
    module, _, attr = name.partition(":")
    if attr:
        found: object = importlib.import_module(module)
        for part in attr.split("."):
            found = getattr(found, part)
        return found
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        parent, _, last = module.rpartition(".")
        return getattr(importlib.import_module(parent), last)


def _round_steps() -> list[str]:
    """The ``module:function`` entries of the round's step table in the masked round's spec."""
    spec = (ROOT / "docs" / "spec" / "masked-round.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- round-steps -->\n(.*?)<!-- /round-steps -->", spec, re.S)
    assert match, "docs/spec/masked-round.md has no round-steps table"
    return re.findall(r"`(cipherhive\.[\w.]+:[\w.]+)`", match.group(1))


def test_every_step_of_the_round_in_the_spec_imports() -> None:
    """The spec's table of a round's steps names real code, on both sides."""
    steps = _round_steps()
    assert any(s.startswith("cipherhive.node.") for s in steps)
    assert any(s.startswith("cipherhive.server.") for s in steps)
    assert len(steps) >= 20
    for step in steps:
        assert callable(_resolve(step)), step


@pytest.mark.parametrize("name", sorted(_doc_names()))
def test_every_path_the_docs_name_imports(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated shims still resolve
        assert _resolve(name) is not None


def test_every_package_of_the_tree_is_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    packages = {name for name, path in _module_files().items() if path.name == "__init__.py"}
    assert packages - listed == set(), "packages missing from pyproject's [tool.setuptools] packages"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_holds_and_imports_every_module(tmp_path: Path) -> None:
    """Build the wheel, install it alone into a fresh venv and import every module from outside
    the repository; the dependencies come from this venv's site-packages on PYTHONPATH, which
    (unlike a site directory) does not run the editable install's path hook."""
    # Build from a copy: setuptools reuses an in-tree build/ folder, which would hide a package
    # dropped from pyproject.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("cipherhive-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {
            n.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            for n in zf.namelist()
            if n.endswith(".py")
        }
    expected = set(_module_files())
    assert expected - in_wheel == set(), "modules of the tree missing from the wheel"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    script = (
        "import importlib, sys, warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import cipherhive\n"
        "assert cipherhive.__file__.startswith(sys.argv[1]), cipherhive.__file__\n"
        "failed = []\n"
        "for name in sys.argv[2:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script, str(target), *sorted(expected)],
        cwd=outside,
        env={"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _imports(path: Path, package: str) -> set[str]:
    """Every cipherhive module ``path`` imports, anywhere in it (type-only imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in found if n == "cipherhive" or n.startswith("cipherhive.")}


def _program(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PROGRAMS else None


def test_layering() -> None:
    """No server↔node imports; the library imports no program but from its entry points."""
    entry_points = {"cipherhive", "cipherhive.cli", "cipherhive.__main__"}
    problems = []
    modules = _module_files()
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        mine = _program(name)
        for target in _imports(path, package):
            theirs = _program(target)
            if name.startswith("cipherhive.v1"):
                continue
            if mine in ("server", "node") and theirs in ("server", "node") and mine != theirs:
                problems.append(f"{name} imports {target}")
            if mine is None and theirs is not None and name not in entry_points:
                problems.append(f"library module {name} imports program module {target}")
    assert problems == [], "\n".join(problems)


#: Where an import cycle is refused (type-only imports included): the server and the library.
ACYCLIC = ("cipherhive",)  # every module: the library, the daemons and the clients


def _import_cycles(prefixes: tuple[str, ...]) -> list[list[str]]:
    """Groups of modules under ``prefixes`` that import each other in a circle (Tarjan's strongly
    connected components): every import counts, in functions and ``if TYPE_CHECKING:`` too."""
    modules = _module_files()

    def inside(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if inside(name):
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            graph[name] = {t for t in _imports(path, package) if t != name and t in modules and inside(t)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_import_cycles() -> None:
    """No module imports itself round a circle, type-only imports included, so each can be read
    (and typed) from the bottom up: a satellite of the round manager gets its ``RoundContext``."""
    assert _import_cycles(ACYCLIC) == []


MAX_MODULES = 15


def test_no_package_holds_more_than_15_modules() -> None:
    """A folder is one concept: past 15 modules it is several, and wants subpackages."""
    counts: dict[str, int] = {}
    for name, path in _module_files().items():
        if path.name != "__init__.py":
            package = name.rpartition(".")[0]
            counts[package] = counts.get(package, 0) + 1
    crowded = {package: n for package, n in counts.items() if n > MAX_MODULES}
    assert crowded == {}, f"packages with more than {MAX_MODULES} modules: {crowded}"


def test_deprecated_shims_still_resolve() -> None:
    """Plug-in strings written for earlier versions keep loading, with a deprecation warning."""
    sys.modules.pop("cipherhive.codec", None)
    with pytest.warns(DeprecationWarning, match="cipherhive.ckks.codec"):
        secret = _resolve("cipherhive.codec:SecretCodec")
    from cipherhive.ckks.codec import SecretCodec

    assert secret is SecretCodec
