"""The docs stay true: the README's commands match CI, the configuration reference and the gRPC
reference match the code, every link resolves and the site builds strictly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cipherhive.node.config import NodeConfig
from cipherhive.runtime import config
from cipherhive.server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "reference" / "configuration.md").read_text(encoding="utf-8")
PROTO = (ROOT / "proto" / "cipherhive" / "v1" / "federation.proto").read_text(encoding="utf-8")
GRPC_PAGE = (ROOT / "docs" / "reference" / "grpc-api.md").read_text(encoding="utf-8")
README_MAX_BYTES = 15_000


def _section(name: str) -> str:
    match = re.search(rf"<!-- reference:{name} -->\n(.*?)\n<!-- /reference:{name} -->", CONFIGURATION, re.S)
    assert match, f"docs/reference/configuration.md has no reference:{name} block"
    return match.group(1).strip()


def test_configuration_reference_is_current() -> None:
    assert _section("server") == config.reference(ServerConfig)
    assert _section("node") == config.reference(NodeConfig)


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert "cipherhive demo" in demo
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_is_short() -> None:
    size = len(README.encode("utf-8"))
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move text to docs/"


def test_every_relative_link_in_the_readme_resolves() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    missing = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the README itself
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(target)
    assert targets, "the README links to no page of the site"
    assert missing == [], f"README links to files that do not exist: {missing}"


def _proto_names() -> tuple[list[str], list[str]]:
    """The proto's services, and its RPCs as ``Service.Rpc``."""
    services, rpcs = [], []
    for match in re.finditer(r"^service\s+(\w+)\s*\{(.*?)^\}", PROTO, re.S | re.M):
        services.append(match.group(1))
        rpcs += [f"{match.group(1)}.{rpc}" for rpc in re.findall(r"\brpc\s+(\w+)\s*\(", match.group(2))]
    return services, rpcs


def test_grpc_page_lists_every_service_and_rpc() -> None:
    services, rpcs = _proto_names()
    assert services and rpcs
    missing = [f"service {s}" for s in services if not re.search(rf"^### {s}$", GRPC_PAGE, re.M)]
    for name in rpcs:
        service, rpc = name.split(".")
        section = GRPC_PAGE.split(f"### {service}\n", 1)[-1].split("\n### ", 1)[0]
        if f"| `{rpc}` |" not in section:
            missing.append(f"rpc {name}")
    assert missing == [], f"docs/reference/grpc-api.md lacks {missing}: run python docs/gen_grpc_reference.py"


def test_grpc_page_is_what_the_generator_writes() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_grpc_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(360)
def test_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links and anchors are warnings (mkdocs.yml's validation), which --strict fails on."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "grpc-api" / "index.html").exists()
