"""One starting point: the federation pins a keyed fingerprint of the initial model's values.

In-process: the fingerprint itself (deterministic, sensitive to one value, keyed with the
federation's secret), the layout file and the server's pin (old pins without a fingerprint
still work, one can be added later, none can be changed under published rounds) and Join.
Against real processes: a member built with another seed is refused at Join and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from cipherhive.ckks import codec, keys
from cipherhive.demo.digits import build_model
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import Layout, LayoutError, TensorSpec
from cipherhive.node.state.initial import PURPOSE, initial_model_hash
from cipherhive.node.training.update import layout_of
from cipherhive.server.config import ServerConfig
from cipherhive.server.rounds.manager import RoundError, RoundManager
from cipherhive.server.storage.spool import Spool
from cipherhive.server.storage.state import State
from cipherhive.v1 import federation_pb2 as pb


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory: pytest.TempPathFactory) -> keys.KeyFiles:
    return keys.keygen(tmp_path_factory.mktemp("keys") / "keys")


def _fingerprint(key: bytes, seed: int) -> tuple[list[tuple[str, torch.Tensor]], str]:
    tensors = list(build_model(seed).named_parameters())
    return tensors, initial_model_hash(key, tensors)


def test_the_fingerprint_follows_the_values_and_the_key(keyfiles: keys.KeyFiles, tmp_path: Path) -> None:
    key = keys.members_key(keyfiles.secret.read_bytes(), PURPOSE)
    tensors, first = _fingerprint(key, 0)
    assert _fingerprint(key, 0)[1] == first  # the same seed, the same fingerprint
    assert _fingerprint(key, 1)[1] != first  # another seed: the shapes match, the values do not
    with torch.no_grad():
        tensors[2][1][5, 7] += 1e-6  # one value, one ulp-scale change
    assert initial_model_hash(key, tensors) != first
    # Keyed: another federation's secret gives another fingerprint of the same model, so the
    # server (no secret key) cannot test a guessed model against it.
    other = keys.keygen(tmp_path / "other")
    assert _fingerprint(keys.members_key(other.secret.read_bytes(), PURPOSE), 0)[1] != first
    # Derived from the key itself, not the file's bytes.
    assert keys.members_key(keyfiles.secret.read_bytes(), PURPOSE) == key
    with pytest.raises(codec.CodecError, match="no secret key"):
        keys.members_key(keyfiles.public.read_bytes(), PURPOSE)


def test_float32_values_decide(keyfiles: keys.KeyFiles) -> None:
    """A float64 copy of the same float32 values has the fingerprint of the float32 model."""
    key = keys.members_key(keyfiles.secret.read_bytes(), PURPOSE)
    tensors, first = _fingerprint(key, 0)
    as64 = [(n, t.detach().double()) for n, t in tensors]
    assert initial_model_hash(key, as64) == first


_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from cipherhive.ckks import keys
from cipherhive.node.state.initial import PURPOSE
from tests.test_initial_model import _fingerprint
print(_fingerprint(keys.members_key(Path({secret!r}).read_bytes(), PURPOSE), 0)[1])
"""


def test_another_process_computes_the_same_fingerprint(keyfiles: keys.KeyFiles) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    script = _SCRIPT.format(root=root, secret=str(keyfiles.secret))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == _fingerprint(keys.members_key(keyfiles.secret.read_bytes(), PURPOSE), 0)[1]


def test_the_layout_carries_it_without_changing_its_hash() -> None:
    plain = Layout((TensorSpec("w", (3, 2)),), "")
    pinned = Layout(plain.tensors, "", "ab" * 32)
    assert pinned.hash == plain.hash  # sums, submissions and checkpoints keep their layout hash
    assert Layout.checked_from_json(pinned.pretty()) == pinned
    assert Layout.checked_from_proto(pinned.to_proto()) == pinned
    assert Layout.from_canonical(pinned.pinned_text()) == pinned
    assert Layout.from_canonical(plain.canonical()) == plain  # a pin stored before fingerprints
    old_file = json.dumps({"tensors": [["w", [3, 2]]], "base_model_hash": ""})
    assert Layout.checked_from_json(old_file) == plain  # a layout.json from before fingerprints
    with pytest.raises(LayoutError, match="initial_model_hash must be empty or 64 lowercase hex"):
        Layout.checked_from_json(json.dumps({"tensors": [["w", [3]]], "initial_model_hash": "abc"}))


