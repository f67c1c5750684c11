"""The one error that stops a node daemon (exit code 2)."""

from __future__ import annotations

from cipherhive.runtime.errors import UserError


class NodeError(UserError, RuntimeError):
    """A problem retrying cannot fix; the daemon stops with this message.

    Only for local problems and a refusal at Join: nothing else that arrives over the
    network may end the node (docs/spec/sum-checks.md §4), it is rejected, skipped or retried instead.
    """
