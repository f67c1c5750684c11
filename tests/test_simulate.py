"""`cipherhive.simulate` and `cipherhive simulate`: the tutorial's example runs as written, and failures say
which plug-in or node failed and where its log is. Real server and node processes, as a user gets them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cipherhive.demo.federation import _toml_value
from cipherhive.demo.plugin_ref import PluginError, plugin_ref
from cipherhive.demo.sim_result import SimulationError
from cipherhive.demo.simulate_cli import node_options
from cipherhive.demo.simulation import check_arguments, simulate
from cipherhive.runtime.errors import UserError
from cipherhive.server.storage.state import State

ROOT = Path(__file__).resolve().parent.parent
# The tutorial that holds the examples and the import rule (moved there from the README).
TUTORIAL = (ROOT / "docs" / "tutorials" / "your-trainer.md").read_text(encoding="utf-8")
CLI = [sys.executable, "-m", "cipherhive"]


def tutorial_example(name: str) -> str:
    """The code block after ``<!-- example: NAME -->`` in the tutorial."""
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```\w*\n(.*?)```", TUTORIAL, re.S)
    assert match, f"docs/tutorials/your-trainer.md has no example block {name!r}"
    return match.group(1)


def fewer_rounds(text: str, old: str, new: str) -> str:
    """The example with fewer rounds (the test budget); fails if the tutorial no longer says ``old``."""
    assert old in text, f"the tutorial's example no longer has {old!r}"
    return text.replace(old, new)


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    (tmp_path / "bc_trainer.py").write_text(tutorial_example("bc_trainer.py"), encoding="utf-8")
    return tmp_path


# ------------------------------------------------------------ the tutorial's example, real processes


@pytest.mark.slow
@pytest.mark.timeout(720)  # above its own 600 s subprocess deadline
def test_tutorial_python_example_runs_as_written(example_dir: Path) -> None:
    script = fewer_rounds(tutorial_example("run_federation.py"), "rounds=3", "rounds=2")
    (example_dir / "run_federation.py").write_text(script, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "run_federation.py"], cwd=example_dir, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["round 1", "round 2"], done.stdout
    assert all("3 participants" in line for line in lines[:2])
    final = re.search(r"global model after round 2: test accuracy (\d\.\d+)", done.stdout)
    assert final, done.stdout
    # The federation learns: the majority class alone scores 0.63 on this test set.
    assert float(final.group(1)) > 0.9
    # Nothing of the temporary federation is left behind.
    assert not list(example_dir.glob("*.log"))


@pytest.mark.slow
@pytest.mark.timeout(720)  # above its own 600 s subprocess deadline
def test_tutorial_command_line_example_runs(example_dir: Path) -> None:
    command = tutorial_example("cli").replace("\\\n", " ").strip()
    command = fewer_rounds(command, "--rounds 3", "--rounds 1")
    argv = shlex.split(command)
    assert argv[0] == "cipherhive"
    done = subprocess.run(
        [*CLI, *argv[1:], "--json"], cwd=example_dir, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["plugin"] == "bc_trainer:BreastCancerTrainer"
    assert result["model_round"] == 1
    (record,) = result["rounds"]
    assert record["participants"] == ["node-1", "node-2", "node-3"]
    # Each node trained on its own shard (--node-options): 426 training examples split in three.
    assert [record["nodes"][n]["samples"] for n in record["participants"]] == [142, 142, 142]
    assert all(record["nodes"][n]["applied"] for n in record["participants"])
    assert all(0.0 <= record["nodes"][n]["metrics"]["accuracy"] <= 1.0 for n in record["participants"])
    # --workdir run/ keeps the export, which the documented loader reads back.
    from cipherhive.node.export import load_export

    exported = load_export(result["model_dir"])
    assert exported.round == 1 and exported.metadata["plugin"] == "bc_trainer:BreastCancerTrainer"
    assert Path(result["model_dir"]) == (example_dir / "run" / "model").resolve()
    assert set(exported.tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ------------------------------------------------------------ failures name the plug-in, the node, the log

FLAKY = """
import torch
from torch import nn

from cipherhive.node.trainer import TrainResult


class FlakyTrainer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    def train(self, model, info):
        if self.fail:
            raise ValueError(f"the data of {info.node_name} is corrupt")
        return TrainResult(num_samples=10)
