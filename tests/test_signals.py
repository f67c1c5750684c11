"""Stop signals to a whole process group: a node (and the server) exits 0, promptly, leaving no worker.

Ctrl-C in a terminal sends SIGINT to the foreground process group, and ``timeout -s TERM`` or a
service manager signals every process of the group: the crypto workers get the signal too. Real
processes: a server and three nodes with masked rounds running continuously; node-3, the node
under test, has two crypto workers and runs in a session of its own (``start_new_session``), so
``os.killpg`` reaches it and its workers but neither pytest nor the other members. It is signalled
at a random moment from its start (some land in start-up: imports, the trainer, joining, catching
up; others in a round: training, masking, uploading, waiting for the server), restarted on the
same state directory each time, and must exit 0 within :data:`HANG_LIMIT` seconds with every
process of its group gone. The seed of the random moments is printed; set it with
``CIPHERHIVE_SIGNAL_SEED=<seed>`` to replay a failure. The stop times are printed (``-s``), not
asserted. See docs/reference/exit-codes.md.
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipherhive.demo.federation import LocalFederation
from cipherhive.node import stopping
from tests.federations import wait_online

pytestmark = pytest.mark.slow

#: Seconds a signalled process may take to exit before the test calls it hung.
HANG_LIMIT = 60.0
#: Seconds the processes of a group that exited may take to disappear (the resource tracker ends
#: when its parent's pipe closes, a moment after the parent).
GONE_LIMIT = 10.0
TRIALS = 6
#: Random moments after the start: short enough for the file to stay within about three minutes,
#: long enough for some to land in a round (start-up takes a few seconds on a loaded machine).
DELAYS = (0.5, 8.0)
SEED = int(os.environ.get("CIPHERHIVE_SIGNAL_SEED") or random.SystemRandom().randrange(1_000_000))
#: Random moments after the node joined (catching up, waiting, a round's steps).
AFTER_JOIN = (0.0, 5.0)
TESTED = 2  # node-3
_STOP_LINE = re.compile(r"shutting down|stopped|stop requested|withdrew")


def _popen(fed: LocalFederation, key: str, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
    """Like LocalFederation's own processes, but the leader of a process group of its own."""
    with open(fed.workdir / log_name, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cipherhive", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            cwd=fed.workdir,
            start_new_session=True,
        )
    fed.procs[key] = proc
    return proc


def _start_server(fed: LocalFederation) -> subprocess.Popen[bytes]:
    proc = _popen(fed, "server", ["server", "--config", str(fed.workdir / "server.toml")], "server.log")
    fed.wait_serving()
    return proc


def _start_tested(fed: LocalFederation, log_name: str) -> subprocess.Popen[bytes]:
    name = fed.node_name(TESTED)
    return _popen(fed, name, ["node", "--config", str(fed.workdir / f"{name}.toml")], log_name)


