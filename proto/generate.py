"""Regenerate the Python code for the wire contract.

Run from anywhere: ``python proto/generate.py`` rewrites the committed files;
``python proto/generate.py --check`` exits 1 when they differ from what the
installed grpcio-tools would generate (CI runs this through the test suite).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = ["cipherhive/v1/federation.proto"]
GENERATED = [
    "cipherhive/v1/federation_pb2.py",
    "cipherhive/v1/federation_pb2.pyi",
    "cipherhive/v1/federation_pb2_grpc.py",
]


def generate(out_dir: Path) -> None:
    """Run protoc (bundled with grpcio-tools) into ``out_dir``."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *SOURCES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def stale_files() -> list[str]:
    """Names of committed files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            name
            for name in GENERATED
            if not (PROTO_ROOT / name).exists()
            or (Path(tmp) / name).read_bytes() != (PROTO_ROOT / name).read_bytes()
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report drift")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale generated file: proto/{name} (run: python proto/generate.py)")
        return 1 if stale else 0
    generate(PROTO_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
