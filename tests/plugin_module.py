"""A plug-in module written to a folder and imported from it, as a data scientist's own module
would be (tests of the trainer plug-in interface and of the built-in trainers' options)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


@contextlib.contextmanager
def imported(folder: Path, name: str, source: str) -> Iterator[ModuleType]:
    """``source`` saved as ``folder/name.py`` and imported; forgotten again afterwards."""
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        sys.modules.pop(name, None)
        yield __import__(name)
        sys.modules.pop(name, None)
