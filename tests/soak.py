"""The random-fault soak's tools: a seeded fault plan, a timeline of what was injected and
when, liveness checks against the rounds table, and the report printed on any failure.

A soak run is reproducible in what it does (the same seed gives the same faults, in the same
order, with the same pauses and durations); where in a round each fault lands still depends
on the machine's speed, which is why every failure prints the timeline beside the rounds
table: the two together say which fault a failed round met.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cipherhive.demo.federation import LocalFederation
from tests.proxy import TcpProxy

KINDS = ("server-kill", "server-restart", "node-kill", "node-freeze", "cut", "partition")
# A member killed once its self-mask release is on its ledger and before the server has the
# seed, and kept down past the round's deadline (a member restarted in time resends its
# seed): the window dropout recovery closes. Not drawn by default until it does; choose it
# with CIPHERHIVE_SOAK_KINDS.
RELEASE_LOST = "node-release-lost"
RELEASE_LOST_HOLD = 30.0  # seconds: past the soak federation's 25 s round deadline
ALL_KINDS = (*KINDS, RELEASE_LOST)


class LivenessError(AssertionError):
    """The federation did not go on by itself: a round failed that no fault explains, or no
    round published after the last fault. Kept apart from safety failures (a wrong sum, a
    double count), which are plain assertion errors and never expected."""


@dataclass(frozen=True)
class Fault:
    """One planned fault: what, on whom, after how long a pause, and for how long."""

    kind: str
    pause: float  # seconds of normal running before it
    node: int = 0  # node-kill, node-freeze
    hold: float = 0.0  # node-freeze, partition: seconds until it is lifted

    def describe(self, fed: LocalFederation) -> str:
        who = f" {fed.node_name(self.node)}" if self.kind.startswith("node") else ""
        held = f" for {self.hold:.1f}s" if self.hold else ""
        return f"{self.kind}{who}{held}"


def plan(seed: int, count: int, nodes: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """``count`` faults drawn from ``seed``: the whole run is fixed before it starts."""
    rng = random.Random(seed)
    faults = []
    for _ in range(count):
        kind = rng.choice(kinds)
        faults.append(
            Fault(
                kind=kind,
                pause=round(rng.uniform(0.5, 4.0), 2),
                node=rng.randrange(nodes),
                hold=_hold(kind, rng),
            )
        )
    return faults


def _hold(kind: str, rng: random.Random) -> float:
    if kind == RELEASE_LOST:
        return RELEASE_LOST_HOLD
    return round(rng.uniform(1.0, 5.0), 2) if kind in ("node-freeze", "partition") else 0.0


def kinds_from_env() -> tuple[str, ...]:
    """CIPHERHIVE_SOAK_KINDS: a comma-separated choice of fault kinds, or "all"."""
    text = os.environ.get("CIPHERHIVE_SOAK_KINDS", "")
    if not text:
        return KINDS
    if text == "all":
        return ALL_KINDS
    kinds = tuple(k.strip() for k in text.split(","))
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown:
        raise ValueError(f"CIPHERHIVE_SOAK_KINDS: unknown kinds {unknown}; choose from {ALL_KINDS}")
    return kinds


def seed_from_env() -> int:
    """CIPHERHIVE_SOAK_SEED repeats a run; otherwise a fresh seed each time."""
    text = os.environ.get("CIPHERHIVE_SOAK_SEED", "")
    return int(text) if text else random.SystemRandom().randrange(2**32)


@dataclass(frozen=True)
class Entry:
    began: float
    ended: float
    what: str
    fault: bool


@dataclass
class Timeline:
    """What the soak did, with wall-clock times comparable to the rounds table's."""

    start: float = field(default_factory=time.time)
    entries: list[Entry] = field(default_factory=list)

    def note(self, what: str) -> None:
        now = time.time()
        self.entries.append(Entry(now, now, what, fault=False))

    @contextmanager
    def fault(self, what: str) -> Iterator[None]:
        """A fault from its injection until the faulted party is back (restarted, thawed, healed)."""
        began = time.time()
        try:
            yield
        finally:
            self.entries.append(Entry(began, time.time(), what, fault=True))

    def faults(self) -> list[Entry]:
        return [e for e in self.entries if e.fault]

    def render(self) -> str:
        lines = []
        for e in sorted(self.entries, key=lambda e: e.began):
            span = f"+{e.began - self.start:7.2f}s"
            if e.fault:
                span += f" .. +{e.ended - self.start:7.2f}s"
            lines.append(f"  {span:<24} {'FAULT ' if e.fault else ''}{e.what}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RoundRow:
    round: int
    state: str
    phase: str
    opened: float
    closed: float | None
    participants: int
    reason: str


def rounds_table(workdir: Path) -> list[RoundRow]:
    """The server's rounds as stored (read-only; works while the server is down)."""
    path = workdir / "server-state" / "state.db"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT round, state, phase, opened, closed, participants, reason FROM rounds ORDER BY round"
        ).fetchall()
    finally:
        db.close()
    return [RoundRow(*row) for row in rows]


