"""Fixtures several test modules share: one federation key per module, and its two codecs."""

from __future__ import annotations

import pytest

from cipherhive.ckks import keys
from cipherhive.ckks.codec import PublicCodec, SecretCodec


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> keys.KeyFiles:
    return keys.keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secret(key_files: keys.KeyFiles) -> SecretCodec:
    return SecretCodec(key_files.secret.read_bytes())


@pytest.fixture(scope="module")
def public(key_files: keys.KeyFiles) -> PublicCodec:
    return PublicCodec(key_files.public.read_bytes())
