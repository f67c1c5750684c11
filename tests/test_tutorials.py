"""The tutorials and how-to guides work as written: every command block is run by a test or marked.

* **The multi-machine tutorial** (docs/tutorials/first-federation.md) runs step by step on
  loopback, as a newcomer would type it: its command blocks in page order, each one a
  ``bash -euo pipefail`` script, with HOME in a temporary folder (the page works in
  ``~/first-federation``) and the working directory a stand-in for the clone that holds
  ``examples/first-federation``. A block with the comment ``# runs until stopped`` starts a
  daemon: it gets a process group of its own (a terminal of its own) and is stopped at the end
  with SIGINT to that group, which is what Ctrl-C does. Between blocks the test waits only for
  what the page tells the reader to wait for (``server listening``, ``applied round sum``).
* **The how-to guides' command blocks** run against the tutorial's federation, or one of their
  own, in the folders the tutorial made.
* **Every block is accounted for.** Each ```bash / ```sh / ```console block of docs/tutorials/*.md
  and docs/how-to/*.md is either named in ``REGISTRY`` (page, a line of the block, the tests or
  scripts that run it) or preceded, on the line just above its opening fence, by a marker
  ``<!-- needs REASON -->`` with a REASON from ``NEEDS``: ``<!-- needs several machines -->``
  for a block that only makes sense across hosts, ``<!-- needs grpcurl -->`` for one that needs
  a tool the test environment lacks.

The only differences from the pages, made explicit where they happen: the port 7443 becomes a
free port (in the tutorial's blocks and the copied example files), and the how-to guides'
production names (``agg.example.com``, ``/var/lib/cipherhive``, ``/backup``) become the tutorial
federation's, and their database (``db.example``, its ``cipherhive`` database, the password file)
a database of the throwaway PostgreSQL cluster of tests/postgres.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import torch

from cipherhive.demo.federation import free_port
from cipherhive.node.export import load_export
from tests import postgres

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE = ROOT / "examples" / "first-federation"
TUTORIAL = "tutorials/first-federation.md"
OPERATOR = "how-to/operator.md"
MEMBER = "how-to/member.md"
MEMBERS = ("acme", "globex", "initech")
#: The port the tutorial and the example files name; the test gives the federation a free one.
PAGE_PORT = ":7443"
#: A comment on a block's daemon command: the block runs in the background until Ctrl-C.
LONG_RUNNING = "# runs until stopped"
COMMAND_LANGUAGES = ("bash", "sh", "console")
MARKER = re.compile(r"^<!-- needs (.+?) -->$")
#: Why a marked block cannot run in a test; a marker with another reason is refused.
NEEDS = {
    "several machines": "it runs on, or copies files between, hosts of their own",
    "grpcurl": "grpcurl is not installed where the tests run; tests/test_ctl.py calls the same "
    "reflection and Admin services",
    "a database administrator": "it creates a PostgreSQL role and database as the cluster's "
    "superuser, asking for a password; tests/postgres.py does the same for the state tests",
}
#: Deadline of one foreground block (the tutorial's `round wait` included) and of a daemon's stop.
BLOCK_TIMEOUT = 240.0
STOP_TIMEOUT = 30.0

THIS = "tests/test_tutorials.py"
STEP_BY_STEP = f"{THIS}::test_the_tutorial_runs_step_by_step"
#: Stands for "every block of the page that no other entry names".
EVERY_OTHER_BLOCK = "*"


@dataclass(frozen=True)
class Runs:
    """Block(s) of ``page`` run by ``by``: tests (``path::function``) or scripts (a path).

    ``line`` is a whole line of the block (stripped) that picks it out on its page, or
    ``EVERY_OTHER_BLOCK``."""

    page: str
    line: str
    by: tuple[str, ...]


REGISTRY = (
    Runs(
        "tutorials/demo.md",
        "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[node]' "
        "&& .venv/bin/cipherhive demo",
        # CI installs the same way (with the dev extra, which holds the node's) before any test;
        # the test runs the demo with fewer rounds.
        (".ci/run", "tests/test_simulate.py::test_demo_json_output_and_flags_still_work"),
    ),
    Runs(
        "tutorials/your-trainer.md",
        "cipherhive simulate --plugin bc_trainer:BreastCancerTrainer "
        '--options \'{"shards": 3, "epochs": 10}\' \\',
        ("tests/test_simulate.py::test_tutorial_command_line_example_runs",),
    ),
    Runs(
        TUTORIAL,
        "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[node]'",
        (".ci/run",),
    ),
    Runs(TUTORIAL, EVERY_OTHER_BLOCK, (STEP_BY_STEP,)),
    Runs(
        OPERATOR,
        f"cipherhive server --config server.toml          {LONG_RUNNING} (Ctrl-C)",
        (
            STEP_BY_STEP,
            f"{THIS}::test_the_how_to_daemon_commands_are_the_tutorials",
            f"{THIS}::test_operator_moves_the_state_to_postgresql",
        ),
    ),
    Runs(
        OPERATOR,
        "export CIPHERHIVE_CTL_SERVER=agg.example.com:7443",
        (f"{THIS}::test_operator_common_tasks", f"{THIS}::test_operator_watches_a_withdrawal"),
    ),
    Runs(OPERATOR, "cipherhive ctl status", (f"{THIS}::test_operator_common_tasks",)),
    Runs(
        OPERATOR,
        "cipherhive ctl nodes readmit globex       # lift the exclusion, forget earlier offences",
        (f"{THIS}::test_operator_readmits_a_member",),
    ),
    Runs(
        OPERATOR,
        f"cipherhive ctl watch                            {LONG_RUNNING} (Ctrl-C)",
        (f"{THIS}::test_operator_watches_a_withdrawal",),
    ),
    Runs(
        OPERATOR,
        'cipherhive ctl round withdraw 2 --reason "most members rejected the sum: negative total weight"',
        (f"{THIS}::test_operator_watches_a_withdrawal",),
    ),
    Runs(
        OPERATOR,
        'sqlite3 /var/lib/cipherhive/state.db ".backup /backup/state.db"',
        (f"{THIS}::test_operator_backs_up_a_running_server",),
    ),
    Runs(
        OPERATOR,
        "cipherhive server migrate-state --config server.toml   # or --to postgresql://...",
        (f"{THIS}::test_operator_moves_the_state_to_postgresql",),
    ),
    Runs(
        OPERATOR,
        'pg_dump --format=custom --file=/backup/rounds.dump "postgresql://cipherhive@db.example/cipherhive"',
        (f"{THIS}::test_operator_moves_the_state_to_postgresql",),
    ),
    Runs(MEMBER, "chmod 0600 secret.ctx acme.key acme.enrol.key", (f"{THIS}::test_member_key_modes",)),
    Runs(
        MEMBER,
        f"cipherhive node --config node.toml              {LONG_RUNNING} (Ctrl-C)",
        (STEP_BY_STEP, f"{THIS}::test_the_how_to_daemon_commands_are_the_tutorials"),
    ),
    Runs(
        MEMBER,
        "cipherhive node privacy-init --config node.toml    # once per dataset; never again for it",
        (f"{THIS}::test_member_creates_a_privacy_ledger",),
    ),
    Runs(
        MEMBER,
        "cipherhive node export --config node.toml --out latest/        # on a member that is up to date",
        (f"{THIS}::test_member_catches_up_from_another_members_export",),
    ),
)


# ------------------------------------------------------------ the pages' blocks


@dataclass(frozen=True)
class Block:
    """A command block of a page: its text and the line just above its opening fence."""

    page: str
    index: int  # among the page's command blocks, from 0
    text: str
    above: str

    @property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines()]

    @property
    def needs(self) -> str | None:
        match = MARKER.match(self.above.strip())
        return match.group(1) if match else None

    @property
    def long_running(self) -> bool:
        return LONG_RUNNING in self.text

    def __str__(self) -> str:
        return f"docs/{self.page} block {self.index} ({self.lines[0]!r})"


def command_blocks(page: str) -> list[Block]:
    """The page's ```bash, ```sh and ```console blocks, in order (other fences are skipped)."""
    blocks: list[Block] = []
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
        if opening.group(1) in COMMAND_LANGUAGES:
            text = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(page, len(blocks), text, lines[i - 1] if i else ""))
        i = end + 1
    return blocks