"""


@pytest.mark.slow
def test_a_failing_trainer_is_named_at_once_with_its_log(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "flaky_trainer.py").write_text(FLAKY, encoding="utf-8")
    with pytest.raises(SimulationError) as caught:
        simulate(
            "flaky_trainer:FlakyTrainer",
            nodes=2,
            rounds=1,
            node_options=[{}, {"fail": True}],
            python_path=[plugins],
            workdir=tmp_path / "run",
        )
    # Found in the node's log, not after the round's deadline (the run's whole timeout, 30 minutes):
    # the run stopped the federation while round 1 was still open, or just after node-2's signed
    # withdrawal failed it (two members, floor two: it cannot be re-formed).
    state = State(tmp_path / "run" / "server-state" / "state.db")
    try:
        row = state.round(1)
    finally:
        state.close()
    assert row is not None, row
    assert (row.state == "open" and row.closed is None) or (
        row.state == "failed" and row.failed_step == "withdraw" and row.culprits == ["node-2"]
    ), row
    message = str(caught.value)
    assert "round 1: node-2 could not take part" in message
    assert "ValueError: the data of node-2 is corrupt" in message
    assert "flaky_trainer:FlakyTrainer" in message
    log = tmp_path / "run" / "node-2.log"
    assert caught.value.log == log and str(log) in message and log.exists()
    assert caught.value.started and caught.value.result is not None
    assert caught.value.result.rounds == []


@pytest.mark.slow
def test_a_node_whose_own_options_break_its_trainer_is_named(tmp_path: Path) -> None:
    (tmp_path / "flaky_trainer.py").write_text(FLAKY, encoding="utf-8")
    with pytest.raises(SimulationError) as caught:
        simulate(
            "flaky_trainer:FlakyTrainer",
            nodes=2,
            rounds=1,
            node_options=[{}, {"epochs": 3}],
            python_path=[tmp_path],
            workdir=tmp_path / "run",
        )
    message = str(caught.value)
    assert message.startswith("node-2 stopped (exit 2) in round 1: cipherhive node: error: ")
    assert "does not accept the options ['epochs']" in message
    assert caught.value.log == tmp_path / "run" / "node-2.log" and str(caught.value.log) in message


@pytest.mark.slow
def test_a_plugin_that_cannot_be_imported_stops_before_any_round(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_trainer.py").write_text("import not_a_module_anywhere\n", encoding="utf-8")
    done = subprocess.run(
        [
            *CLI,
            "simulate",
            "--plugin",
            "broken_trainer:Trainer",
            "--python-path",
            str(plugins),
            "--nodes",
            "2",
            "--workdir",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("cipherhive simulate: error: plug-in broken_trainer:Trainer could not be loaded")
    assert "No module named 'not_a_module_anywhere'" in error
    assert f"full output in {tmp_path / 'run' / 'layout.log'}" in error and "python_path" in error


def test_a_missing_module_is_refused_before_anything_starts(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "simulate", "--plugin", "no_such_trainer_module:T", "--rounds", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cannot import trainer module 'no_such_trainer_module'" in done.stderr
    assert f"and in {tmp_path}" in done.stderr and "--python-path" in done.stderr
    assert not done.stdout  # nothing started, nothing printed as if it had


# ------------------------------------------------------------ the import rule


def test_a_class_defined_in_main_is_refused_with_the_fix_the_tutorial_quotes() -> None:
    main_class = type("MyTrainer", (), {"__module__": "__main__", "__qualname__": "MyTrainer"})
    with pytest.raises(PluginError) as caught:
        plugin_ref(main_class)
    assert str(caught.value) in TUTORIAL
    assert "my_trainer.py" in str(caught.value)


def test_a_class_defined_in_a_function_is_refused() -> None:
    def make() -> type:
        class Local:
            pass

        return Local

    with pytest.raises(PluginError, match="inside a function or class"):
        plugin_ref(make())


def test_a_class_in_a_module_file_is_named_by_module_path_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_trainer_mod.py").write_text("class MyTrainer:\n    pass\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_trainer_mod  # type: ignore[import-not-found]

    ref = plugin_ref(my_trainer_mod.MyTrainer)
    assert ref.spec == "my_trainer_mod:MyTrainer"
    assert ref.python_path == [str(tmp_path.resolve())]
    # An installed (here: editable) package needs no folder.
    assert plugin_ref("cipherhive.demo.digits:DigitsTrainer").python_path == []
    # A module-level instance is named by the name it is bound to.
    monkeypatch.setattr(my_trainer_mod, "trainer", my_trainer_mod.MyTrainer(), raising=False)
    assert plugin_ref(my_trainer_mod.trainer).spec == "my_trainer_mod:trainer"


# ------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"nodes": 1}, "nodes must be 2 to"),
        ({"rounds": 0}, "rounds must be at least 1"),
        ({"timeout": 0.0}, "timeout must be a positive number of seconds"),
        ({"node_options": [{}]}, "node_options has 1 entries for 3 nodes"),
        ({"options": {"a": {"b": None}}}, "option 'a.b' is None/null"),
        ({"trainer": "no_colon"}, "must look like 'package.module:object'"),
    ],
)
def test_bad_arguments_say_what_to_change(kwargs: dict[str, Any], fragment: str) -> None:
    args: dict[str, Any] = {
        "trainer": "cipherhive.demo.digits:DigitsTrainer",
        "nodes": 3,
        "rounds": 2,
        "options": None,
        "node_options": None,
        "python_path": (),
        **kwargs,
    }
    with pytest.raises(SimulationError, match=re.escape(fragment)) as caught:
        check_arguments(**args)
    assert not caught.value.started


def test_a_workdir_with_an_earlier_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node-1-state").mkdir()
    with pytest.raises(
        SimulationError, match="already holds an earlier run's state \\(node-1-state\\)"
    ) as caught:
        simulate("cipherhive.demo.digits:DigitsTrainer", nodes=2, rounds=1, workdir=tmp_path)
    assert not caught.value.started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-1-state"]  # nothing was written


def test_path_options_are_resolved_against_the_callers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _, common, own = check_arguments(
        "cipherhive.demo.digits:DigitsTrainer",
        2,
        1,
        {"data_dir": "data", "labels": "a,b"},
        [{"weights_file": "w.pt"}, {}],
        (),
    )
    assert common == {"data_dir": str(tmp_path / "data"), "labels": "a,b"}
    assert own == [{"weights_file": str(tmp_path / "w.pt")}, {}]


def test_node_options_flag_takes_a_list_or_one_object_per_node() -> None:
    assert node_options(['[{"shard": 0}, {"shard": 1}]'], 2) == [{"shard": 0}, {"shard": 1}]
    assert node_options(['{"shard": 0}', '{"shard": 1}'], 2) == [{"shard": 0}, {"shard": 1}]
    assert node_options([], 2) is None
    with pytest.raises(UserError, match="2 entries for --nodes 3"):
        node_options(['{"shard": 0}', '{"shard": 1}'], 3)
    with pytest.raises(UserError, match="not valid JSON"):
        node_options(["{shard: 0}"], 1)


def test_any_json_option_becomes_valid_toml() -> None:
    import tomllib

    value = {"a b": [1, 2.5, 'q"uo\\te\n\x7f é'], "nested": {"flag": True, "list": []}}
    assert tomllib.loads(f"options = {_toml_value(value)}")["options"] == value


# ------------------------------------------------------------ the digits demo is one use of simulate


@pytest.mark.slow
@pytest.mark.timeout(720)  # above its own 600 s subprocess deadline
def test_demo_json_output_and_flags_still_work(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *CLI,
            "demo",
            "--json",
            "--nodes",
            "2",
            "--rounds",
            "1",
            "--epochs",
            "1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    (row,) = result["rounds"]
    assert row["round"] == 1 and row["participants"] == 2
    assert row["max_abs_error"] < 1e-6 and 0.0 < row["accuracy"] == result["final_accuracy"]
    assert result["errors"] == [] and result["nodes"] == 2
    assert (tmp_path / "records" / "round-1").is_dir() and (tmp_path / "model" / "cipherhive.json").exists()


def test_simulate_shows_the_federated_evaluation_every_member_decrypted(tmp_path: Path) -> None:
    """A trainer with evaluate(): each round's record carries the federation-wide validation of
    the round's base model, the same on every node, and the command prints it."""
    result = simulate(
        "cipherhive.demo.digits:DigitsTrainer",
        nodes=3,
        rounds=2,
        options={"epochs": 1, "shards": 3},
        node_options=[{"shard": i} for i in range(3)],
        workdir=tmp_path / "run",
    )
    first, second = result.rounds
    for record, base in ((first, 0), (second, 1)):
        evaluation = record.federated_eval
        assert evaluation["of_round"] == base and evaluation["examples"] > 0, evaluation
        assert 0.0 <= evaluation["accuracy"] <= 1.0 and evaluation["loss"] > 0
        assert all(n.federated_eval == evaluation for n in record.nodes.values()), record.nodes
    assert second.federated_eval["accuracy"] > first.federated_eval["accuracy"], "round 1 trained the model"
    assert result.to_dict()["rounds"][1]["federated_eval"] == second.federated_eval
