"""Helpers the ready-made trainers share: resolving "package.module:callable" options, patterns, seeds.

Trainer options arrive from a TOML table (or a flag / environment variable),
so anything richer than a number or a string is named, not passed: a model
or data factory is an import path, and a list of patterns may also be
written as one comma-separated string.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch

from cipherhive.node.trainer import TrainerError


def import_object(spec: str, what: str) -> Any:
    """Import ``package.module:attribute`` (``what`` names the option in error messages)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TrainerError(f"{what} {spec!r} must look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TrainerError(f"{what}: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise TrainerError(f"{what}: {module_name!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise TrainerError(f"{what}: {spec} is not callable")
    return obj


def call_with(fn: Callable[..., Any], what: str, kwargs: dict[str, Any], offered: dict[str, Any]) -> Any:
    """Call ``fn(**kwargs, **offered)``, passing only the ``offered`` names its signature accepts.

    ``offered`` holds what the node knows (shard, shards, seed); a data factory
    that has no use for, say, ``shard`` need not declare it.
    """
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass only what was asked for
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in offered.items() if k not in kwargs and (takes_any or k in params)}
    try:
        return fn(**kwargs, **extra)
    except TypeError as exc:
        raise TrainerError(
            f"{what} does not accept the arguments {sorted({**kwargs, **extra})}: {exc}"
        ) from exc


def patterns(value: str | Sequence[str], what: str) -> list[str]:
    """A list of glob patterns from a list or a comma-separated string (TOML or a flag)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [str(p).strip() for p in items if str(p).strip()]
    if not out:
        raise TrainerError(f"{what} names no tensor patterns")
    return out


def select(
    candidates: Iterable[tuple[str, torch.Tensor]], globs: Sequence[str], what: str
) -> list[tuple[str, torch.Tensor]]:
    """The candidates whose name matches any glob, in candidate order; every glob must match one."""
    items = list(candidates)
    unmatched = [g for g in globs if not any(fnmatchcase(name, g) for name, _ in items)]
    if unmatched:
        sample = ", ".join(name for name, _ in items[:6])
        raise TrainerError(
            f"{what}: pattern(s) {unmatched} match no trainable tensor (candidates look like: {sample} …)"
        )
    return [(name, t) for name, t in items if any(fnmatchcase(name, g) for g in globs)]


def round_seed(seed: int, round_number: int, shard: int) -> int:
    """A different, reproducible seed per (federation seed, round, member) for shuffling and dropout."""
    return (seed * 1_000_003 + round_number * 7919 + shard * 104_729) % (2**63)