def pages() -> list[str]:
    return [
        str(p.relative_to(DOCS))
        for folder in ("tutorials", "how-to")
        for p in sorted((DOCS / folder).glob("*.md"))
    ]


def registered(block: Block) -> Runs | None:
    """The registry's entry for ``block``: the one naming a line of it, else its page's catch-all."""
    own = [r for r in REGISTRY if r.page == block.page and r.line in block.lines]
    if own:
        return own[0]
    return next((r for r in REGISTRY if r.page == block.page and r.line == EVERY_OTHER_BLOCK), None)


def runs_step_by_step(block: Block) -> bool:
    """Whether the step-by-step run of the tutorial runs ``block`` (not marked, not CI's install)."""
    runs = registered(block)
    return block.needs is None and runs is not None and STEP_BY_STEP in runs.by


def one_block(page: str, line: str) -> Block:
    (block,) = [b for b in command_blocks(page) if line in b.lines]
    return block


def substituted(text: str, names: Mapping[str, str]) -> str:
    """``text`` with each name replaced; the name must be there, so a changed page fails here."""
    for old, new in names.items():
        assert old in text, f"the block no longer says {old!r}; update the test's substitution:\n{text}"
        text = text.replace(old, new)
    return text


# ------------------------------------------------------------ a federation made by the tutorial


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class Federation:
    """One run of the tutorial: a HOME holding ~/first-federation, a stand-in for the clone, and
    the daemons the tutorial's blocks started (each in a process group of its own)."""

    root: Path
    port: int = field(default_factory=free_port)
    daemons: dict[str, Daemon] = field(default_factory=dict)
    outputs: dict[int, str] = field(default_factory=dict)
    #: The tutorial's blocks run or started, by index, in order.
    ran: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home, self.clone, self.logs = self.root / "home", self.root / "clone", self.root / "logs"
        for folder in (self.home, self.logs):
            folder.mkdir(parents=True)
        # The clone as the tutorial finds it: the example files, with the test's port, and the
        # virtual environment the tests run in as its .venv.
        shutil.copytree(EXAMPLE, self.clone / "examples" / "first-federation")
        (self.clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        assert (self.clone / ".venv" / "bin" / "activate").exists(), f"{sys.prefix} is no virtual environment"
        for toml in (self.clone / "examples" / "first-federation").rglob("*.toml"):
            toml.write_text(self.on_port(toml.read_text(encoding="utf-8")), encoding="utf-8")

    @property
    def folder(self) -> Path:
        return self.home / "first-federation"

    def on_port(self, text: str) -> str:
        return text.replace(PAGE_PORT, f":{self.port}")

    def env(self) -> dict[str, str]:
        """The environment of a terminal with the clone's virtual environment active (as the
        tutorial asks of every terminal but its first, whose block activates it itself)."""
        bin_dir = Path(sys.prefix) / "bin"
        assert (bin_dir / "cipherhive").exists(), f"no cipherhive command in {bin_dir}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIPHERHIVE_")}
        env.update(HOME=str(self.home), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
        env.update(VIRTUAL_ENV=sys.prefix, PYTHONUNBUFFERED="1")
        return env

    # ------------------------------------------------------------ running blocks

    def run(
        self, script: str, what: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """Run ``script`` to its end; its output, or an assertion error that shows it."""
        try:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=cwd or self.clone,
                env={**self.env(), **(env or {})},
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{what} still ran after {BLOCK_TIMEOUT:g} s:\n{script}\n{self.tails()}"
            ) from exc
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{what} exited {done.returncode}:\n{script}\n{output}\n{self.tails()}"
        return output

    def start(
        self, script: str, name: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> Daemon:
        """Start ``script`` in the background, in a process group of its own (a terminal)."""
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=cwd or self.clone,
                env={**self.env(), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        daemon = Daemon(name, proc, log)
        self.daemons[name] = daemon
        return daemon

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = BLOCK_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for daemon in self.daemons.values():
                assert daemon.proc.poll() is None, (
                    f"{daemon.name} exited with {daemon.proc.returncode} while waiting for {what}:\n"
                    f"{daemon.output()[-3000:]}"
                )
            assert time.monotonic() < deadline, f"no {what} after {timeout:g} s:\n{self.tails()}"
            time.sleep(0.2)

    def wait_for_log(self, daemon: Daemon, text: str) -> None:
        self.wait_for(lambda: text in daemon.output(), f"{text!r} in {daemon.name}'s output")

    def tails(self) -> str:
        return "\n".join(f"--- {d.name}:\n{d.output()[-2000:]}" for d in self.daemons.values())

    def applied(self, name: str, number: int) -> bool:
        return (
            re.search(rf"applied round sum \[node={name} round={number}\b", self.daemons[name].output())
            is not None
        )

    def run_tutorial(self, until: str | None = None) -> None:
        """The tutorial's blocks in order, up to (without) the first block holding the line ``until``.

        A reader starts the members once the server logs ``server listening``, and exports the
        models once each node logged ``applied round sum`` for round 2: the test waits for the same."""
        for block in command_blocks(TUTORIAL):
            if until is not None and until in block.lines:
                return
            if not runs_step_by_step(block):
                continue  # several machines, or run by something else (the install, by CI)
            if any("cipherhive node export" in line for line in block.lines):
                self.wait_for(
                    lambda: all(self.applied(m, 2) for m in MEMBERS), "round 2 applied by every node"
                )
            script = self.on_port(block.text)
            self.ran.append(block.index)
            if block.long_running:
                folder = re.search(r"cd ~/first-federation/(\w+)", block.text)
                assert folder, f"{block} starts a daemon without saying in which party's folder"
                daemon = self.start(script, folder.group(1))
                if "cipherhive server" in block.text:
                    self.wait_for_log(daemon, "server listening")
            else:
                self.outputs[block.index] = self.run(script, str(block))

    def stop(self) -> dict[str, int | None]:
        """Ctrl-C in every terminal, the nodes first; exit codes (None: killed after STOP_TIMEOUT)."""
        codes = {name: self.interrupt(name) for name in sorted(self.daemons, key=lambda n: n == "server")}
        self.kill()
        return codes

    def interrupt(self, name: str) -> int | None:
        """Ctrl-C in one daemon's terminal; its exit code (None: still running after STOP_TIMEOUT)."""
        proc = self.daemons[name].proc
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None

    def retire(self, name: str) -> int | None:
        """Stop one daemon (Ctrl-C, then SIGKILL to what is left of its group) and forget it, so
        that the other daemons run on; its exit code (None: killed after STOP_TIMEOUT)."""
        code = self.interrupt(name)
        daemon = self.daemons.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(STOP_TIMEOUT)
        return code

    def kill(self) -> None:
        """SIGKILL whatever is left of each daemon's process group (workers included)."""
        for daemon in self.daemons.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(STOP_TIMEOUT)


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """The tutorial run from top to bottom; its server and nodes keep running for the how-to tests."""
    fed = Federation(tmp_path_factory.mktemp("tutorial"))
    try:
        fed.run_tutorial()
        yield fed
        assert_stopped_cleanly(fed, fed.stop())
    finally:
        fed.kill()


def connected(group: int, port: int) -> bool:
    """Whether a process of the process group ``group`` holds an established TCP connection to
    ``port`` (Linux /proc): how the test knows a silent `ctl watch` is connected."""
    sockets: set[str] = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(proc.name)) == group:
                    sockets |= {os.readlink(fd) for fd in (proc / "fd").iterdir()}
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for row in table.read_text(encoding="ascii").splitlines()[1:] if table.exists() else []:
            remote, state, inode = row.split()[2], row.split()[3], row.split()[9]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port and f"socket:[{inode}]" in sockets:
                return True
    return False


def assert_stopped_cleanly(fed: Federation, codes: Mapping[str, int | None]) -> None:
    """Ctrl-C stopped every daemon with exit 0 (the server's ingest workers ignore it: the server
    stops them itself)."""
    bad = {name: code for name, code in codes.items() if code != 0}
    assert bad == {}, f"Ctrl-C did not stop them cleanly: {codes}\n{fed.tails()}"


def operator_env_script(fed: Federation) -> str:
    """The operator how-to's connection block, pointed at the tutorial's server."""
    block = one_block(OPERATOR, "export CIPHERHIVE_CTL_SERVER=agg.example.com:7443")
    return substituted(block.text, {"agg.example.com:7443": f"localhost:{fed.port}"})


def ctl_json(fed: Federation, command: str) -> dict[str, object]:
    data = json.loads(
        fed.run(operator_env_script(fed) + f"cipherhive ctl --json {command}\n", command, fed.folder)
    )
    assert isinstance(data, dict)
    return data


def round_states(fed: Federation) -> dict[int, tuple[str, int]]:
    """Round → (state, participants), as `cipherhive ctl --json rounds` gives them."""
    rounds = ctl_json(fed, "rounds")["rounds"]
    assert isinstance(rounds, list)
    return {int(r["round"]): (str(r["state"]), int(r["participants"])) for r in rounds}


# ------------------------------------------------------------ every block is run or marked


def test_every_command_block_is_run_or_marked() -> None:
    problems: list[str] = []
    used: set[Runs] = set()
    for page in pages():
        for block in command_blocks(page):
            runs = registered(block)
            if block.needs is not None:
                if block.needs not in NEEDS:
                    problems.append(f"{block}: unknown marker reason {block.needs!r}; known: {sorted(NEEDS)}")
                if runs is not None and runs.line != EVERY_OTHER_BLOCK:
                    problems.append(f"{block}: both marked and registered")
            elif runs is None:
                problems.append(f"{block}: neither run by a test (REGISTRY) nor marked <!-- needs ... -->")
            else:
                used.add(runs)
    problems += [f"REGISTRY entry matches no block: {r}" for r in REGISTRY if r not in used]
    for runs in REGISTRY:
        for by in runs.by:
            path, _, function = by.partition("::")
            if not (ROOT / path).exists():
                problems.append(f"{runs}: {path} does not exist")
            elif function:
                source = (ROOT / path).read_text(encoding="utf-8")
                if not re.search(rf"^def {re.escape(function)}\(", source, re.M):
                    problems.append(f"{runs}: {path} defines no test {function}")
    for runs in REGISTRY:
        if runs.line != EVERY_OTHER_BLOCK:
            matches = [b for b in command_blocks(runs.page) if runs.line in b.lines]
            if len(matches) != 1:
                problems.append(f"{runs}: matches {len(matches)} blocks, not one")
    assert problems == [], "\n".join(problems)


def test_the_install_ci_runs_is_the_pages() -> None:
    """What REGISTRY credits to .ci/run: the pages' install line is CI's, but for the dev extra
    (which holds the node extra the pages install: tests/test_install.py checks the server's)."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[node]'"
    assert install.replace("'.[node]'", "'.[dev]'") in ci
    for runs in REGISTRY:
        if ".ci/run" in runs.by:
            assert runs.line.startswith(install), runs


def test_the_tutorial_shows_the_example_files_verbatim() -> None:
    """A file the tutorial shows is the file it copies: ``<!-- file: PATH -->`` above a block."""
    page = (DOCS / TUTORIAL).read_text(encoding="utf-8")
    shown = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", page, re.S)
    assert {path for path, _ in shown} == {
        "examples/first-federation/server/server.toml",
        "examples/first-federation/acme/node.toml",
    }
    for path, text in shown:
        assert text == (ROOT / path).read_text(encoding="utf-8"), (
            f"the tutorial's {path} differs from the file"
        )


def test_the_example_members_differ_only_in_name_and_shard() -> None:
    """What the tutorial says of globex's and initech's node.toml, which it does not show."""
    acme_text = (EXAMPLE / "acme" / "node.toml").read_text(encoding="utf-8")

    def comments(text: str, name: str) -> list[str]:
        return [
            line[line.index("#") :].replace(name, "acme") if "#" in line else "" for line in text.splitlines()
        ]

    for shard, name in enumerate(MEMBERS):
        text = (EXAMPLE / name / "node.toml").read_text(encoding="utf-8")
        expected = tomllib.loads(acme_text)
        expected["tls"].update(tls_cert=f"{name}.crt", tls_key=f"{name}.key")
        expected["trainer"]["options"]["shard"] = shard
        assert tomllib.loads(text) == expected, name
        assert comments(text, name) == comments(acme_text, "acme"), name


def test_the_how_to_daemon_commands_are_the_tutorials() -> None:
    """The how-to guides' daemon commands are the very lines the tutorial runs."""
    tutorial_lines = {line for block in command_blocks(TUTORIAL) for line in block.lines}
    for page, line in (
        (OPERATOR, f"cipherhive server --config server.toml          {LONG_RUNNING} (Ctrl-C)"),
        (MEMBER, f"cipherhive node --config node.toml              {LONG_RUNNING} (Ctrl-C)"),
    ):
        block = one_block(page, line)
        assert block.lines == [line], f"{block} holds more than the daemon command"
        assert line in tutorial_lines, f"{block}: the tutorial does not run {line!r}"


# ------------------------------------------------------------ the tutorial, step by step


@pytest.mark.slow
@pytest.mark.timeout(300)  # includes the module's federation: the whole tutorial
def test_the_tutorial_runs_step_by_step(tutorial: Federation) -> None:
    blocks = {b.index: b for b in command_blocks(TUTORIAL)}
    # Every block but the install (CI's) and the one marked for several machines, in page order.
    assert tutorial.ran == [b.index for b in blocks.values() if runs_step_by_step(b)]
    assert set(tutorial.daemons) == {"server", *MEMBERS}
    page = (DOCS / TUTORIAL).read_text(encoding="utf-8")
    assert "`server listening`" in page and "`applied round sum`" in page, "the waits the test makes"
    # Step 5: the operator saw round 2 published, both rounds summed over the three members.
    (operator,) = [out for out in tutorial.outputs.values() if "round 2 published" in out]
    assert "nodes online" in operator
    states = round_states(tutorial)
    assert states == {1: ("ROUND_SUM_READY", 3), 2: ("ROUND_SUM_READY", 3)}, states
    # Step 6: the three hashes the page tells the reader to compare are one.
    (export,) = [out for i, out in tutorial.outputs.items() if "cipherhive node export" in blocks[i].text]
    hashes = {}
    for line in export.splitlines():
        if "model.safetensors" in line:
            digest, path = line.split()
            hashes[path] = digest
    assert set(hashes) == {f"{m}/model/model.safetensors" for m in MEMBERS}, export
    assert len(set(hashes.values())) == 1, hashes
    # And the models themselves: round 2, the same tensors, a trained classifier.
    exports = [load_export(tutorial.folder / m / "model") for m in MEMBERS]
    assert {e.round for e in exports} == {2}
    first = exports[0].tensors
    for other in exports[1:]:
        assert first.keys() == other.tensors.keys()
        assert all(torch.equal(first[k], other.tensors[k]) for k in first)
    # The server never held the secret context: not in its folder, nor the operator's.
    assert not list((tutorial.folder / "server").rglob("secret.ctx"))
    assert not list((tutorial.folder / "operator").rglob("secret.ctx"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_server_with_exit_0(tmp_path: Path) -> None:
    """The tutorial's server, stopped as the page says (Ctrl-C in its terminal), before any node."""
    fed = Federation(tmp_path)
    try:
        fed.run_tutorial(until=f"cipherhive node --config node.toml              {LONG_RUNNING} (Ctrl-C)")
        assert set(fed.daemons) == {"server"}
        codes = fed.stop()
        assert codes == {"server": 0}, fed.tails()
    finally:
        fed.kill()


# ------------------------------------------------------------ the operator how-to


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operator_common_tasks(tutorial: Federation) -> None:
    block = one_block(OPERATOR, "cipherhive ctl status")
    output = tutorial.run(operator_env_script(tutorial) + block.text, str(block), tutorial.folder)
    assert "round 2 published" in output
    assert '"round": 2' in output  # jq's selection of the JSON rounds
    report = (tutorial.folder / "report.html").read_text(encoding="utf-8")
    assert report.lstrip().lower().startswith("<!doctype html")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operator_readmits_a_member(tutorial: Federation) -> None:
    """The how-to's `ctl nodes` and `ctl nodes readmit` against the tutorial's server."""
    block = one_block(
        OPERATOR, "cipherhive ctl nodes readmit globex       # lift the exclusion, forget earlier offences"
    )
    output = tutorial.run(operator_env_script(tutorial) + block.text, str(block), tutorial.folder)
    assert "offences" in output and "excluded until" in output
    assert output.count("globex") >= 2  # listed, then readmitted


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operator_backs_up_a_running_server(tutorial: Federation) -> None:
    from cipherhive.server.storage.state import State

    backup = tutorial.root / "backup"
    backup.mkdir()
    block = one_block(OPERATOR, 'sqlite3 /var/lib/cipherhive/state.db ".backup /backup/state.db"')
    script = substituted(
        block.text, {"/var/lib/cipherhive": str(tutorial.folder / "server" / "state"), "/backup": str(backup)}
    )
    tutorial.run(script, str(block))
    assert sorted(p.name for p in (backup / "sums").glob("*.sum")) == ["round-1.sum", "round-2.sum"]
    assert (backup / "spool").is_dir()
    state = State(backup / "state.db")
    try:
        rows = [state.round(n) for n in (1, 2)]
    finally:
        state.close()
    assert all(row is not None and row.state == "sum_ready" for row in rows), rows


@pytest.mark.slow
@pytest.mark.timeout(300)  # includes the module's federation, if no test made it before
def test_operator_moves_the_state_to_postgresql(tutorial: Federation) -> None:
    """The how-to's "State in PostgreSQL" on a server that ran on SQLite: a stopped copy of the
    tutorial's server folder, its state taken as "Back up" says (the tutorial's server keeps
    running on SQLite for the other tests), is moved with the page's `migrate-state` block to a
    database of the test's cluster and served from it on a port of its own; then the page's
    `pg_dump` block backs it up while it runs."""
    cluster = postgres.cluster()
    if cluster.tcp is None:
        pytest.skip("needs the throwaway cluster's TCP login (CIPHERHIVE_TEST_POSTGRES is set)")
    host, pg_port = cluster.tcp
    server, backup = tutorial.root / "server-pg", tutorial.root / "pg-backup"
    shutil.copytree(tutorial.folder / "server", server, ignore=shutil.ignore_patterns("state"))
    state = server / "state"
    state.mkdir(mode=0o700)
    running = tutorial.folder / "server" / "state"
    with (
        contextlib.closing(sqlite3.connect(running / "state.db")) as source,
        contextlib.closing(sqlite3.connect(state / "state.db")) as copy,
    ):
        source.backup(copy)  # a consistent snapshot, as `sqlite3 ... ".backup ..."` takes it
    for folder in ("sums", "spool"):
        shutil.copytree(running / folder, state / folder)
    port = free_port()
    toml = server / "server.toml"
    toml.write_text(
        substituted(toml.read_text(encoding="utf-8"), {f"localhost:{tutorial.port}": f"localhost:{port}"}),
        encoding="utf-8",
    )
    page = (DOCS / OPERATOR).read_text(encoding="utf-8")
    shown = re.search(r"^( *)```toml\n\1\[state\]\n.*?^\1```$", page, re.S | re.M)
    assert shown, "the operator how-to shows no [state] settings for server.toml"
    settings = textwrap.dedent(shown.group(0)).split("\n", 1)[1].removesuffix("```")
    with postgres.database(owner=postgres.LOGIN_ROLE) as dsn:
        dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        assert isinstance(dbname, str)
        url = f"postgresql://{postgres.LOGIN_ROLE}@{host}:{pg_port}/{dbname}"
        # The page's database, "cipherhive" on db.example, becomes the test's (the role is the
        # cluster's login role, cipherhive too); its password file, one beside server.toml.
        password = server / "database.pw"
        password.write_text(cluster.login_password + "\n", encoding="utf-8")
        password.chmod(0o600)
        with open(toml, "a", encoding="utf-8") as out:
            out.write(
                "\n"
                + substituted(
                    settings,
                    {
                        "postgresql://cipherhive@db.example:5432/cipherhive": url,
                        "/etc/cipherhive/database.pw": str(password),
                    },
                )
            )

        migrate = one_block(
            OPERATOR, "cipherhive server migrate-state --config server.toml   # or --to postgresql://..."
        )
        output = tutorial.run(migrate.text, str(migrate), server)
        assert "rounds: 2 rows (counts match)" in output and "members: " in output, output
        assert not (state / "state.db").exists() and (state / "state.db.migrated").is_file()

        start = one_block(
            OPERATOR, f"cipherhive server --config server.toml          {LONG_RUNNING} (Ctrl-C)"
        )
        daemon = tutorial.start(start.text, "server-pg", server)
        try:
            tutorial.wait_for_log(daemon, "server listening")
            ctl = substituted(
                one_block(OPERATOR, "export CIPHERHIVE_CTL_SERVER=agg.example.com:7443").text,
                {"agg.example.com:7443": f"localhost:{port}"},
            )
            shown_rounds = json.loads(
                tutorial.run(ctl + "cipherhive ctl --json rounds\n", "ctl rounds", tutorial.folder)
            )
            assert {
                int(r["round"]): (r["state"], int(r["participants"])) for r in shown_rounds["rounds"]
            } == {1: ("ROUND_SUM_READY", 3), 2: ("ROUND_SUM_READY", 3)}, shown_rounds
            with psycopg.connect(dsn) as db:
                rows = db.execute("SELECT round, state FROM rounds ORDER BY round").fetchall()
            assert rows == [(1, "sum_ready"), (2, "sum_ready")]
            assert not (state / "state.db").exists()  # it serves from PostgreSQL, not a new SQLite

            dump = one_block(
                OPERATOR,
                'pg_dump --format=custom --file=/backup/rounds.dump "postgresql://cipherhive@db.example/cipherhive"',
            )
            backup.mkdir()
            script = substituted(
                dump.text,
                {
                    "postgresql://cipherhive@db.example/cipherhive": url,
                    "/var/lib/cipherhive": str(state),
                    "/backup": str(backup),
                },
            )
            # The pg_dump beside the cluster's initdb first on PATH: its own version (Debian's
            # /usr/bin/pg_dump is a wrapper that may pick another, or be missing).
            path = f"{postgres._bindir()}{os.pathsep}{tutorial.env()['PATH']}"
            tutorial.run(script, str(dump), env={"PGPASSWORD": cluster.login_password, "PATH": path})
        finally:
            code = tutorial.retire("server-pg")
        assert code == 0, daemon.output()[-3000:]
    assert (backup / "rounds.dump").read_bytes().startswith(b"PGDMP")  # pg_dump's custom format
    assert sorted(p.name for p in (backup / "sums").glob("*.sum")) == ["round-1.sum", "round-2.sum"]
    assert (backup / "spool").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(300)  # a federation of its own: the tutorial up to its export step
def test_operator_watches_a_withdrawal(tmp_path: Path) -> None:
    """`ctl watch` in a terminal of its own while the operator withdraws round 2: the members roll
    back, and the server opens round 3 on round 1. A federation of its own, as it changes it."""
    fed = Federation(tmp_path)
    try:
        fed.run_tutorial(
            until="for member in acme globex initech; do (cd $member && "
            "cipherhive node export --config node.toml --out model/); done"
        )
        watch = one_block(
            OPERATOR, f"cipherhive ctl watch                            {LONG_RUNNING} (Ctrl-C)"
        )
        watcher = fed.start(operator_env_script(fed) + watch.text, "watch", fed.folder)
        # It prints nothing before the next event: wait for its connection, then its stream call.
        fed.wait_for(lambda: connected(watcher.proc.pid, fed.port), "watch's connection to the server")
        time.sleep(0.5)
        withdraw = one_block(
            OPERATOR,
            'cipherhive ctl round withdraw 2 --reason "most members rejected the sum: negative total weight"',
        )
        output = fed.run(operator_env_script(fed) + withdraw.text, str(withdraw), fed.folder)
        assert "round 2 withdrawn" in output
        fed.wait_for(lambda: all(fed.applied(m, 3) for m in MEMBERS), "round 3 applied by every node")
        assert round_states(fed) == {
            1: ("ROUND_SUM_READY", 3),
            2: ("ROUND_WITHDRAWN", 3),
            3: ("ROUND_SUM_READY", 3),
        }
        fed.wait_for(
            lambda: re.search(r"SUM_READY\s+round 3", watcher.output()) is not None, "watch's round 3"
        )
        assert_stopped_cleanly(fed, fed.stop())
        assert re.search(r"WITHDRAWN\s+round 2", watcher.output()), watcher.output()
    finally:
        fed.kill()


# ------------------------------------------------------------ the member how-to


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_member_key_modes(tutorial: Federation) -> None:
    """Keys copied with modes lost (0644) are 0600 again after the how-to's chmod, in a copy of
    acme's folder (the running node keeps its own)."""
    folder = tutorial.root / "acme-copied"
    shutil.copytree(tutorial.folder / "acme", folder, ignore=shutil.ignore_patterns("state", "model"))
    files = ("secret.ctx", "acme.key", "acme.enrol.key")
    for name in files:
        (folder / name).chmod(0o644)
    block = one_block(MEMBER, "chmod 0600 secret.ctx acme.key acme.enrol.key")
    tutorial.run(block.text, str(block), folder)
    assert {name: stat.S_IMODE((folder / name).stat().st_mode) for name in files} == dict.fromkeys(
        files, 0o600
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_member_creates_a_privacy_ledger(tutorial: Federation) -> None:
    """acme's node.toml plus the how-to's record-level [privacy] settings for node.toml; the
    ledger folder moves through the environment, as the configuration reference allows."""
    page = (DOCS / MEMBER).read_text(encoding="utf-8")
    record_level = re.search(r'```toml\n# server.toml\n\[privacy\]\ndp_mode = "record"\n.*?```', page, re.S)
    assert record_level, "the member how-to has no record-level DP settings"
    node_part = record_level.group(0).split("# node.toml\n", 1)[1].removesuffix("```")
    folder = tutorial.root / "acme-dp"
    shutil.copytree(tutorial.folder / "acme", folder, ignore=shutil.ignore_patterns("state", "model"))
    with open(folder / "node.toml", "a", encoding="utf-8") as toml:
        toml.write("\n" + node_part)
    ledgers = tutorial.root / "privacy-ledgers"
    block = one_block(
        MEMBER, "cipherhive node privacy-init --config node.toml    # once per dataset; never again for it"
    )
    env = {"CIPHERHIVE_PRIVACY_LEDGER_DIR": str(ledgers)}
    output = tutorial.run(block.text, str(block), folder, env)
    assert "created the privacy ledger of dataset 'acme-claims-2025'" in output
    shown = tutorial.run("cipherhive node privacy --config node.toml\n", "node privacy", folder, env)
    assert "0 rounds" in shown
    # Never again for it: a second run refuses to replace the ledger.
    again = subprocess.run(
        ["bash", "-c", block.text],
        cwd=folder,
        env={**tutorial.env(), **env},
        capture_output=True,
        timeout=120,
    )
    assert again.returncode != 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_member_catches_up_from_another_members_export(tutorial: Federation) -> None:
    """Export on acme (up to date, running), bootstrap a stopped copy of globex's folder from it."""
    block = one_block(
        MEMBER,
        "cipherhive node export --config node.toml --out latest/        # on a member that is up to date",
    )
    export_line, bootstrap_line = block.text.splitlines()
    assert "bootstrap" in bootstrap_line
    tutorial.run(export_line + "\n", "node export", tutorial.folder / "acme")
    stopped = tutorial.root / "globex-stopped"
    shutil.copytree(tutorial.folder / "globex", stopped, ignore=shutil.ignore_patterns("model"))
    shutil.copytree(tutorial.folder / "acme" / "latest", stopped / "latest")  # latest/ copied to it
    tutorial.run(bootstrap_line + "\n", "node bootstrap", stopped)
    exported = torch.load(tutorial.folder / "acme" / "latest" / "checkpoint.pt", weights_only=True)
    installed = torch.load(stopped / "state" / "checkpoint.pt", weights_only=True)
    assert installed["round"] == exported["round"] == 2
    assert all(torch.equal(installed["tensors"][k], exported["tensors"][k]) for k in exported["tensors"])
