"""The federation's model layout, pinned by the operator.

The layout decides how many values every round adds, so whoever sets it
sizes the server's work. It used to be fixed by the first node to join, which
let one member lock the real ones out or make the server allocate whatever it
announced. Now only the operator pins it, from ``[federation] layout`` in
server.toml (read at start) or with ``cipherhive ctl federation init``
(Admin.SetLayout); every layout is checked against the bounds in
:mod:`cipherhive.federation.layout` first. It can be replaced or reset only while no
round has been published (and none is open): published sums are tied to it.
The server-side optimizer (``[optimizer]``) is pinned the same way: it may change
only while no round is published (:func:`pin_optimizer`).
"""

from __future__ import annotations

import json
import logging

import grpc

from cipherhive.federation.layout import Layout, LayoutError, describe_difference
from cipherhive.federation.optimizer_settings import PLAIN_FEDAVG, OptimizerSpec
from cipherhive.runtime.config import ConfigError
from cipherhive.runtime.logs import audit, event
from cipherhive.server.rounds.context import RoundContext
from cipherhive.server.rounds.errors import RoundError

log = logging.getLogger("cipherhive.server.rounds")

HOW_TO_PIN = (
    "run `cipherhive node layout --config node.toml --out layout.json` on a member and "
    "`cipherhive ctl federation init --layout layout.json` (or set [federation] layout in server.toml)"
)
NOT_PINNED = f"the operator has not pinned the federation's model layout yet: {HOW_TO_PIN}"


def check_joining(pinned: Layout, layout: Layout) -> None:
    """A joining node must match the pinned shapes and, when one is pinned, the initial model.

    A federation pinned before fingerprints existed has none and admits any initial model,
    as it always did (pin one with a layout file from `cipherhive node layout`).
    """
    if pinned.hash != layout.hash:
        raise RoundError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model layout differs from the federation's: {describe_difference(pinned, layout)}",
        )
    if pinned.initial_model_hash and layout.initial_model_hash != pinned.initial_model_hash:
        raise RoundError(grpc.StatusCode.FAILED_PRECONDITION, describe_difference(pinned, layout))


def _changeable(ctx: RoundContext, what: str) -> None:
    """Refuse to change a pinned layout once sums depend on it, or while a round runs."""
    published = ctx.state.published_count()
    if published:
        raise RoundError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"cannot {what} the layout: {published} round(s) have been published with it, and "
            "their sums only make sense with it; start a new federation (new --state-dir) for another model",
        )
    opened = ctx.state.open_round_row()
    if opened is not None:
        raise RoundError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"cannot {what} the layout while round {opened.round} is open; close it first",
        )


def set_layout(ctx: RoundContext, layout: Layout, replace: bool, actor: str) -> Layout:
    """Pin ``layout`` (already bounds-checked); the same layout again is a no-op."""
    with ctx.lock:
        current = ctx.layout()
        if current is not None and current.same_pin(layout):
            return current
        if current is not None and current.hash == layout.hash and not layout.initial_model_hash:
            return current  # a file without a fingerprint (older `node layout`) keeps the pinned one
        if current is not None and current.hash == layout.hash and not current.initial_model_hash:
            # Adding the initial model's fingerprint to shapes pinned without one: published sums
            # stay valid (same shapes), so this is allowed at any time, and needs no --replace.
            ctx.state.set_meta("layout", layout.pinned_text())
            audit("initial model fingerprint pinned", actor, layout_hash=layout.hash[:16])
            return layout
        if current is not None:
            if not replace and current.hash == layout.hash:
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "another initial model is pinned already (fingerprint "
                    f"{current.initial_model_hash[:12]}…, same shapes); pass --replace to replace it "
                    "(only while no round has been published)",
                )
            if not replace:
                raise RoundError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"another layout is pinned already ({current.hash[:16]}…, {current.num_params} "
                    "values); pass --replace to replace it (only while no round has been published)",
                )
            _changeable(ctx, "replace")
        ctx.state.set_meta("layout", layout.pinned_text())
    audit(
        "layout pinned" if current is None else "layout replaced",
        actor,
        layout_hash=layout.hash[:16],
        params=layout.num_params,
        tensors=len(layout.tensors),
    )
    ctx.wake()
    return layout


def reset_layout(ctx: RoundContext, actor: str) -> None:
    with ctx.lock:
        if ctx.layout() is None:
            return
        _changeable(ctx, "reset")
        ctx.state.delete_meta("layout")
    audit("layout reset", actor)


def pin_configured(ctx: RoundContext) -> None:
    """At start: pin ``[federation] layout`` if set (the file is the operator's word)."""
    path = ctx.config.layout
    if path is None:
        return
    layout = Layout.read_file(path)
    current = ctx.layout()
    if current is None or not current.same_pin(layout):
        try:
            pinned = set_layout(ctx, layout, replace=True, actor=f"server.toml ({path})")
        except RoundError as exc:
            raise LayoutError(f"[federation] layout = {path}: {exc.message}") from None
        event(
            log, "federation layout pinned from the configuration", path=str(path), params=layout.num_params
        )
        current = pinned
    if not current.initial_model_hash:
        event(
            log,
            f"the pinned layout has no initial model fingerprint, so members are not checked for a "
            f"common starting point; write {path} again with `cipherhive node layout` (this version) "
            "and restart, or pin it with `cipherhive ctl federation init --layout`",
            logging.WARNING,
        )


OPTIMIZER_META = "optimizer"


def pinned_optimizer(ctx: RoundContext) -> OptimizerSpec:
    """The optimizer the federation's published rounds were applied with (none stored: FedAvg)."""
    text = ctx.state.get_meta(OPTIMIZER_META)
    if text is None:
        return PLAIN_FEDAVG  # a state directory from before optimizers: its rounds were plain FedAvg
    return OptimizerSpec.from_dict(json.loads(text), "the optimizer in the server's state:")


def pin_optimizer(ctx: RoundContext) -> OptimizerSpec:
    """At start: pin ``[optimizer]``; refused when published rounds were applied with another one.

    Every node applies every published sum with the federation's optimizer, and a node
    that catches up replays old sums: if the optimizer changed after a round was
    published, that node would compute another model than the members who applied the
    sums as they came. So the optimizer may change only while nothing is published.
    """
    wanted = ctx.config.optimizer_spec()
    with ctx.lock:
        current = pinned_optimizer(ctx)
        stored = ctx.state.get_meta(OPTIMIZER_META)
        if stored is not None and current == wanted:
            return wanted
        published = ctx.state.published_count()
        if published and current != wanted:
            raise ConfigError(
                f"[optimizer] asks for {wanted.describe()}, but {published} round(s) of this federation "
                f"were published and applied with {current.describe()}; members that replay them must "
                f"apply them the same way. Set [optimizer] back to {current.describe()}, or start a new "
                "federation (new state_dir) to use another optimizer"
            )
        ctx.state.set_meta(OPTIMIZER_META, wanted.canonical())
    if stored is not None or wanted != PLAIN_FEDAVG:
        audit("optimizer pinned", "server.toml", optimizer=wanted.describe())
    return wanted