def _group(pgid: int) -> dict[int, str]:
    """Every live process of process group ``pgid``: pid → its command name."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.rpartition(")")
        fields = rest.split()
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            found[int(entry.name)] = name.partition("(")[2]
    return found


def _children(pid: int) -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def _stop_group(
    fed: LocalFederation, proc: subprocess.Popen[bytes], sig: signal.Signals, log_name: str
) -> tuple[int, float, set[int]]:
    """Signal ``proc``'s whole group; (exit code, seconds to exit, every child seen); fails on a hang
    or a process of the group left behind, with the log's tail as the timeline."""
    children = _children(proc.pid)
    os.killpg(proc.pid, sig)
    started = time.monotonic()
    while proc.poll() is None:
        children |= _children(proc.pid)  # workers started after the signal count too
        if time.monotonic() - started > HANG_LIMIT:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            pytest.fail(f"still running {HANG_LIMIT:g} s after {sig.name}:\n{_timeline(fed, log_name)}")
        time.sleep(0.05)
    took = time.monotonic() - started
    deadline = time.monotonic() + GONE_LIMIT
    while (left := _left(proc.pid, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind after exit: {left}\n{_timeline(fed, log_name)}"
    return proc.returncode, took, children


def _left(pgid: int, children: set[int]) -> dict[int, str]:
    """What is still alive of the group and of the children seen (a zombie counts as gone)."""
    left = _group(pgid)
    for pid in children - set(left):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.rpartition(")")
        if rest.split()[0] != "Z":
            left[pid] = name.partition("(")[2]
    return left


def _says(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


def _timeline(fed: LocalFederation, log_name: str) -> str:
    text = (fed.workdir / log_name).read_text(errors="replace")
    return f"--- {log_name} (seed {SEED}) ---\n{text[-4000:]}"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A server and node-1, node-2 running throughout; rounds need two members, so they go on while
    node-3 is stopped, and node-3 takes part in them whenever it is up."""
    fed = LocalFederation(
        tmp_path_factory.mktemp("signals"),
        nodes=3,
        rounds={"min_participants": 2, "timeout_seconds": 20.0, "enrol_seconds": 2.0, "step_seconds": 3.0},
        node_options={"epochs": 2},
    )
    fed.setup()
    config = fed.workdir / f"{fed.node_name(TESTED)}.toml"
    config.write_text(config.read_text().replace("workers = 1", "workers = 2"), encoding="utf-8")
    try:
        _start_server(fed)
        for i in range(TESTED):
            fed.start_node(i)
        wait_online(fed, TESTED)
        yield fed
    finally:
        fed.stop_all()
        for key in ("server", fed.node_name(TESTED)):  # groups of their own: sweep what is left
            proc = fed.procs.get(key)
            if proc is not None and _group(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_group_signal_stops_the_node_cleanly(federation: LocalFederation, sig: signal.Signals) -> None:
    fed = federation
    rng = random.Random(f"{SEED}-{sig.name}")
    print(f"\nseed {SEED} (CIPHERHIVE_SIGNAL_SEED={SEED} replays it)")
    for trial in range(TRIALS):
        log_name = f"node-3-{sig.name}-{trial}.log"
        proc = _start_tested(fed, log_name)
        # Every other trial counts from the join, so that some land in rounds however slowly a
        # loaded machine starts the node (its imports alone may take longer than DELAYS).
        joined = trial % 2 == 1
        delay = rng.uniform(*(AFTER_JOIN if joined else DELAYS))
        if joined:
            fed.wait_for(functools.partial(_says, fed.workdir / log_name, "joined federation"), 120, "join")
        time.sleep(delay)
        code, took, children = _stop_group(fed, proc, sig, log_name)
        log = (fed.workdir / log_name).read_text(errors="replace")
        said = [
            line.partition("cipherhive.node: ")[2] for line in log.splitlines() if _STOP_LINE.search(line)
        ]
        print(
            f"{sig.name} #{trial}: {delay:.2f} s after {'joining' if joined else 'start'}, exit {code} in "
            f"{took:.2f} s, {len(children)} children; {' | '.join(said)}"
        )
        assert code == 0, f"exit {code}\n{_timeline(fed, log_name)}"
        assert "Traceback" not in log, _timeline(fed, log_name)


@pytest.mark.timeout(180)
def test_a_second_signal_exits_at_once_and_says_what_the_node_was_doing(federation: LocalFederation) -> None:
    """Exit 130, the line names what the node was doing (the trainer only if it was training),
    and the crypto workers, which ignore stop signals, are killed rather than left behind."""
    fed = federation
    log_name = "node-3-twice.log"
    proc = _start_tested(fed, log_name)
    fed.wait_for(functools.partial(_says, fed.workdir / log_name, "joined federation"), 120, "join")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    code, took, children = _stop_group(fed, proc, signal.SIGINT, log_name)
    log = (fed.workdir / log_name).read_text(errors="replace")
    said = [line for line in log.splitlines() if "second stop signal" in line]
    print(f"\ntwice: exit {code} in {took:.2f} s, {len(children)} children; {said}")
    assert code == stopping.EXIT_FORCED, _timeline(fed, log_name)
    assert children, "no crypto worker was started: nothing was checked"
    assert said and "second stop signal (SIGINT after SIGINT): exiting now while " in said[0], _timeline(
        fed, log_name
    )
    doing = said[0].partition("exiting now while ")[2]
    known = {a.doing for a in stopping.ACTIVITIES.values()} | {"following the federation"}
    assert any(doing.startswith(d) for d in known), said[0]


@pytest.mark.timeout(180)
def test_group_sigint_stops_the_server_cleanly(federation: LocalFederation) -> None:
    fed = federation
    server = fed.procs["server"]
    workers = _children(server.pid)
    delay = random.Random(f"{SEED}-server").uniform(*DELAYS)
    time.sleep(delay)
    code, took, children = _stop_group(fed, server, signal.SIGINT, "server.log")
    print(f"\nserver: SIGINT {delay:.2f} s in, exit {code} in {took:.2f} s, {len(children)} children")
    try:
        assert workers, "the server started no ingest workers: nothing was checked"
        assert code == 0, f"exit {code}\n{_timeline(fed, 'server.log')}"
    finally:
        _start_server(fed)  # for any test that runs after this one


#: Random moments after a server's start: imports, recovery, starting its ingest workers, serving
#: (not the first few tenths of a second: the interpreter itself, before any handler exists).
SERVER_START_UP = (0.3, 1.5)


@pytest.mark.timeout(240)
def test_group_signals_during_the_servers_start_up(federation: LocalFederation) -> None:
    """A stop signal while the server starts (before or just after it serves) exits 0 too."""
    fed = federation
    server = fed.procs["server"]
    os.killpg(server.pid, signal.SIGTERM)
    assert server.wait(HANG_LIMIT) == 0, _timeline(fed, "server.log")
    pick = random.Random(f"{SEED}-server-start")
    try:
        for trial, sig in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGINT)):
            log = f"server-start-{trial}.log"
            proc = _popen(fed, "server", ["server", "--config", str(fed.workdir / "server.toml")], log)
            delay = pick.uniform(*SERVER_START_UP)
            time.sleep(delay)
            serving = _says(fed.workdir / log, "listening")
            code, took, children = _stop_group(fed, proc, sig, log)
            print(
                f"\nserver start-up {trial}: {sig.name} {delay:.2f} s in "
                f"({'serving' if serving else 'starting'}), exit {code} in {took:.2f} s, "
                f"{len(children)} children"
            )
            assert code == 0, f"exit {code}\n{_timeline(fed, log)}"
            assert "Traceback" not in (fed.workdir / log).read_text(errors="replace"), _timeline(fed, log)
    finally:
        _start_server(fed)  # for any test that runs after this one


@pytest.mark.timeout(60)
def test_every_activity_names_code_that_exists() -> None:
    """The second signal's log line says what the node was doing by the functions on its stack
    (cipherhive.node.stopping.ACTIVITIES): a renamed one would quietly make it vaguer."""
    for key in stopping.ACTIVITIES:
        where, _, _callee = key.partition(">")
        module, _, qualname = where.partition(":")
        target: object = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        assert callable(target), key


def test_a_stop_signal_inside_a_c_extensions_start_is_still_a_clean_stop() -> None:
    """On a loaded machine a SIGTERM landed while TenSEAL's C extension initialised: pybind11
    reported the handler's exception as "initialization failed", the package's fallback import
    then raised ModuleNotFoundError, and the node exited 1. The stop is in the chain of causes."""
    from cipherhive.cli import _interrupt_behind, _interrupted

    stop = stopping.StopAtStartup("SIGTERM", "starting up: importing modules")
    try:
        try:
            try:
                raise stop
            except stopping.StopAtStartup as cause:
                raise ImportError("initialization failed") from cause
        except ImportError:
            raise ModuleNotFoundError("No module named 'tenseal._tenseal_cpp'") from None
    except ImportError as exc:
        # ``from None`` hides the cause from the traceback, not from __context__.
        assert _interrupt_behind(exc) is stop
    assert _interrupted(stop, node_daemon=True) == 0
    assert _interrupt_behind(ImportError("No module named 'nothing'")) is None
