"""Turn what a user passes as ``trainer=`` into the ``package.module:object`` a node imports.

Node processes are separate Python interpreters: they cannot receive a class
or an object from the caller, they import it by its module path, exactly as
``[trainer] plugin`` does on a real member. So a trainer given as a class, a
function or an instance must be reachable by name from a module file. What
lives only in ``__main__`` (a script run directly, a notebook, the REPL) or
inside a function cannot be, and is refused here with the fix, before any
key or process is made.

The folder the module was found in (a script's folder, a notebook's working
directory, a ``python_path`` entry) is handed to the nodes as their
``[trainer] python_path``, so a module next to the user's script just works;
an installed package needs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherhive.runtime.errors import UserError

IMPORT_RULE = (
    "node processes import the trainer by its module path, so it must be defined at the top level of "
    "a module file (not in __main__, a notebook cell or a function)"
)


class PluginError(UserError, ValueError):
    """The trainer cannot be named so that node processes can import it; the message says why."""


@dataclass(frozen=True)
class PluginRef:
    #: ``package.module:object`` for ``[trainer] plugin``.
    spec: str
    #: Folders the nodes must put on ``sys.path`` to import it (absolute).
    python_path: list[str]


def plugin_ref(trainer: Any, python_path: Sequence[str | Path] = ()) -> PluginRef:
    """``trainer`` (a "pkg.mod:obj" string, or a class, function or instance) as a PluginRef.

    ``python_path`` folders are searched first, as the nodes will search them.
    """
    folders = [str(Path(f).resolve()) for f in python_path]
    spec = trainer if isinstance(trainer, str) else _spec_of(trainer)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(
            f"trainer {spec!r} must look like 'package.module:object' (e.g. 'my_trainer:MyTrainer')"
        )
    if module_name == "__main__":
        raise PluginError(_main_message(attr))
    root = _import_root(module_name, folders)
    if root and root not in folders:
        folders.append(root)
    return PluginRef(spec, folders)


def _spec_of(obj: Any) -> str:
    """The ``module:name`` of a class, function or module-level instance."""
    if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")):
        module, name = obj.__module__, obj.__qualname__
        if module == "__main__":
            raise PluginError(_main_message(name))
        if "<locals>" in name or "." in name:
            raise PluginError(
                f"trainer {name!r} is defined inside a function or class of {module}; {IMPORT_RULE}: "
                "move it to the module's top level"
            )
        _check_attribute(module, name, obj)
        return f"{module}:{name}"
    module = type(obj).__module__
    found = [k for k, v in vars(sys.modules.get(module, object())).items() if v is obj]
    if module == "__main__" or not found:
        raise PluginError(
            f"the trainer instance of {type(obj).__qualname__} is not bound to a name in an importable "
            f"module; {IMPORT_RULE}: pass its class with options=, or a 'module:name' string naming a "
            "module-level instance"
        )
    return f"{module}:{found[0]}"


def _check_attribute(module: str, name: str, obj: Any) -> None:
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PluginError(
            f"trainer {module}:{name} cannot be imported again by name ({exc}); {IMPORT_RULE}"
        ) from exc
    if found is not obj:
        raise PluginError(
            f"{module}:{name} names another object than the trainer given (was it redefined or reloaded?); "
            "pass the 'module:name' string instead"
        )


def _main_message(name: str) -> str:
    return (
        f"trainer {name!r} is defined in __main__ (the script you ran, a notebook or the REPL); "
        f"{IMPORT_RULE}. "
        f"Move it into a module file, e.g. my_trainer.py beside your script or notebook, and import it "
        f"from there (from my_trainer import {name}), or pass trainer='my_trainer:{name}'"
    )


def _import_root(module_name: str, folders: list[str]) -> str:
    """The folder the top-level package of ``module_name`` was found in, if the nodes need it.

    Empty for an installed package (site-packages is on every node's path) and for a package
    whose files are mapped elsewhere (an editable install): the nodes find those by themselves.
    """
    added = [f for f in folders if f not in sys.path]
    sys.path[:0] = added
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise PluginError(_not_found(module_name, folders, f": {exc}")) from exc
    finally:
        for folder in added:
            sys.path.remove(folder)
    if spec is None:
        raise PluginError(_not_found(module_name, folders, ""))
    top = module_name.split(".")[0]
    if top == "cipherhive":
        return ""  # the nodes run cipherhive: its own trainers never need a path
    top_spec = importlib.util.find_spec(top) if "." in module_name else spec
    if top_spec is None:
        return ""
    if top_spec.submodule_search_locations:
        root = Path(next(iter(top_spec.submodule_search_locations))).parent
    elif top_spec.origin:
        root = Path(top_spec.origin).parent
    else:
        return ""
    if not ((root / top).is_dir() or (root / f"{top}.py").is_file()):
        return ""
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    return "" if str(root) in installed else str(root.resolve())


def _not_found(module_name: str, folders: list[str], detail: str) -> str:
    where = f" and in {', '.join(folders)}" if folders else ""
    return (
        f"cannot import trainer module {module_name!r}{detail} (looked on this Python's sys.path{where}); "
        "put the module file in the current directory or in a folder given as python_path "
        "(cipherhive simulate --python-path DIR), or pip install it into this environment"
    )
