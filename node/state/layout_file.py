"""`cipherhive node layout`: the model layout a node would join with, as a JSON file for the operator.

The operator pins the federation's layout (`cipherhive ctl federation init
--layout layout.json`, or ``[federation] layout`` in server.toml) from this
file; it is built exactly as the daemon builds it (the same trainer plug-in,
options and base model), so the node's Join matches it. It includes the
fingerprint of the initial model's values (:mod:`cipherhive.node.state.initial`), keyed
with the federation's secret context, which is why it runs on a member: the file
reveals nothing the server could test a guess against. No checkpoint is read, no
data beyond what ``build_model`` needs, and nothing secret is written.
"""

from __future__ import annotations

from pathlib import Path

from cipherhive.federation.layout import Layout
from cipherhive.node.config import NodeConfig
from cipherhive.node.state.initial import fingerprint_key, initial_model_hash
from cipherhive.node.trainer import federated_tensors, load_trainer
from cipherhive.node.training.update import layout_of
from cipherhive.runtime.errors import UserError
from cipherhive.runtime.fsutil import atomic_write


def node_layout(config: NodeConfig) -> Layout:
    """The layout the daemon (``Node.__init__``) derives from this configuration."""
    key = member_fingerprint_key(config)
    trainer = load_trainer(config.plugin, config.options, config.python_path)
    model = trainer.build_model()
    tensors = federated_tensors(trainer, model)
    base_hash_fn = getattr(trainer, "base_model_hash", None)
    return layout_of(tensors, base_hash_fn() if base_hash_fn else "", initial_model_hash(key, tensors))


class FingerprintError(UserError, RuntimeError):
    """The initial model cannot be fingerprinted: the secret context is missing or unusable."""


def member_fingerprint_key(config: NodeConfig) -> bytes:
    """The key of the initial model's fingerprint, or an error saying what to do."""
    try:
        return fingerprint_key(config.secret_context)
    except (OSError, ValueError) as exc:
        raise FingerprintError(
            f"cannot fingerprint the initial model: {exc}. The layout's initial model fingerprint "
            "is keyed with the federation's secret context ([node] secret_context), so run this on "
            "a member, with its node.toml"
        ) from None


def write_layout(config: NodeConfig, out: Path) -> Layout:
    """Write the layout as pretty-printed canonical JSON (the content it is hashed by)."""
    layout = node_layout(config)
    # Checked as the server will check it, so a layout it would refuse fails here first.
    Layout.checked_from_json(layout.pretty(), "the layout of this node's model")
    atomic_write(out, layout.pretty().encode(), mode=0o644)
    return layout
