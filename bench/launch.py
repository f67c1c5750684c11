"""Start a server or node with a benchmark codec: ``python -m cipherhive.bench.launch``.

Reads ``CIPHERHIVE_BENCH_MODE`` (cipherhive, plaintext or tenseal-vector) and
``CIPHERHIVE_BENCH_KEYS`` (a folder with the tenseal-vector contexts), then
runs the ordinary daemon with that codec. Only `cipherhive bench` starts this.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cipherhive.runtime import config, logs


def main() -> int:
    mode = os.environ.get("CIPHERHIVE_BENCH_MODE", "cipherhive")
    keys_dir = Path(os.environ.get("CIPHERHIVE_BENCH_KEYS", "."))
    parser = argparse.ArgumentParser(prog="cipherhive.bench.launch")
    parser.add_argument("role", choices=["server", "node"])
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    if args.role == "server":
        from cipherhive.bench import baselines
        from cipherhive.server.config import ServerConfig
        from cipherhive.server.daemon import Server

        cfg = config.load(ServerConfig, args)
        logs.setup(cfg.log_level, cfg.log_json)
        if mode == "plaintext":
            return Server(cfg, (baselines.PlainServerCodec(), "plaintext-baseline")).serve_forever()
        if mode == "tenseal-vector":
            public = (keys_dir / "tenseal-public.ctx").read_bytes()
            fingerprint = (keys_dir / "tenseal-fingerprint").read_text().strip()
            return Server(cfg, (baselines.TensealServerCodec(public), fingerprint)).serve_forever()
        return Server(cfg).serve_forever()
    from cipherhive.node.config import NodeConfig
    from cipherhive.node.daemon import CodecChoice, Node

    ncfg = config.load(NodeConfig, args)
    logs.setup(ncfg.log_level, ncfg.log_json)
    choice = None
    if mode == "plaintext":
        choice = CodecChoice("cipherhive.bench.baselines:PlainNodeCodec", b"", "plaintext-baseline")
    elif mode == "tenseal-vector":
        choice = CodecChoice(
            "cipherhive.bench.baselines:TensealNodeCodec",
            (keys_dir / "tenseal-secret.ctx").read_bytes(),
            (keys_dir / "tenseal-fingerprint").read_text().strip(),
        )
    return Node(ncfg, choice).serve_forever()


if __name__ == "__main__":
    sys.exit(main())
