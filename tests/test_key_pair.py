"""A member's secret context must hold the secret key of its own public key.

The key fingerprint members and the server compare covers the parameters and the public key
only; a secret.ctx assembled from the right public key and another secret key (damaged, or
handed over by someone hostile) would pass it and decrypt every sum to noise. These tests build
exactly that file and check that it is refused, in the library and by a node at start-up.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tenseal as ts

from cipherhive.ckks import codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.pki import key_transfer


def _serialized(ctx: ts.Context, secret: bool) -> bytes:
    return ctx.serialize(
        save_public_key=True, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False
    )


def forged_secret_context(right: ts.Context, wrong: ts.Context) -> bytes:
    """``right``'s parameters and public key with ``wrong``'s secret key: the one serialized
    field a secret context holds beyond its public part, appended to ``right``'s public part."""
    return _serialized(right, secret=False) + key_transfer.secret_key_field(_serialized(wrong, secret=True))


def test_a_secret_key_of_another_key_pair_is_refused() -> None:
    right, wrong = codec.new_secret_context(), codec.new_secret_context()
    forged = forged_secret_context(right, wrong)
    loaded = ts.context_from(forged)
    assert loaded.has_secret_key()
    # The forgery passes the fingerprint: only the key-pair check can tell.
    assert keys.fingerprint(loaded) == keys.fingerprint(right)
    with pytest.raises(codec.CodecError, match="does not belong to its public key"):
        keys.verified_fingerprint(forged)
    assert keys.verified_fingerprint(_serialized(right, secret=True)) == keys.fingerprint(right)


def test_a_public_context_is_not_a_member_key() -> None:
    with pytest.raises(codec.CodecError, match="no secret key"):
        keys.verified_fingerprint(_serialized(codec.new_secret_context(), secret=False))


@pytest.mark.timeout(120)
def test_a_node_refuses_to_start_with_a_forged_secret_context(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path, nodes=2, node_options={"epochs": 1})
    fed.setup()
    right = ts.context_from((tmp_path / "keys" / keys.SECRET_FILE).read_bytes())
    forged = tmp_path / "forged-secret.ctx"
    forged.write_bytes(forged_secret_context(right, codec.new_secret_context()))
    forged.chmod(0o600)
    fed.node_settings = {"secret_context": str(forged)}
    fed.write_node_config(0)
    done = subprocess.run(
        [sys.executable, "-m", "cipherhive", "node", "--config", str(tmp_path / "node-1.toml")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert str(forged) in output and "does not belong to its public key" in output, output
    assert "Traceback" not in output, output
