"""One hostile member, each behaviour in turn: what share of rounds still publishes.

``python -m cipherhive.bench.hostile [--minutes M] [--behaviours LIST] [--train-seconds S]
[--workdir DIR] [--json]``

A member with a valid certificate can cost the others a round at every step of
a masked round (docs/spec/masked-round.md §2.1, §10): it never uploads, lies in
its commit, refuses every roster, or withdraws after uploading. Step deadlines
bound what one such round costs, and naming the member keeps it out of the next
``exclude_rounds`` rosters (doubled for every earlier offence), so the others
lose a round now and then instead of every round. This measures how often.

The runs
    One run without the hostile behaviour (the baseline), then one per
    behaviour; each a fresh federation (one key, CA and layout shared by all
    runs): a real server and three real node processes on loopback with mutual
    TLS, masked rounds, a floor of 3, the digits demo trainer (one epoch) held
    to ``--train-seconds`` a round (:class:`PacedTrainer`: the digits model
    trains in milliseconds, a real member's does not, and how long training
    takes decides who wins the race between a withdrawal and the honest
    members' masking, §2.1). The fourth member, ``node-4``, is played by this
    script over the real wire (:class:`Hostile`). In the baseline it is present
    and honest (:class:`Honest`): it enrols, uploads a zero update (weight 0.1),
    commits and releases its seed, so every run has the same four members.
    Rounds are opened back to back (``auto_start = false``, admin
    ``StartRound``) for ``--minutes`` each; a round is opened once the previous
    one is over and, if it published, every honest node has applied it (a node
    skips a round whose base it is not at). The round still open when the time
    is up is finished and counted. After each published round the scripted
    member folds the sum into its chain hash (§1.1), as a node applying it
    would, so its enrolments stay valid: what is measured is the behaviour, not
    a stale history (``--behaviours stale-chain`` measures that one).

Figures, per run
    rounds opened, published, failed; share published (and beside the
    baseline's); published per minute; the rounds whose roster held the
    scripted member; how often the server named it (``member named`` audit
    lines) and any honest member it named; the steps failed rounds failed at;
    the mean round time (opened to closed, from ``ListRounds``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import grpc
import numpy as np
from torch import nn

from cipherhive.bench.scripted_member import Member
from cipherhive.demo.digits import DigitsTrainer
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import Layout
from cipherhive.node.trainer import AppliedRound, RoundInfo, TrainResult
from cipherhive.runtime.fsutil import atomic_write
from cipherhive.secagg.chain import sum_digest
from cipherhive.secagg.commit import make_commit, self_mask_digest
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

#: The four hostile behaviours, in the order they run.
BEHAVIOURS = ("never-upload", "lying-commit", "refuse-roster", "withdraw-late")
#: Not run unless asked: an honest member that never folds published sums into its chain hash,
#: so from the first published round on its enrolments name an out-of-date history (§1.1).
STALE_CHAIN = "stale-chain"
BASELINE = "baseline"
#: The member this script plays; node-1 … node-3 are real node processes.
SCRIPTED = "node-4"
HONEST_NODES = 3
#: What the scripted member does in the baseline, as printed beside the figures.
BASELINE_MEMBER = "node-4 present and honest (enrols, uploads a zero update of weight 0.1, commits, releases)"


class Hostile:
    """A member with a valid certificate that misbehaves the same way in every round it can enrol in
    (docs/spec/masked-round.md §2.1, §10); tests/test_step_deadlines.py plays it too."""

    def __init__(self, member: Member, behaviour: str, layout: Layout) -> None:
        self.member = member
        self.behaviour = behaviour
        self.layout = layout
        self.enrolled: list[int] = []
        self.errors: list[str] = []

    def play(self, number: int) -> None:
        m = self.member
        try:
            opened = m.wait(pb.RoundEvent.OPENED, number, timeout=60)
            try:
                part = m.enrol(opened)
            except grpc.RpcError as exc:
                # Excluded; or not expected (excluded when the round opened), so the roster was
                # fixed as soon as the others enrolled.
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                details = exc.details() or ""
                assert "left out of rounds" in details or "is already fixed" in details, details
                return
            self.enrolled.append(number)
            part.accept_roster(list(m.wait(pb.RoundEvent.ROSTER, number, timeout=60).roster))
            if self.behaviour == "never-upload":
                return
            if self.behaviour == "refuse-roster":
                m.stub.Withdraw(
                    pb.WithdrawRequest(round=number, withdrawal=part.withdrawal("refused the roster")),
                    timeout=30,
                )
                return
            m.upload(part, m.vector(np.zeros(self.layout.num_params), 0.1), number, opened.base_round)
            if self.behaviour == "withdraw-late":
                m.stub.Withdraw(
                    pb.WithdrawRequest(round=number, withdrawal=part.withdrawal("stopping")), timeout=30
                )
                return
            assert self.behaviour == "lying-commit"
            assert part.upload is not None and part.plan is not None and part.roster is not None
            lying = make_commit(
                roster=part.roster,
                cert_fingerprint=m.setup.tls_fingerprint,
                seeds_hash=bytes(32),
                c0_hash=part.upload.blocks_hash,
                self_mask_hash=self_mask_digest(part.plan.self_seed),
                key=m.setup.enrol_key,
            ).encode()
            try:
                m.stub.SubmitCommit(pb.CommitRequest(round=number, commit=lying), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            else:
                raise AssertionError("a lying commit was accepted")
        except Exception as exc:  # reported by the caller (the test or the benchmark)
            self.errors.append(f"round {number}: {exc!r}")


class Player(Protocol):
    """What the benchmark drives: one round at a time, errors kept rather than raised."""

    enrolled: list[int]
    errors: list[str]

    def play(self, number: int) -> None: ...


class Honest:
    """The scripted member taking part in a round as an honest node would, with a zero update:
    the baseline's fourth member, so the baseline has the same members and rosters as the runs."""

    def __init__(self, member: Member, layout: Layout) -> None:
        self.member = member
        self.layout = layout
        self.enrolled: list[int] = []
        self.errors: list[str] = []

    def play(self, number: int) -> None:
        m = self.member
        try:
            opened = m.wait(pb.RoundEvent.OPENED, number, timeout=60)
            part = m.enrol(opened)
            self.enrolled.append(number)
            part.accept_roster(list(m.wait(pb.RoundEvent.ROSTER, number, timeout=60).roster))
            m.upload(part, m.vector(np.zeros(self.layout.num_params), 0.1), number, opened.base_round)
            m.commit(part, number)
            m.release(part, m.wait(pb.RoundEvent.COMMITS, number, timeout=60))
        except Exception as exc:  # counted beside the figures, never fatal to the run
            self.errors.append(f"round {number}: {exc!r}")


