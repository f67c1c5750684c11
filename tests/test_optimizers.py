"""Server-side optimizers on the nodes: the paper's update rules, bit-exact determinism, state that
survives checkpoints and rejections, and the server refusing to change the optimizer under history.

The end-to-end check (real server and node processes, FedAdam, bit-identical members, a member
that catches up) is tests/test_optimizer_federation.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cipherhive.ckks import codec, keys
from cipherhive.federation.layout import LEADING_VALUES, Layout, TensorSpec
from cipherhive.federation.optimizer_settings import NAMES, PLAIN_FEDAVG, OptimizerError, OptimizerSpec
from cipherhive.node.state.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from cipherhive.node.sums.checks import CheckedApplier, SumLimits, SumRejected
from cipherhive.node.sums.optimizers import ServerOptimizer, adopt, restored
from cipherhive.runtime.config import ConfigError
from cipherhive.server.config import ServerConfig
from cipherhive.server.rounds.manager import RoundManager
from cipherhive.server.storage.spool import Spool
from cipherhive.server.storage.state import State
from cipherhive.v1 import federation_pb2 as pb

SIZE = 1000


def _deltas(rounds: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, SIZE) for _ in range(rounds)]


def _reference(spec: OptimizerSpec, x: np.ndarray, deltas: list[np.ndarray]) -> np.ndarray:
    """Reddi et al., Algorithm 2 (and heavy-ball FedAvgM), written out per round, float32 state."""
    f32 = np.float32
    m = np.zeros_like(x, dtype=f32)
    v = np.full_like(x, spec.tau * spec.tau, dtype=f32)
    for d in deltas:
        if spec.name == "fedavg":
            step = spec.learning_rate * d
        elif spec.name == "fedavgm":
            m = (spec.beta1 * m.astype(float) + d).astype(f32)
            step = spec.learning_rate * m.astype(float)
        else:
            m = (spec.beta1 * m.astype(float) + (1 - spec.beta1) * d).astype(f32)
            if spec.name == "fedadam":
                v = (spec.beta2 * v.astype(float) + (1 - spec.beta2) * d * d).astype(f32)
            else:
                vv = v.astype(float)
                v = (vv - (1 - spec.beta2) * d * d * np.sign(vv - d * d)).astype(f32)
            step = spec.learning_rate * (m.astype(float) / (np.sqrt(v.astype(float)) + spec.tau))
        x = (x.astype(float) + step).astype(f32)
    return x


def _run(spec: OptimizerSpec, deltas: list[np.ndarray], block: int = SIZE) -> np.ndarray:
    opt = ServerOptimizer(spec, SIZE)
    x = np.linspace(-1, 1, SIZE, dtype=np.float32)
    for d in deltas:
        out = np.empty_like(x)
        for lo in range(0, SIZE, block):
            hi = min(lo + block, SIZE)
            out[lo:hi] = x[lo:hi] + opt.step(lo, hi, d[lo:hi])
        opt.commit()
        x = out
    return x


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_follows_the_paper_and_blocks_do_not_matter(name: str) -> None:
    spec = OptimizerSpec.make(name)
    deltas = _deltas(6)
    whole = _run(spec, deltas)
    expected = _reference(spec, np.linspace(-1, 1, SIZE, dtype=np.float32), deltas)
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-6)
    # Split into blocks of any size (as sums arrive), the result is the same bits.
    assert whole.tobytes() == _run(spec, deltas, block=37).tobytes()
    if name != "fedavg":
        assert not np.array_equal(whole, _run(OptimizerSpec(), deltas)), "the optimizer changed nothing"


def test_fedavg_is_the_plain_average_bit_for_bit() -> None:
    deltas = _deltas(3)
    x = np.linspace(-1, 1, SIZE, dtype=np.float32)
    for d in deltas:
        x = (x + d).astype(np.float32)  # what the applier did before optimizers existed
    assert _run(PLAIN_FEDAVG, deltas).tobytes() == x.tobytes()


_SCRIPT = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.test_optimizers import _deltas, _run
from cipherhive.federation.optimizer_settings import OptimizerSpec
print(hashlib.sha256(_run(OptimizerSpec.make({name!r}), _deltas(5)).tobytes()).hexdigest())
"""


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_another_process_computes_the_same_bits(name: str) -> None:
    """What two members compute: separate interpreters, separately imported numpy."""
    root = str(Path(__file__).resolve().parent.parent)
    script = _SCRIPT.format(root=root, name=name)
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    here = hashlib.sha256(_run(OptimizerSpec.make(name), _deltas(5)).tobytes()).hexdigest()
    assert other.stdout.strip() == here


