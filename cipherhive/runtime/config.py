"""Configuration for the daemons: a TOML file, overridden by environment, overridden by flags.

Each daemon declares one flat dataclass whose fields carry their TOML section
and help text; this module derives the command-line flags
(``--min-participants``), the environment variables
(``CIPHERHIVE_ROUNDS_MIN_PARTICIPANTS``) and the TOML keys
(``[rounds] min_participants``) from it, so the three can never drift apart,
and the reference table in docs/reference/configuration.md is generated from the same source.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from cipherhive.runtime.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration value that is missing, mistyped or out of range."""


def setting(
    default: Any,
    section: str,
    help: str,
    relative: typing.Callable[[Any, Path], Any] | None = None,
    **kw: Any,
) -> Any:
    """Declare one configuration field.

    ``relative(value, folder)`` makes a value read from a TOML file relative to that file's
    folder, for settings that are not a plain ``Path`` but hold paths (tables, lists).
    """
    meta: dict[str, Any] = {"section": section, "help": help}
    if relative is not None:
        meta["relative"] = relative
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _field_type(cls: type, field: dataclasses.Field[Any]) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def env_name(field: dataclasses.Field[Any]) -> str:
    return f"CIPHERHIVE_{field.metadata['section']}_{field.name}".upper()


def flag_name(field: dataclasses.Field[Any]) -> str:
    return "--" + field.name.replace("_", "-")


def _convert(value: Any, tp: Any, where: str) -> Any:
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if tp is Path:
            return Path(os.path.expanduser(str(value)))
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected a whole number, got {value}")
            return tp(value)
        if typing.get_origin(tp) is dict or tp is dict:
            if not isinstance(value, dict):
                raise ValueError("expected a table")
            return dict(value)
        if typing.get_origin(tp) is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return value


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per field of ``cls`` (defaults left to the loader)."""
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    for field in dataclasses.fields(cls):
        tp = _field_type(cls, field)
        if tp is dict or typing.get_origin(tp) is dict:
            continue  # tables only come from the TOML file
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": None,
            "help": f"{field.metadata['help']} [{env_name(field)}]",
        }
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        parser.add_argument(flag_name(field), **kwargs)


def load(cls: type[T], args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from defaults < TOML file < environment < flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_path: Path | None = getattr(args, "config", None) if args else None
    if config_path is None and environ.get("CIPHERHIVE_CONFIG"):
        config_path = Path(environ["CIPHERHIVE_CONFIG"])
    base = Path.cwd()
    if config_path is not None:
        try:
            document = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {config_path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path} is not valid TOML: {exc}") from exc
        base = config_path.resolve().parent
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        home = {name: f.metadata["section"] for name, f in known.items()}
        for section, table in document.items():
            if not isinstance(table, dict):
                raise ConfigError(_outside_sections(config_path, section, home))
            if section not in home.values():
                raise ConfigError(_unknown_section(config_path, section, home))
            for key, value in table.items():
                if home.get(key) != section:
                    raise ConfigError(_unknown_key(config_path, section, key, home))
                values[key] = (value, f"{config_path} [{section}] {key}")
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = env_name(field)
        if name in environ:
            values[field.name] = (environ[name], f"environment {name}")
        flag_value = getattr(args, field.name, None) if args else None
        if flag_value is not None:
            values[field.name] = (flag_value, f"flag {flag_name(field)}")
    converted: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in values:
            raw, where = values[field.name]
            value = _convert(raw, _field_type(cls, field), where)
            from_file = config_path is not None and where.startswith(str(config_path))
            if isinstance(value, Path) and not value.is_absolute() and from_file:
                value = base / value  # paths in a file are relative to the file
            elif from_file and field.metadata.get("relative") is not None:
                value = field.metadata["relative"](value, base)
            converted[field.name] = value
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


# ---------------------------------------------------------------- names the file does not know
# A misspelt key would otherwise be one more round of reading docs/reference/configuration.md:
# the error names the closest valid spelling (difflib), or the section a valid key belongs in.


#: How alike (difflib's ratio) a name must be to be suggested, and how far behind the closest
#: one a second suggestion may be: "min_participant" suggests min_participants, not max_participants.
_CUTOFF = 0.6
_WINDOW = 0.05


def _closest(name: str, candidates: list[str]) -> list[str]:
    scores = {c: difflib.SequenceMatcher(None, name, c).ratio() for c in candidates}
    best = max(scores.values(), default=0.0)
    close = [c for c, score in scores.items() if score >= max(_CUTOFF, best - _WINDOW)]
    return sorted(close, key=lambda c: -scores[c])[:3]


def _key_hint(key: str, section: str, home: dict[str, str]) -> str:
    """``; did you mean 'k'?``, naming the section of a suggestion that is not ``section``."""
    close = _closest(key, sorted(home))
    if not close:
        return ""
    named = [repr(c) if home[c] == section else f"{c!r} in [{home[c]}]" for c in close]
    return f"; did you mean {' or '.join(named)}?"


def _unknown_section(path: Path, section: str, home: dict[str, str]) -> str:
    sections = sorted(set(home.values()))
    close = _closest(section, sections)
    hint = f"; did you mean {' or '.join(f'[{s}]' for s in close)}?" if close else ""
    if section in home:  # a key written as a table header: [min_participants]
        hint = f"; {section!r} is a key of [{home[section]}], not a section"
    return f"{path}: unknown section [{section}]{hint} (known sections: {', '.join(sections)})"


def _unknown_key(path: Path, section: str, key: str, home: dict[str, str]) -> str:
    where = f"{path}: unknown key {key!r} in [{section}]"
    if key in home:
        return f"{where}; it belongs in [{home[key]}]"
    hint = _key_hint(key, section, home)
    if hint:
        return where + hint
    own = sorted(name for name, s in home.items() if s == section)
    return f"{where} (keys of [{section}]: {', '.join(own)})"


def _outside_sections(path: Path, key: str, home: dict[str, str]) -> str:
    """A key before the first [section] header: say which section it belongs in."""
    where = f"{path}: {key!r} is outside any [section]"
    if key in home:
        return f"{where}; it belongs in [{home[key]}]"
    hint = _key_hint(key, "", home)
    if hint:
        return f"{where} and is not a known key{hint}"
    return f"{where} and is not a known key (known sections: {', '.join(sorted(set(home.values())))})"


def reference(cls: type) -> str:
    """A Markdown table of every setting, for docs/reference/configuration.md."""
    rows = ["| TOML | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else ""
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        table_only = _field_type(cls, field) is dict or typing.get_origin(_field_type(cls, field)) is dict
        flag = "—" if table_only else f"`{flag_name(field)}`"
        env = "— (TOML only)" if table_only else f"`{env_name(field)}`"
        rows.append(
            f"| `[{field.metadata['section']}] {field.name}` | {flag} | {env} | `{default}` | "
            f"{field.metadata['help']} |"
        )
    return "\n".join(rows)