def follow(member: Member, number: int) -> None:
    """Fold published round ``number``'s sum into the member's chain hash, as a node applying it
    does (§1.1): without it the member's next enrolment names an old history and every honest
    member refuses that roster."""
    blobs, _ = member.fetch_sum(number)
    member.chain.apply(sum_digest(blobs))


class PacedTrainer(DigitsTrainer):
    """The digits demo trainer taking at least ``train_seconds`` per round, as a real member's
    training does, and leaving the last round it applied in ``applied_dir/shard-K`` (a few
    bytes, rewritten each round), so the benchmark opens the next round once every honest node
    is at its base without reading their logs."""

    def __init__(self, train_seconds: float = 0.0, applied_dir: str = "", **options: Any) -> None:
        super().__init__(**options)
        self.train_seconds = train_seconds
        self.applied_dir = Path(applied_dir) if applied_dir else None

    def train(self, model: nn.Module, info: RoundInfo) -> TrainResult:
        until = time.monotonic() + self.train_seconds
        result = super().train(model, info)
        while time.monotonic() < until:
            if info.should_stop():
                return TrainResult(num_samples=0)  # the node discards it, as for any trainer
            time.sleep(min(0.1, max(0.0, until - time.monotonic())))
        return result

    def after_round(self, model: nn.Module, applied: AppliedRound) -> None:
        super().after_round(model, applied)
        if self.applied_dir is not None:
            self.applied_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.applied_dir / f"shard-{self.shard}", str(applied.round).encode(), mode=0o644)


