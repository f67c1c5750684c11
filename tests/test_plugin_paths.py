"""A plug-in's relative paths and import path: resolved against the TOML file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from cipherhive.node.config import NodeConfig
from cipherhive.node.trainer import TrainerError, load_trainer
from cipherhive.runtime import config

PLUGIN = """
from pathlib import Path

import torch
from torch import nn

from cipherhive.node.trainer import TrainResult


class Reader:
    def __init__(self, labels: str = "", data_dir: str = "", weights: str = "") -> None:
        self.labels = labels
        self.data_dir = data_dir
        if weights:
            Path(weights).read_bytes()

    def build_model(self):
        return nn.Linear(2, 2)

    def train(self, model, info):
        return TrainResult(num_samples=1)
"""


def _node_toml(folder: Path, trainer: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    path.write_text(
        '[node]\nserver = "127.0.0.1:1"\ninsecure = true\nname = "n"\n\n[trainer]\n' + trainer,
        encoding="utf-8",
    )
    return path


def _load(path: Path) -> NodeConfig:
    return config.load(NodeConfig, argparse.Namespace(config=path), environ={})


def test_path_named_options_are_relative_to_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    folder = tmp_path / "member"
    toml = _node_toml(
        folder,
        'plugin = "x:y"\npython_path = ["plugins", "/opt/shared"]\n'
        'options = { data_dir = "data", labels = "cat,dog", seed = 3, off_dir = "", '
        'abs_file = "/etc/hosts", home_path = "~/m.pt", shards_file = ["a.csv", "/b.csv"], '
        'data_kwargs = { root_dir = "../shared", batch = 4 } }\n',
    )
    cfg = _load(toml)
    base = folder.resolve()
    assert cfg.python_path == [str(base / "plugins"), "/opt/shared"]
    assert cfg.options == {
        "data_dir": str(base / "data"),
        "labels": "cat,dog",  # not path-named: passed as written
        "seed": 3,
        "off_dir": "",  # empty means "off", never a folder
        "abs_file": "/etc/hosts",
        "home_path": os.path.expanduser("~/m.pt"),
        "shards_file": [str(base / "a.csv"), "/b.csv"],
        "data_kwargs": {"root_dir": str(base / ".." / "shared"), "batch": 4},
    }


def test_python_path_makes_a_plugin_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "member" / "plugins").mkdir(parents=True)
    (tmp_path / "member" / "plugins" / "cipherhive_reader_plugin.py").write_text(PLUGIN, encoding="utf-8")
    toml = _node_toml(
        tmp_path / "member", 'plugin = "cipherhive_reader_plugin:Reader"\npython_path = ["plugins"]\n'
    )
    cfg = _load(toml)
    with pytest.raises(TrainerError, match=r"add its folder to \[trainer\] python_path"):
        load_trainer(cfg.plugin, cfg.options)
    trainer = load_trainer(cfg.plugin, cfg.options, cfg.python_path)
    assert type(trainer).__name__ == "Reader"


def test_a_missing_file_names_the_plugin_the_option_and_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cipherhive_reader_plugin2.py").write_text(PLUGIN, encoding="utf-8")
    with pytest.raises(TrainerError) as caught:
        load_trainer("cipherhive_reader_plugin2:Reader", {"weights": "models/w.pt"})
    message = str(caught.value)
    assert message.startswith("plug-in cipherhive_reader_plugin2:Reader: No such file or directory")
    assert "option 'weights' ('models/w.pt')" in message
    assert f"read from the working directory, here {tmp_path}" in message
    assert "_path, _dir or _file" in message
