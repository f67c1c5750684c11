"""Deprecated import path, kept for plug-in strings written for 0.1 such as
``cipherhive.codec:SecretCodec``: the codec lives in :mod:`cipherhive.ckks.codec`.

Importing this module warns (DeprecationWarning); it will be removed in 0.3.
"""

from __future__ import annotations

import warnings

from cipherhive.ckks.codec import CodecError, NodeCodec, PublicCodec, SecretCodec, ServerCodec

__all__ = ["CodecError", "NodeCodec", "PublicCodec", "SecretCodec", "ServerCodec"]

warnings.warn(
    "cipherhive.codec is deprecated: import cipherhive.ckks.codec instead",
    DeprecationWarning,
    stacklevel=2,
)