LAYOUT = Layout((TensorSpec("w", (10,)),))
OURS = Layout(LAYOUT.tensors, "", "1" * 64)
THEIRS = Layout(LAYOUT.tensors, "", "2" * 64)


def _manager(tmp_path: Path, files: keys.KeyFiles) -> RoundManager:
    config = ServerConfig(
        insecure=True, state_dir=tmp_path / "state", public_context=files.public, min_participants=2
    )
    public = codec.PublicCodec(files.public.read_bytes())
    return RoundManager(
        config, State(config.state_dir / "state.db"), Spool(config.state_dir), public, files.fingerprint
    )


def _refusal(m: RoundManager, layout: Layout, fingerprint: str) -> RoundError:
    with pytest.raises(RoundError) as err:
        m.join("n", fingerprint, layout)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    return err.value


def _publish_one(m: RoundManager) -> None:
    row = m.state.open_round(0, 1e12, ["a", "b"], min_participants=2)
    m.state.finish_round(row.round, state="sum_ready", reason="", participants=2)


def test_join_refuses_another_initial_model_and_says_what_to_do(
    tmp_path: Path, keyfiles: keys.KeyFiles
) -> None:
    m = _manager(tmp_path, keyfiles)
    try:
        m.set_layout(OURS, actor="test")
        m.join("a", keyfiles.fingerprint, OURS)
        message = _refusal(m, THEIRS, keyfiles.fingerprint).message
        assert "initial model differs from the federation's: same tensors and shapes" in message
        assert "same seed" in message and "same initial checkpoint file" in message
        assert "222222222222" in message and "111111111111" in message
        message = _refusal(m, LAYOUT, keyfiles.fingerprint).message
        assert "sent no initial model fingerprint" in message and "upgrade cipherhive" in message
        message = _refusal(m, Layout((TensorSpec("w", (11,)),), "", "1" * 64), keyfiles.fingerprint).message
        assert message.startswith("model layout differs from the federation's: tensor #0")
    finally:
        m.state.close()


def test_pins_from_before_fingerprints_keep_working(tmp_path: Path, keyfiles: keys.KeyFiles) -> None:
    m = _manager(tmp_path, keyfiles)
    try:
        m.state.set_meta("layout", LAYOUT.canonical())  # as an older server stored it
        _publish_one(m)
        m.join("a", keyfiles.fingerprint, OURS)  # no fingerprint pinned: any initial model, as before
        m.join("b", keyfiles.fingerprint, THEIRS)
        # The operator adds the fingerprint later: the shapes (and published sums) stay.
        assert m.set_layout(OURS, actor="test") == OURS
        assert m.layout() == OURS and m.layout().hash == LAYOUT.hash  # type: ignore[union-attr]
        _refusal(m, THEIRS, keyfiles.fingerprint)
        # A layout file without a fingerprint (older `node layout`) keeps the pinned one.
        assert m.set_layout(LAYOUT, actor="test") == OURS
        # Another fingerprint under published rounds: refused, with the reason.
        with pytest.raises(RoundError, match="another initial model is pinned already"):
            m.set_layout(THEIRS, actor="test")
        with pytest.raises(RoundError, match=r"1 round\(s\) have been published"):
            m.set_layout(THEIRS, replace=True, actor="test")
    finally:
        m.state.close()


@pytest.mark.slow
def test_a_member_built_with_another_seed_is_refused_at_join(tmp_path: Path) -> None:
    """Real processes: `cipherhive node layout` pins node 1's model; node 3 uses seed 1."""
    fed = LocalFederation(tmp_path, nodes=3, node_options={"epochs": 1})
    fed.setup()
    fed.write_node_config(2, seed=1)
    pinned = Layout.read_file(fed.layout_file)
    assert len(pinned.initial_model_hash) == 64
    fed.start_server()
    fed.wait_serving()
    try:
        proc = fed.start_node(2)
        assert proc.wait(120) == 2, fed.log("node-3")
        log = fed.log("node-3")
        assert "server refused this node" in log and "FAILED_PRECONDITION" in log
        assert "initial model differs from the federation's" in log and "same seed" in log
    finally:
        fed.stop_all()


def test_layout_of_keeps_the_fingerprint() -> None:
    tensors = list(build_model(0).named_parameters())
    assert layout_of(tensors, "", "f" * 64).initial_model_hash == "f" * 64
    assert pb.Layout(initial_model_hash="x").initial_model_hash == "x"  # field 4 on the wire
