"""Which ``[trainer] options`` are paths, and resolving them against the TOML file's folder.

Every path in a TOML file is relative to the file (see the configuration
reference), but a plug-in's options are free-form: the node cannot know that
``data_dir = "data"`` is a folder while ``labels = "cat,dog"`` is not. So
there is a naming convention: an option (at any depth of nested tables) whose
key is ``path``, ``dir`` or ``file`` or ends in ``_path``, ``_dir`` or
``_file`` holds a path (a string, or a list of strings), and a relative one is
resolved against the folder of the TOML file it was written in. Other options
are passed as written; a plug-in that then fails to open a file gets an error
naming itself, the option and the working directory it was read from
(:func:`explain_missing_file`).

``[trainer] python_path`` entries are folders added to ``sys.path`` before the
plug-in is imported, relative to the TOML file too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PATH_KEYS = ("path", "dir", "file")
PATH_SUFFIXES = ("_path", "_dir", "_file")


def is_path_key(key: str) -> bool:
    """True for option names the convention marks as paths."""
    return key in PATH_KEYS or key.endswith(PATH_SUFFIXES)


def _resolve(value: str, base: Path) -> str:
    if not value:
        return value  # "" usually means "off" (e.g. record_dir)
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else base / path)


def resolve_options(options: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of ``options`` with relative path-named values made relative to ``base``."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = resolve_options(value, base)
        elif is_path_key(key) and isinstance(value, str):
            out[key] = _resolve(value, base)
        elif is_path_key(key) and isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = [_resolve(v, base) for v in value]
        else:
            out[key] = value
    return out


def resolve_folders(folders: list[str], base: Path) -> list[str]:
    """``python_path`` entries, relative to ``base`` (the TOML file's folder)."""
    return [_resolve(str(folder), base) for folder in folders]


def _find_option(options: dict[str, Any], filename: str, prefix: str = "") -> str:
    for key, value in options.items():
        if isinstance(value, dict):
            found = _find_option(value, filename, f"{prefix}{key}.")
            if found:
                return found
        elif isinstance(value, str) and value and (value == filename or filename.endswith(value)):
            return f"{prefix}{key}"
    return ""


def explain_missing_file(spec: str, options: dict[str, Any], exc: OSError) -> str:
    """What to tell a person whose plug-in could not open a file named in its options."""
    filename = str(exc.filename or "")
    option = _find_option(options, filename) if filename else ""
    where = f"option {option!r} ({filename!r})" if option else repr(filename or str(exc))
    advice = (
        f"a relative path in an option whose name does not end in {', '.join(PATH_SUFFIXES)} is read "
        f"from the working directory, here {Path.cwd()}: give an absolute path, or name the option "
        "so it ends in _path, _dir or _file to have it resolved against the TOML file's folder"
    )
    if option and is_path_key(option.rsplit(".", 1)[-1]):
        advice = "the path was resolved against the TOML file's folder; check that it exists there"
    return f"plug-in {spec}: {exc.strerror or exc}: {where}; {advice}"
