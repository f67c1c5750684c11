"""cipherhive: secure aggregation for federated learning.

Members train locally, encrypt their update with CKKS (TenSEAL/SEAL), and an
aggregator that holds no secret key adds the ciphertexts; members decrypt
only the sum. This package holds what both daemons share: the wire codec,
keys, configuration, logging and the command line.

``cipherhive.simulate(trainer=…)`` runs a real local federation of a trainer
plug-in (see ``cipherhive.demo.simulation``); it is imported on first use, so
that importing the package stays light for the daemons and the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cipherhive.demo.simulation import simulate as simulate

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "simulate":
        from cipherhive.demo.simulation import simulate

        return simulate
    raise AttributeError(f"module 'cipherhive' has no attribute {name!r}")
