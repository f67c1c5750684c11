"""What the double masks cost a node (docs/spec/masked-round.md §3): in process, one core.

* encode + encrypt throughput with masks (self-mask plus ``members - 1``
  pairwise masks, SecAgg §4) against without, at 3, 8 and 16 members (goal:
  at least 0.7x at 8);
* what a node spends rebuilding c1 of every block of a sum from the members'
  seeds (cipherhive.ckks.c0_sum), per member per block, and the decryption after it;
* bytes per value of a masked upload (still seeded, written uncompressed).

Run alone with ``python -m cipherhive.bench.masked [--values N]``; `cipherhive
bench` adds the same figures to its report.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import tenseal as ts

from cipherhive.ckks import codec
from cipherhive.secagg import masking
from cipherhive.secagg.masking import MaskPlan
from cipherhive.server.ingest.running_sum import MaskedSum

MEMBERS = (3, 8, 16)
REPEATS = 5


def _best(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _plan(members: int, modulus: int) -> MaskPlan:
    return MaskPlan.fresh([(os.urandom(32), 1 if j % 2 else -1) for j in range(members - 1)], modulus)


def measure(secret_context: bytes, values: int, members: Sequence[int] = MEMBERS) -> dict[str, float]:
    secret = codec.SecretCodec(secret_context)
    public_ctx = ts.context_from(secret_context)
    public_ctx.make_context_public()
    public = codec.PublicCodec(bytes(public_ctx.serialize()))
    per = codec.VALUES_PER_CIPHERTEXT
    vector = np.random.default_rng(0).normal(0.0, 0.05, max(values, per))
    blocks = [vector[s : s + per] for s in range(0, vector.shape[0], per)]
    n = vector.shape[0]
    unmasked = n / _best(lambda: [secret.encrypt(b) for b in blocks])
    out: dict[str, float] = {"encrypt_params_per_s_unmasked": unmasked}
    for m in members:
        plan = _plan(m, secret.modulus)

        def masked_pass(plan: MaskPlan = plan) -> None:
            for index, block in enumerate(blocks):
                secret.encrypt_masked(block, index, plan)

        rate = n / _best(masked_pass)
        out[f"encrypt_params_per_s_masked_{m}"] = rate
        out[f"masked_vs_unmasked_{m}"] = rate / unmasked
    # A node rebuilds c1 of each block of a masked sum from every member's seed
    # (cipherhive.ckks.c0_sum): the cost per member per block, net of one decryption.
    plans = [_plan(max(members), secret.modulus) for _ in range(max(members))]
    uploads = [secret.encrypt_masked(blocks[0], 0, p) for p in plans]
    running = MaskedSum(public.upload_parser(), 1)
    for blob in uploads:
        running.add(0, running.load(blob))
    [record] = running.serialized()
    seeds = [masking.upload_seed(u) for u in uploads]
    full = _best(lambda: secret.decrypt_c0_sum(record, seeds, 0))
    one = _best(lambda: secret.decrypt_c0_sum(record, seeds[:1], 0))
    out["c1_rebuild_ms_per_member_per_block"] = 1e3 * (full - one) / (len(seeds) - 1)
    out["decrypt_ms_per_block"] = 1e3 * one
    out["masked_upload_bytes_per_value"] = len(uploads[0]) / per
    return out


def render(figures: dict[str, float]) -> str:
    lines = [f"encrypt, unmasked: {figures['encrypt_params_per_s_unmasked']:.3g} params/s (1 core)"]
    for key, value in figures.items():
        if key.startswith("encrypt_params_per_s_masked_"):
            m = key.rsplit("_", 1)[1]
            lines.append(
                f"encrypt, masked, {m:>2} members: {value:.3g} params/s = "
                f"{figures['masked_vs_unmasked_' + m]:.2f}x unmasked"
            )
    lines.append(
        f"c1 rebuilt from the seeds: {figures['c1_rebuild_ms_per_member_per_block']:.3f} ms per member per "
        f"block, then decryption {figures['decrypt_ms_per_block']:.3f} ms per block"
    )
    lines.append(f"masked upload: {figures['masked_upload_bytes_per_value']:.3f} bytes per value")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m cipherhive.bench.masked", description=__doc__)
    parser.add_argument("--values", type=int, default=1 << 20, help="values encrypted per pass")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    secret = bytes(codec.new_secret_context().serialize(save_secret_key=True))
    figures = measure(secret, args.values)
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
