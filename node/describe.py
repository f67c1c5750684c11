"""`cipherhive node layout`: the model layout a node would join with, as a JSON file for the operator.

The operator pins the federation's layout (`cipherhive ctl federation init
--layout layout.json`, or ``[federation] layout`` in server.toml) from this
file; it is built exactly as the daemon builds it (the same trainer plug-in,
options and base model), so the node's Join matches it. Nothing secret is
read: no key, no checkpoint, no data beyond what ``build_model`` needs.
"""

from __future__ import annotations

from pathlib import Path

from cipherhive.fsutil import atomic_write
from cipherhive.layout import Layout
from cipherhive.node.config import NodeConfig
from cipherhive.node.trainer import federated_tensors, load_trainer
from cipherhive.node.update import layout_of


def node_layout(config: NodeConfig) -> Layout:
    """The layout the daemon (``Node.__init__``) derives from this configuration."""
    trainer = load_trainer(config.plugin, config.options, config.python_path)
    model = trainer.build_model()
    tensors = federated_tensors(trainer, model)
    base_hash_fn = getattr(trainer, "base_model_hash", None)
    return layout_of(tensors, base_hash_fn() if base_hash_fn else "")


def write_layout(config: NodeConfig, out: Path) -> Layout:
    """Write the layout as pretty-printed canonical JSON (the content it is hashed by)."""
    layout = node_layout(config)
    # Checked as the server will check it, so a layout it would refuse fails here first.
    Layout.checked_from_json(layout.pretty(), "the layout of this node's model")
    atomic_write(out, layout.pretty().encode(), mode=0o644)
    return layout
