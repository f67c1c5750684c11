"""The README stays true: its configuration reference and its commands match the code and CI."""

from __future__ import annotations

import re
from pathlib import Path

from cipherhive.node.config import NodeConfig
from cipherhive.runtime import config
from cipherhive.server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(name: str) -> str:
    match = re.search(rf"<!-- reference:{name} -->\n(.*?)\n<!-- /reference:{name} -->", README, re.S)
    assert match, f"README has no reference:{name} block"
    return match.group(1).strip()


def test_configuration_reference_is_current() -> None:
    assert _section("server") == config.reference(ServerConfig)
    assert _section("node") == config.reference(NodeConfig)


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert "cipherhive demo" in demo
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
