"""The one exception the server's round logic raises to refuse a request."""

from __future__ import annotations

import grpc


class RoundError(Exception):
    """A refusal with the gRPC status the caller should receive."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refuse(code: grpc.StatusCode, message: str) -> RoundError:
    """The refusal to ``raise`` (one spelling for every check that turns a request down)."""
    return RoundError(code, message)