def render_rounds(rows: list[RoundRow], start: float) -> str:
    lines = [f"  {'round':>5} {'state':<10} {'phase':<8} {'opened':>9} {'closed':>9} {'n':>2}  reason"]
    for r in rows:
        closed = f"+{r.closed - start:8.2f}" if r.closed else "-"
        lines.append(
            f"  {r.round:>5} {r.state:<10} {r.phase or '-':<8} {r.opened - start:+9.2f} {closed:>9} "
            f"{r.participants:>2}  {r.reason}"
        )
    return "\n".join(lines)


def unexplained_failures(rows: list[RoundRow], timeline: Timeline, grace: float) -> list[RoundRow]:
    """Failed rounds that no fault explains: none was under way between the round's opening
    and its close (a fault counts until ``grace`` seconds after it was lifted, the time a
    restarted daemon needs to be back in a round)."""
    faults = timeline.faults()
    return [
        r
        for r in rows
        if r.state == "failed"
        and not any(f.began <= (r.closed or time.time()) and r.opened <= f.ended + grace for f in faults)
    ]


def report(fed: LocalFederation, seed: int, timeline: Timeline, tail_lines: int = 25) -> str:
    """Everything needed to diagnose a failed soak: how to repeat it, what was injected and
    when, what every round did, and the end of every daemon's log."""
    parts = [
        f"soak seed {seed} (repeat with CIPHERHIVE_SOAK_SEED={seed})",
        f"timeline (t=0 at {time.strftime('%H:%M:%S', time.localtime(timeline.start))}):",
        timeline.render(),
        "rounds:",
        render_rounds(rounds_table(fed.workdir), timeline.start),
    ]
    for key in ["server", *(fed.node_name(i) for i in range(fed.nodes))]:
        tail = fed.log(key).splitlines()[-tail_lines:]
        parts.append(f"--- {key}.log (last {len(tail)} lines)")
        parts.extend(tail)
    return "\n".join(parts)


def inject(fed: LocalFederation, proxy: TcpProxy, fault: Fault, timeline: Timeline) -> None:
    """Inject one fault and lift it again, recording both ends on the timeline."""
    name = fed.node_name(fault.node)
    with timeline.fault(fault.describe(fed)):
        if fault.kind == "server-kill":
            fed.stop("server", signal.SIGKILL)
            fed.start_server()
            fed.wait_serving()
        elif fault.kind == "server-restart":
            fed.stop("server")
            fed.start_server()
            fed.wait_serving()
        elif fault.kind == "node-kill":
            fed.stop(name, signal.SIGKILL)
            fed.start_node(fault.node)
        elif fault.kind == "node-freeze":
            fed.procs[name].send_signal(signal.SIGSTOP)
            try:
                time.sleep(fault.hold)  # the fault itself: the process is frozen this long
            finally:
                fed.procs[name].send_signal(signal.SIGCONT)
        elif fault.kind == RELEASE_LOST:
            fed.stop(name)
            fed.start_node(fault.node, env={"CIPHERHIVE_FAILPOINTS": "node.released"})
            proc = fed.procs[name]
            fed.wait_for(lambda: proc.poll() is not None, 120, f"{name} to reach its release")
            time.sleep(fault.hold)  # the fault itself: the member stays down this long
            fed.start_node(fault.node)
        elif fault.kind == "cut":
            proxy.cut()
        elif fault.kind == "partition":
            proxy.partition()
            try:
                time.sleep(fault.hold)  # the fault itself: the network holds every byte this long
            finally:
                proxy.heal()
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")


def wait_live(fed: LocalFederation, what: str, predicate: Callable[[], object], timeout: float) -> None:
    """Wait for progress the federation must make by itself; failing that is a liveness failure."""
    try:
        fed.wait_for(predicate, timeout, what)
    except TimeoutError as exc:
        raise LivenessError(str(exc)) from None
