"""What a trainer receives for one round of record-level DP-SGD (``RoundInfo.privacy``).

The node fills it from the federation's announced schedule and its own
``[privacy]`` settings, after its ledger has charged the round; the trainer
hands it to :func:`cipherhive.node.dp_sgd.private_training`, which uses
exactly these parameters and random streams and records what it did, so
that the node can refuse to send an update the ledger did not account for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cipherhive.node.privacy.randomness import CryptoStream


@dataclass
class DPRound:
    round: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    #: DP-SGD steps this round has (and was charged for): exactly, unless training stops early.
    steps: int
    #: The node's δ: the helper refuses a dataset of N records when δ > 1/(10·N).
    delta: float
    noise: CryptoStream = field(repr=False)
    sampling: CryptoStream = field(repr=False)
    #: Noise and sampling come from a fixed seed (tests and reproducible tables only).
    insecure: bool = False
    #: Set by the helper: it was used (once), and how many noisy steps it took.
    used: bool = False
    steps_taken: int = 0
