"""Which of cipherhive's optional extras are installed, and the pip command that adds a missing one.

The bare package is what the aggregator server, `ctl`, `keygen` and `certs` run on, so an
operator's install carries no PyTorch. Commands that train (`node`, `demo`, `simulate`, `bench`)
need the `node` extra; checking for it before they import anything turns a ModuleNotFoundError
deep in an import chain into one line that names what is missing and how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from cipherhive.runtime.errors import UserError

#: Import name -> distribution name of each extra's packages (pyproject.toml's extras; `lora`
#: builds on `node`, as its entry `cipherhive[node]` there says).
EXTRA_MODULES: dict[str, dict[str, str]] = {
    "node": {"torch": "torch", "sklearn": "scikit-learn", "opacus": "opacus", "safetensors": "safetensors"},
    "lora": {"transformers": "transformers", "peft": "peft", "tokenizers": "tokenizers"},
}
#: The extras an extra builds on.
BUILDS_ON: dict[str, tuple[str, ...]] = {"lora": ("node",)}


class MissingExtra(UserError):
    """A command needs an extra this environment lacks (the CLI prints it and exits 2)."""


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` (and of the extras it builds on) that cannot be imported.

    ``find_spec`` looks a module up without importing it, so the check costs no import time.
    """
    names: list[str] = []
    for part in (*BUILDS_ON.get(extra, ()), extra):
        names += [
            dist for module, dist in EXTRA_MODULES[part].items() if importlib.util.find_spec(module) is None
        ]
    return names


def _checkout() -> tuple[Path, bool] | None:
    """The local folder cipherhive was installed from, and whether editable; None if unknown.

    pip records it in the installed distribution's direct_url.json (PEP 610); a folder that no
    longer holds the package's constraints.txt (a container's build stage) does not count.
    """
    try:
        text = metadata.distribution("cipherhive").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = urlparse(str(info.get("url", "")))
    if url.scheme != "file":
        return None
    folder = Path(unquote(url.path))
    if not (folder / "pyproject.toml").is_file() or not (folder / "constraints.txt").is_file():
        return None
    return folder, bool(info.get("dir_info", {}).get("editable", False))


def install_command(extra: str) -> str:
    """The pip command that adds ``extra`` to the environment this Python runs in.

    From the checkout cipherhive was installed from, through its constraints file (the pinned CPU
    torch), editable if it was; otherwise from the package index by name.
    """
    pip = f"{shlex.quote(sys.executable)} -m pip install"
    source = _checkout()
    if source is None:
        return f"{pip} {shlex.quote(f'cipherhive[{extra}]')}"
    folder, editable = source
    target = shlex.quote(f"{folder}[{extra}]")
    return f"{pip} -c {shlex.quote(str(folder / 'constraints.txt'))} {'-e ' if editable else ''}{target}"


def require(extra: str, what: str) -> None:
    """Raise MissingExtra, naming the missing packages and the fix, unless ``extra`` is installed."""
    lacking = missing(extra)
    if lacking:
        raise MissingExtra(
            f"{what} needs cipherhive's {extra!r} extra, and this environment lacks "
            f"{', '.join(lacking)} (the server and `ctl` need none of it); install it with: "
            f"{install_command(extra)}"
        )