def test_state_survives_a_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    spec = OptimizerSpec.make("fedadam", 0.05)
    deltas = _deltas(5)
    straight = _run(spec, deltas)
    opt = ServerOptimizer(spec, SIZE)
    x = np.linspace(-1, 1, SIZE, dtype=np.float32)
    for d in deltas[:3]:
        x = (x + opt.step(0, SIZE, d)).astype(np.float32)
        opt.commit()
    write_checkpoint(tmp_path / "c.pt", Checkpoint(3, "h", {"x": torch.from_numpy(x)}, opt.record()))
    saved = read_checkpoint(tmp_path / "c.pt")
    resumed = restored(saved.optimizer, saved.round, SIZE, "test")
    assert resumed.rounds == 3
    y = saved.tensors["x"].numpy().copy()
    for d in deltas[3:]:
        y = (y + resumed.step(0, SIZE, d)).astype(np.float32)
        resumed.commit()
    assert y.tobytes() == straight.tobytes()


def _applier(opt: ServerOptimizer, global_: np.ndarray, out: np.ndarray) -> CheckedApplier:
    limits = SumLimits(floor=2, max_update=1.0, max_participants=8, participants=2)
    return CheckedApplier(global_, out, 400, limits, step=opt.step)


def test_a_rejected_sum_leaves_model_and_moments_untouched() -> None:
    spec = OptimizerSpec.make("fedyogi")
    opt = ServerOptimizer(spec, SIZE)
    global_ = np.zeros(SIZE, dtype=np.float32)
    out = global_.copy()
    good = np.concatenate([[2.0, 2.0], np.full(SIZE, 0.02)])  # Σw = 2, two participants
    applier = _applier(opt, global_, out)
    applier.feed(good[:400])  # the first block passes and is written
    bad = good[400:800].copy()
    bad[5] = 50.0  # a mean update of 25 per value: beyond max_update
    with pytest.raises(SumRejected):
        applier.feed(bad)
    assert np.array_equal(out, global_)
    before = [b.copy() for b in opt.state]
    assert opt.rounds == 0 and all(np.array_equal(a, b) for a, b in zip(before, opt.state, strict=True))
    # The same sum, whole, then applies; the moments move only at commit.
    applier = _applier(opt, global_, out)
    for lo in range(0, SIZE + LEADING_VALUES, 400):
        applier.feed(good[lo : lo + 400])
    applier.finish(3)
    assert all(np.array_equal(a, b) for a, b in zip(before, opt.state, strict=True))
    opt.commit()
    assert not np.array_equal(before[0], opt.state[0]) and opt.rounds == 1


def test_a_node_cannot_follow_another_optimizer_from_history() -> None:
    adam = OptimizerSpec.make("fedadam")
    fresh = ServerOptimizer(PLAIN_FEDAVG, SIZE)
    assert adopt(fresh, adam, 0).spec == adam  # nothing applied yet: start with the federation's
    with pytest.raises(
        OptimizerError, match=r"round 4 was computed with the optimizer fedavg .*empty state_dir"
    ):
        adopt(fresh, adam, 4)
    # A checkpoint from before optimizers (no record) is plain FedAvg, and follows a FedAvg federation.
    assert restored(None, 4, SIZE, "old").spec == PLAIN_FEDAVG
    with pytest.raises(OptimizerError, match="needs 2"):
        restored({"spec": {**vars(adam)}, "rounds": 1, "buffers": []}, 1, SIZE, "cp")


def test_configuration_errors_say_what_is_wrong(tmp_path: Path) -> None:
    base = {"insecure": True, "state_dir": tmp_path}
    with pytest.raises(ConfigError, match="'adam' is not one of fedavg, fedavgm, fedadam, fedyogi"):
        ServerConfig(optimizer="adam", **base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"beta1 = 1.0 must be in \[0, 1\)"):
        ServerConfig(optimizer="fedavgm", beta1=1.0, **base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"tau = -1.0 must be in \(0, 1\]"):
        ServerConfig(optimizer="fedyogi", tau=-1.0, **base)  # type: ignore[arg-type]
    config = ServerConfig(optimizer="FedAdam", **base)  # type: ignore[arg-type]
    assert config.optimizer_spec() == OptimizerSpec("fedadam", 0.01, 0.9, 0.99, 1e-3)
    assert OptimizerSpec.from_proto(config.optimizer_spec().to_proto()) == config.optimizer_spec()