def applied_round(applied_dir: Path, shard: int) -> int:
    """The last round a :class:`PacedTrainer` of ``shard`` applied (0: none yet)."""
    try:
        return int((applied_dir / f"shard-{shard}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0


# --------------------------------------------------------------------------- settings and figures


@dataclass(frozen=True)
class Settings:
    """One run's federation and its round timings (``[rounds]`` of server.toml)."""

    minutes: float
    honest_nodes: int = HONEST_NODES
    floor: int = 3
    timeout_seconds: float = 30.0
    enrol_seconds: float = 10.0
    step_seconds: float = 5.0
    exclude_rounds: int = 2
    exclude_window: int = 100
    train_seconds: float = 3.0
    trainer: str = "cipherhive.bench.hostile:PacedTrainer (digits, 1 epoch, held to train_seconds)"
    baseline_member: str = BASELINE_MEMBER

    def rounds(self) -> dict[str, Any]:
        return {
            "auto_start": False,
            "min_participants": self.floor,
            "timeout_seconds": self.timeout_seconds,
            "enrol_seconds": self.enrol_seconds,
            "step_seconds": self.step_seconds,
            "exclude_rounds": self.exclude_rounds,
            "exclude_window": self.exclude_window,
        }

    def round_wait(self) -> float:
        """Longest a round can stay open: training, then the commit and release steps, and slack."""
        return self.timeout_seconds + 2 * self.step_seconds + 60.0


@dataclass
class RunFigures:
    run: str
    seconds: float = 0.0
    opened: int = 0
    published: int = 0
    failed: int = 0
    #: Published, then withdrawn by the members' sum checks (counted in neither of the above).
    withdrawn: int = 0
    share_published: float = 0.0
    published_per_minute: float = 0.0
    mean_round_seconds: float = 0.0
    mean_published_round_seconds: float = 0.0
    mean_failed_round_seconds: float = 0.0
    scripted_in_roster: int = 0
    #: Rounds in which the server named the scripted member (§10) ...
    scripted_named: int = 0
    #: ... and its ``member named`` audit lines: a round can name it twice (a refused commit,
    #: then the missed commit deadline; a withdrawal, then the round it failed).
    scripted_named_lines: int = 0
    #: Honest members the server named (none, unless something other than the behaviour went wrong).
    honest_named: dict[str, int] = field(default_factory=dict)
    failed_steps: dict[str, int] = field(default_factory=dict)
    reformed: int = 0
    #: Rounds whose roster was fixed before the scripted member's enrolment arrived: once it has
    #: missed ``missed_rounds_limit`` rounds the server no longer waits for it (not an error).
    late_enrolments: int = 0
    #: Errors of the scripted member's own script (a step refused with an unexpected status).
    member_errors: list[str] = field(default_factory=list)
    #: Published rounds not every honest node had applied within two minutes.
    not_applied: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- one run


def _online(fed: LocalFederation, count: int) -> None:
    with fed.admin_channel() as ch:
        admin = pb_grpc.AdminStub(ch)
        fed.wait_for(
            lambda: sum(n.online for n in admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes) >= count,
            180,
            f"{count} members online",
        )


def _applied(fed: LocalFederation, number: int, shards: int, timeout: float = 120.0) -> bool:
    """Every honest node applied round ``number`` (its :class:`PacedTrainer` says so), so the
    next round finds them at its base; False if one has not within ``timeout``."""
    folder = fed.workdir / APPLIED

    def applied() -> bool:
        return all(applied_round(folder, shard) >= number for shard in range(shards))

    try:
        fed.wait_for(applied, timeout, f"every honest node to apply round {number}")
    except TimeoutError:
        return False
    return True


SHARED = ("keys", "ca", "server", "admin")
#: Where the honest nodes' trainers leave the last round they applied.
APPLIED = "applied"


def _federation(workdir: Path, settings: Settings, shared: LocalFederation | None) -> LocalFederation:
    """A fresh federation in ``workdir``; keys, certificates and layout copied from ``shared``
    (copies keep their 0600 modes), so only the first run pays for them."""
    names = [f"node-{i + 1}" for i in range(settings.honest_nodes + 1)]
    layout = None
    if shared is not None:
        workdir.mkdir(parents=True)
        for folder in (*SHARED, *names):
            shutil.copytree(shared.workdir / folder, workdir / folder)
        layout = Layout.read_file(shared.layout_file)
    fed = LocalFederation(
        workdir,
        nodes=settings.honest_nodes + 1,
        plugin="cipherhive.bench.hostile:PacedTrainer",
        node_options={
            "epochs": 1,
            "train_seconds": settings.train_seconds,
            "applied_dir": str(workdir / APPLIED),
        },
        rounds=settings.rounds(),
        layout=layout,
    )
    fed.setup()
    return fed


def _audit(fed: LocalFederation) -> list[dict[str, Any]]:
    """The server's audit lines (it logs JSON lines in these runs)."""
    lines = []
    for line in fed.log("server").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("logger") == "cipherhive.audit":
                    lines.append(doc)
    return lines


def _finished(fed: LocalFederation, number: int, timeout: float) -> pb.RoundInfo:
    """Round ``number`` once it published or failed (``GetRound``: one round, not the history)."""

    def over() -> pb.RoundInfo | None:
        info = fed.get_round(number)
        done = (pb.ROUND_SUM_READY, pb.ROUND_FAILED, pb.ROUND_WITHDRAWN)
        return info if info is not None and info.state in done else None

    info: pb.RoundInfo = fed.wait_for(over, timeout, f"round {number}")
    return info


def run_once(name: str, fed: LocalFederation, settings: Settings) -> RunFigures:
    """Rounds back to back for ``settings.minutes`` with the scripted member playing ``name``;
    every process of the run is stopped on the way out, whatever happened."""
    member: Member | None = None
    try:
        fed.start_server(env={"CIPHERHIVE_LOG_LOG_JSON": "true"})
        fed.wait_serving()
        for i in range(settings.honest_nodes):
            fed.start_node(i)
        layout = Layout.read_file(fed.layout_file)
        names = [fed.node_name(i) for i in range(fed.nodes)]
        member = Member(fed, SCRIPTED, layout, names, floor=settings.floor)
        member.join()
        _online(fed, fed.nodes)
        player: Player = (
            Honest(member, layout) if name in (BASELINE, STALE_CHAIN) else Hostile(member, name, layout)
        )
        figures = RunFigures(name)
        numbers: list[int] = []
        with fed.admin_channel() as admin_channel:
            admin = pb_grpc.AdminStub(admin_channel)
            started = time.monotonic()
            while time.monotonic() - started < settings.minutes * 60:
                number = int(admin.StartRound(pb.StartRoundRequest(), timeout=30).round)
                numbers.append(number)
                thread = threading.Thread(
                    target=player.play, args=(number,), name=f"{SCRIPTED}-{number}", daemon=True
                )
                thread.start()
                info = _finished(fed, number, settings.round_wait())
                thread.join(settings.step_seconds + 60)
                (fed.workdir / f"{SCRIPTED}-upload-{number}.ct").unlink(missing_ok=True)
                if info.state == pb.ROUND_SUM_READY:
                    if not _applied(fed, number, settings.honest_nodes):
                        figures.not_applied.append(number)
                    if name != STALE_CHAIN:
                        follow(member, number)
            figures.seconds = time.monotonic() - started
        rounds = {r.round: r for r in fed.list_rounds() if r.round in numbers}
        audit = _audit(fed)
    finally:
        if member is not None:
            member.close()
        fed.stop_all()
    return _figures(figures, [rounds[n] for n in numbers], audit, numbers, player)


def _figures(
    figures: RunFigures,
    rounds: list[pb.RoundInfo],
    audit: list[dict[str, Any]],
    numbers: list[int],
    player: Player,
) -> RunFigures:
    published = [r for r in rounds if r.state == pb.ROUND_SUM_READY]
    failed = [r for r in rounds if r.state == pb.ROUND_FAILED]
    figures.opened = len(rounds)
    figures.published = len(published)
    figures.failed = len(failed)
    figures.withdrawn = sum(1 for r in rounds if r.state == pb.ROUND_WITHDRAWN)
    figures.share_published = len(published) / len(rounds) if rounds else 0.0
    figures.published_per_minute = 60.0 * len(published) / figures.seconds if figures.seconds else 0.0

    def mean(group: list[pb.RoundInfo]) -> float:
        return float(np.mean([r.closed_unix - r.opened_unix for r in group])) if group else 0.0

    figures.mean_round_seconds = mean(rounds)
    figures.mean_published_round_seconds = mean(published)
    figures.mean_failed_round_seconds = mean(failed)
    figures.failed_steps = dict(Counter(r.failed_step or "?" for r in failed))
    figures.reformed = sum(1 for r in rounds if r.reformed)
    mine = set(numbers)
    in_roster = {
        int(a["round"])
        for a in audit
        if a.get("msg") == "roster fixed" and a.get("round") in mine and SCRIPTED in a.get("members", [])
    }
    figures.scripted_in_roster = len(in_roster)
    named = [a for a in audit if a.get("msg") == "member named" and a.get("round") in mine]
    figures.scripted_named = len({a["round"] for a in named if a.get("actor") == SCRIPTED})
    figures.scripted_named_lines = sum(1 for a in named if a.get("actor") == SCRIPTED)
    figures.honest_named = dict(Counter(str(a.get("actor")) for a in named if a.get("actor") != SCRIPTED))
    figures.late_enrolments = sum(
        1
        for a in audit
        if a.get("msg") == "enrolment refused"
        and a.get("actor") == SCRIPTED
        and a.get("round") in mine
        and "is already fixed" in str(a.get("reason", ""))
    )
    figures.member_errors = list(player.errors)
    return figures


# --------------------------------------------------------------------------- all runs


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops its processes and the folder with
    the keys goes."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure(
    settings: Settings, behaviours: list[str], workdir: Path, progress: bool = True
) -> dict[str, Any]:
    """The baseline and every behaviour, each a fresh federation under ``workdir``."""
    runs: dict[str, RunFigures] = {}
    shared: LocalFederation | None = None
    for name in (BASELINE, *behaviours):
        fed = _federation(workdir / name, settings, shared)
        shared = shared or fed
        if progress:
            print(f"  running {name} for {settings.minutes:g} min …", file=sys.stderr, flush=True)
        runs[name] = run_once(name, fed, settings)
        if progress:
            r = runs[name]
            print(
                f"  {name}: {r.published}/{r.opened} rounds published in {r.seconds:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    base = runs[BASELINE].share_published
    return {
        "settings": asdict(settings),
        "baseline": asdict(runs[BASELINE]),
        "runs": {
            name: {
                **asdict(runs[name]),
                "share_vs_baseline": runs[name].share_published / base if base else float("nan"),
            }
            for name in behaviours
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    behaviours = [b.strip() for b in args.behaviours.split(",") if b.strip()]
    unknown = set(behaviours) - {*BEHAVIOURS, STALE_CHAIN}
    if unknown or not behaviours or args.minutes <= 0 or args.train_seconds < 0:
        raise SystemExit(
            f"python -m cipherhive.bench.hostile: error: --behaviours must be among "
            f"{', '.join((*BEHAVIOURS, STALE_CHAIN))}, --minutes positive and --train-seconds at least 0"
        )
    settings = Settings(minutes=args.minutes, train_seconds=args.train_seconds)
    with _terminated_as_interrupt():
        if args.workdir is not None:
            workdir = args.workdir.resolve()
            if workdir.exists() and any(workdir.iterdir()):
                raise SystemExit(f"python -m cipherhive.bench.hostile: error: {workdir} is not empty")
            workdir.mkdir(parents=True, exist_ok=True)
            return measure(settings, behaviours, workdir, progress=not args.json)
        # Without --workdir nothing outlives the run: the folder holds the federation's secret
        # context and private keys (0600), so it goes on an error and on Ctrl-C or SIGTERM too
        # (each run has stopped its processes by then).
        with tempfile.TemporaryDirectory(prefix="cipherhive-hostile-", ignore_cleanup_errors=True) as tmp:
            return measure(settings, behaviours, Path(tmp), progress=not args.json)


# --------------------------------------------------------------------------- output

ROWS = [
    ("opened", "rounds opened", "{:d}"),
    ("published", "rounds published", "{:d}"),
    ("failed", "rounds failed", "{:d}"),
    ("withdrawn", "published, then withdrawn", "{:d}"),
    ("share_published", "share published", "{:.3f}"),
    ("published_per_minute", "published per minute", "{:.2f}"),
    ("mean_round_seconds", "mean round (s)", "{:.2f}"),
    ("mean_published_round_seconds", "mean published round (s)", "{:.2f}"),
    ("mean_failed_round_seconds", "mean failed round (s)", "{:.2f}"),
    ("scripted_in_roster", f"{SCRIPTED} in the roster", "{:d}"),
    ("scripted_named", f"rounds {SCRIPTED} named in", "{:d}"),
    ("scripted_named_lines", f"'member named' {SCRIPTED} lines", "{:d}"),
    ("late_enrolments", f"{SCRIPTED} enrolled too late", "{:d}"),
    ("reformed", "rosters re-formed", "{:d}"),
]


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    runs = {BASELINE: report["baseline"], **report["runs"]}
    names = list(runs)
    width = max(16, *(len(n) + 2 for n in names))
    header = f"{'figure':<28}" + "".join(f"{n:>{width}}" for n in names)
    lines = [header, "-" * len(header)]
    for key, label, fmt in ROWS:
        lines.append(f"{label:<28}" + "".join(f"{fmt.format(runs[n][key]):>{width}}" for n in names))
    lines.append(
        f"{'failed at step':<28}"
        + "".join(
            f"{', '.join(f'{k} {v}' for k, v in runs[n]['failed_steps'].items()) or '-':>{width}}"
            for n in names
        )
    )
    lines.append("")
    base = report["baseline"]["share_published"]
    for name, r in report["runs"].items():
        lines.append(
            f"{name}: {r['share_published']:.3f} of rounds published against {base:.3f} without it "
            f"({r['share_vs_baseline']:.2f}x); {r['published_per_minute']:.2f} against "
            f"{report['baseline']['published_per_minute']:.2f} published per minute"
        )
    for name, r in runs.items():
        if r["honest_named"]:
            lines.append(f"warning: {name}: honest members named: {r['honest_named']}")
        if r["member_errors"]:
            lines.append(f"warning: {name}: the scripted member's errors: {r['member_errors'][:3]}")
        if r["not_applied"]:
            lines.append(
                f"warning: {name}: rounds not applied by every honest node in time: {r['not_applied']}"
            )
    lines += [
        "",
        f"{s['minutes']:g} min per run; {s['honest_nodes']} real nodes + {SCRIPTED} played by the script; "
        f"masked, floor {s['floor']}; timeout_seconds {s['timeout_seconds']:g}, enrol_seconds "
        f"{s['enrol_seconds']:g}, step_seconds {s['step_seconds']:g}, exclude_rounds {s['exclude_rounds']}, "
        f"exclude_window {s['exclude_window']}; train_seconds {s['train_seconds']:g}: {s['trainer']}",
        f"baseline: {s['baseline_member']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cipherhive.bench.hostile",
        description="One hostile member, each behaviour in turn: the share of rounds published "
        "against a run without it (docs/spec/masked-round.md §2.1, §10).",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of rounds per run (default 10)")
    parser.add_argument(
        "--behaviours",
        default=",".join(BEHAVIOURS),
        help=f"comma-separated subset of {', '.join(BEHAVIOURS)} (default: all); also {STALE_CHAIN}",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=Settings.train_seconds,
        help=f"least seconds an honest node trains each round (default {Settings.train_seconds:g})",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep every run's state and logs here (an empty or new folder)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except KeyboardInterrupt as exc:
        # Every run's finally has stopped its processes, and the temporary folder is gone.
        print(f"interrupted ({exc or 'Ctrl-C'}): processes stopped, nothing printed", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