def test_server_refuses_to_change_the_optimizer_once_a_round_is_published(tmp_path: Path) -> None:
    files = keys.keygen(tmp_path / "keys")
    public = codec.PublicCodec(files.public.read_bytes())
    layout = Layout((TensorSpec("w", (10,)),))

    def start(**settings: object) -> RoundManager:
        config = ServerConfig(
            insecure=True,
            state_dir=tmp_path / "state",
            public_context=files.public,
            min_participants=2,
            **settings,  # type: ignore[arg-type]
        )
        return RoundManager(
            config, State(config.state_dir / "state.db"), Spool(config.state_dir), public, "fp"
        )

    m = start(optimizer="fedyogi")
    assert m.settings().optimizer.name == "fedyogi"
    m.state.close()
    m = start(optimizer="fedadam", learning_rate=0.1)  # nothing published: free to change
    assert OptimizerSpec.from_proto(m.settings().optimizer) == OptimizerSpec.make("fedadam", 0.1)
    m.set_layout(layout, actor="test")
    # Publish one round the way the state records it.
    row = m.state.open_round(0, 1e12, ["a", "b"], min_participants=2)
    m.state.finish_round(row.round, state="sum_ready", reason="", participants=2)
    m.state.close()
    with pytest.raises(
        ConfigError, match=r"1 round\(s\) .* applied with fedadam \(η=0.1,.*Set \[optimizer\] back"
    ):
        start(optimizer="fedavg")
    start(optimizer="fedadam", learning_rate=0.1).state.close()  # the same settings: fine


def test_a_node_rolls_its_moments_back_with_the_model(tmp_path: Path) -> None:
    """A real Node (in-process, fake server): apply three FedYogi rounds, reject a hostile sum,
    restart, withdraw rounds: the moments always belong to the model's round."""
    from tests.test_node_state import FakeStub, _honest, _node, _publish, _sum_ready

    files = keys.keygen(tmp_path / "keys")
    yogi = OptimizerSpec.make("fedyogi", 0.05)
    node = _node(files, tmp_path / "state", keep_checkpoints=5)
    node.optimizer = adopt(node.optimizer, yogi, 0)
    stub = FakeStub(node.layout.hash, node.layout.num_values)
    moments: dict[int, list[np.ndarray]] = {0: [b.copy() for b in node.optimizer.state]}
    models: dict[int, np.ndarray] = {0: node.flat.read().copy()}
    for number in (1, 2, 3):
        _publish(files, stub, number, _honest(node, number))
        node._handle(stub, _sum_ready(number, number - 1))  # type: ignore[arg-type]
        assert node.applied_round == number
        moments[number] = [b.copy() for b in node.optimizer.state]
        models[number] = node.flat.read().copy()
    assert not np.array_equal(moments[2][0], moments[3][0])

    def same(number: int) -> bool:
        state = node.optimizer.state
        return all(np.array_equal(a, b) for a, b in zip(moments[number], state, strict=True)) and (
            np.array_equal(node.flat.read(), models[number])
        )

    hostile = np.zeros(node.layout.num_values)
    hostile[0], hostile[1] = -100.0, 1.0
    _publish(files, stub, 4, [*_honest(node, 4), hostile], participants=4)
    node._handle(stub, _sum_ready(4, 3, participants=4))  # type: ignore[arg-type]
    assert node.applied_round == 3 and same(3)  # rejected: model and moments untouched

    node.close()
    node = _node(files, tmp_path / "state", keep_checkpoints=5)  # restart: moments from the checkpoint
    assert node.optimizer.spec == yogi and node.optimizer.rounds == 3 and same(3)
    with pytest.raises(OptimizerError, match="round 3 was computed with the optimizer fedyogi"):
        adopt(node.optimizer, OptimizerSpec.make("fedadam", 0.05), 3)

    node._handle(stub, pb.RoundEvent(kind=pb.RoundEvent.WITHDRAWN, round=3))  # type: ignore[arg-type]
    assert node.applied_round == 2 and same(2)
    node.state.resync = False
    node._handle(stub, pb.RoundEvent(kind=pb.RoundEvent.WITHDRAWN, round=1))  # type: ignore[arg-type]
    assert node.applied_round == 0 and same(0) and node.optimizer.rounds == 0
    node.close()
