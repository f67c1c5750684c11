"""Which modules and functions one masked round passes through, from a real run.

``python -m cipherhive.bench.trace_round [--json] [--list] [--workdir DIR]``

Measures the layout of the code, not its speed: "one masked round touches N
files in M steps, with K folder crossings and R returns to a file already
visited". Nothing is hard-coded about where code lives, so the figures can be
compared before and after files move.

The run
    A real local federation (:class:`cipherhive.demo.federation.LocalFederation`):
    a server and 3 node processes on loopback, mutual TLS, masked rounds (the
    default with TLS), the digits demo trainer with one epoch. The script opens
    the rounds itself (``auto_start = false``, admin ``StartRound``; ``max_rounds
    = 2`` as a guard) and opens round 2 only once every node has applied round 1
    and reported it, so round 2 does not overlap the tail of round 1. Round 2 is
    the one traced: round 1 also carries first-time work (imports, caches, the
    first connection).

Tracing, without changing product code
    A ``sitecustomize.py`` (the :data:`SITECUSTOMIZE` text) is written to a
    temporary folder that is prepended to ``PYTHONPATH`` of the server and node
    processes only (and so of the processes they spawn: the server's ingest
    workers). It installs ``sys.setprofile`` / ``threading.setprofile`` hooks that
    record every ``call`` event of a code object whose file is inside the
    repository (not the virtual environment, not ``tests/``) as (time, pid,
    thread name, repository-relative path, qualified name), plus the ``return``
    events of the few functions that mark the window (below). Records are kept in
    memory and appended to ``trace-<pid>.jsonl`` in ``$CIPHERHIVE_TRACE_DIR``
    every 2 s, whenever 50,000 are buffered, and at exit (a daemon stopped with
    SIGTERM exits normally, so ``atexit`` runs); the last line marks a complete
    trace. Each process's first line names its parent, so spawned workers are
    counted with the daemon that started them.

The window of round 2
    Start: the server's call of the function that opens a round (qualified name
    ending in ``start_round``; the innermost such call during the script's
    ``StartRound`` request for round 2, i.e. ``RoundManager.start_round``). If the
    trace has no such call: the time of the server's "round opened" audit line
    for round 2 (its log has second resolution).
    End: the moment the last node has applied round 2, i.e. the latest, over the
    nodes, return of the function that applies a published sum (qualified name
    ending in ``_apply_sum``) that follows the node's "applied round sum" log
    line for round 2 (JSON logs, millisecond timestamps). If a node's trace has
    no such return: that log line's time. Functions are looked up by name
    suffix, never by file, so moving them does not break the script.

Figures (per party, and overall)
    A *party* is the server or one node, each with every process it spawned.
    Within one process the call events of the window, in time order (all threads
    together), are collapsed into *steps*: a step is a run of consecutive calls
    in one file. A party's steps are its processes' steps merged by start time;
    *overall* merges the server's and node-1's steps the same way.

    * files: distinct files with at least one call;
    * folders: distinct parent folders of those files (``server``, ``common``,
      ``node/trainers``, …);
    * steps: length of the step sequence;
    * crossings: consecutive steps whose files are in different parent folders;
    * returns: steps that enter a file already visited earlier in the sequence,
      other than in the step just before;
    * hops (overall only): consecutive steps that belong to different parties
      (server ↔ node);
    * calls: call events in the window.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cipherhive.demo.federation import LocalFederation
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

#: The round traced (round 1 carries first-time work: imports, caches, connections).
ROUND = 2
NODES = 3
#: The node whose steps are merged with the server's into the "overall" sequence.
OVERALL_NODE = "node-1"
#: Qualified-name suffixes of the function that opens a round (server) and the one that
#: applies a published sum (node): the window's ends. Looked up by name, never by file.
OPEN_SUFFIX = "start_round"
APPLY_SUFFIX = "_apply_sum"

TRACE_DIR_ENV = "CIPHERHIVE_TRACE_DIR"
TRACE_ROOT_ENV = "CIPHERHIVE_TRACE_ROOT"
TRACE_SKIP_ENV = "CIPHERHIVE_TRACE_SKIP"
TRACE_RETURNS_ENV = "CIPHERHIVE_TRACE_RETURNS"

#: Written to a temporary folder that is put first on the traced processes' PYTHONPATH.
SITECUSTOMIZE = r'''"""Call tracer of cipherhive.bench.trace_round, which writes it (not product code)."""

import atexit
import collections
import json
import os
import sys
import threading
import time


def _install():
    out_dir = os.environ.get("CIPHERHIVE_TRACE_DIR")
    root = os.environ.get("CIPHERHIVE_TRACE_ROOT")
    if not out_dir or not root:
        return
    roots = tuple({os.path.join(root, ""), os.path.join(os.path.realpath(root), "")})
    skip = tuple(s for s in os.environ.get("CIPHERHIVE_TRACE_SKIP", "").split(os.pathsep) if s)
    marks = tuple(s for s in os.environ.get("CIPHERHIVE_TRACE_RETURNS", "").split(",") if s)
    flush_every = int(os.environ.get("CIPHERHIVE_TRACE_FLUSH", "50000"))
    state = {"pid": os.getpid(), "header": False}
    buf = collections.deque()
    cache = {}
    marked = set()
    lock = threading.Lock()
    now = time.time
    current = threading.current_thread

    def classify(code):
        name = code.co_filename
        rel = ""
        for prefix in roots:
            if name.startswith(prefix):
                if not name.startswith(skip) and "site-packages" not in name:
                    rel = name[len(prefix):]
                break
        cache[code] = rel
        if rel:
            qualname = code.co_qualname
            for mark in marks:
                if qualname == mark or qualname.endswith("." + mark):
                    marked.add(code)
        return rel

    def flush(final=False):
        if not lock.acquire(timeout=10 if final else 0):
            return
        try:
            lines = []
            if not state["header"]:
                state["header"] = True
                head = {"pid": state["pid"], "ppid": os.getppid(), "argv": list(sys.argv)}
                lines.append(json.dumps(head))
            for _ in range(len(buf)):
                lines.append(json.dumps(buf.popleft()))
            if final:
                lines.append(json.dumps({"end": now(), "pid": state["pid"]}))
            path = os.path.join(out_dir, "trace-%d.jsonl" % state["pid"])
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
        except Exception:
            pass
        finally:
            lock.release()

    def hook(frame, event, arg):
        if event == "call":
            code = frame.f_code
            rel = cache.get(code)
            if rel is None:
                rel = classify(code)
            if rel:
                buf.append((now(), state["pid"], current().name, rel, code.co_qualname, "call"))
                if len(buf) >= flush_every:
                    flush()
        elif event == "return":
            code = frame.f_code
            if code in marked:
                buf.append((now(), state["pid"], current().name, cache[code], code.co_qualname, "return"))

    def periodic():
        while True:
            time.sleep(2.0)
            flush()

    def start_flusher():
        threading.Thread(target=periodic, name="cipherhive-trace-flush", daemon=True).start()

    def after_fork():
        state["pid"] = os.getpid()
        state["header"] = False
        buf.clear()
        start_flusher()

    os.makedirs(out_dir, exist_ok=True)
    atexit.register(flush, True)
    os.register_at_fork(after_in_child=after_fork)
    start_flusher()
    threading.setprofile(hook)
    sys.setprofile(hook)


_install()
del _install
'''


# --------------------------------------------------------------------------- reading traces


@dataclass
class Call:
    time: float
    pid: int
    thread: str
    file: str
    function: str
    kind: str  # "call" or "return"


@dataclass
class ProcessTrace:
    pid: int
    ppid: int = 0
    argv: list[str] = field(default_factory=list)
    complete: bool = False
    calls: list[Call] = field(default_factory=list)


def read_traces(folder: Path) -> dict[int, ProcessTrace]:
    """Every process's trace in ``folder`` (``trace-<pid>.jsonl``), calls in time order."""
    out: dict[int, ProcessTrace] = {}
    for path in sorted(folder.glob("trace-*.jsonl")):
        pid = int(path.stem.split("-", 1)[1])
        trace = out.setdefault(pid, ProcessTrace(pid))
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed process
            if isinstance(item, dict):
                if "end" in item:
                    trace.complete = True
                else:
                    trace.ppid = int(item.get("ppid", 0))
                    trace.argv = [str(a) for a in item.get("argv", [])]
            elif isinstance(item, list) and len(item) == 6:
                t, p, thread, file, function, kind = item
                trace.calls.append(Call(float(t), int(p), str(thread), str(file), str(function), str(kind)))
        trace.calls.sort(key=lambda c: c.time)
    return out


def assign_parties(traces: dict[int, ProcessTrace], roots: dict[int, str]) -> dict[int, str]:
    """pid -> party, for every traced process that is a root or descends from one."""
    parties: dict[int, str] = {}
    for pid in traces:
        seen: set[int] = set()
        current = pid
        while current not in roots and current in traces and current not in seen:
            seen.add(current)
            current = traces[current].ppid
        if current in roots:
            parties[pid] = roots[current]
    return parties


def matches(function: str, suffix: str) -> bool:
    return function == suffix or function.endswith("." + suffix)


# --------------------------------------------------------------------------- logs (the fallback)

_READABLE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \S+\s+\S+: (.*)$")


def log_times(text: str, message: str, number: int) -> list[tuple[float, float]]:
    """(time, resolution in seconds) of each log line ``message`` about round ``number``.

    Reads JSON lines (``ts``, millisecond resolution) and readable lines (whole seconds,
    local time, rounded down).
    """
    found: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("msg") == message and doc.get("round") == number:
                found.append((float(doc["ts"]), 0.001))
            continue
        match = _READABLE.match(line)
        if match is None or not match.group(2).startswith(message + " ["):
            continue
        if re.search(rf"\bround={number}\b", match.group(2)):
            stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            found.append((stamp, 1.0))
    return found


# --------------------------------------------------------------------------- steps and figures


@dataclass
class Step:
    party: str
    pid: int
    file: str
    start: float
    end: float
    functions: list[str] = field(default_factory=list)
    calls: int = 0
    threads: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return folder_of(self.file)

    def as_dict(self) -> dict[str, Any]:
        return {
            "party": self.party,
            "pid": self.pid,
            "file": self.file,
            "functions": self.functions,
            "calls": self.calls,
            "threads": self.threads,
            "start": round(self.start, 6),
            "end": round(self.end, 6),
        }


def folder_of(file: str) -> str:
    parent = file.rpartition("/")[0]
    return parent or "."


def collapse(calls: Iterable[Call], party: str) -> list[Step]:
    """One process's calls (time order) as steps: runs of consecutive calls in one file."""
    steps: list[Step] = []
    for call in calls:
        if not steps or steps[-1].file != call.file:
            steps.append(Step(party, call.pid, call.file, call.time, call.time))
        step = steps[-1]
        step.end = call.time
        step.calls += 1
        if call.function not in step.functions:
            step.functions.append(call.function)
        if call.thread not in step.threads:
            step.threads.append(call.thread)
    return steps


def merge(sequences: Iterable[Sequence[Step]]) -> list[Step]:
    """Steps of several processes or parties, by start time."""
    return sorted((s for seq in sequences for s in seq), key=lambda s: (s.start, s.pid))


def figures(steps: Sequence[Step], hops: bool = False) -> dict[str, int | None]:
    files = {s.file for s in steps}
    pairs = list(itertools.pairwise(steps))
    crossings = sum(1 for a, b in pairs if a.folder != b.folder)
    returns = 0
    earlier: set[str] = set()  # files of every step but the one just before
    for i, step in enumerate(steps):
        if step.file in earlier:
            returns += 1
        if i >= 1:
            earlier.add(steps[i - 1].file)
    return {
        "files": len(files),
        "folders": len({folder_of(f) for f in files}),
        "steps": len(steps),
        "crossings": crossings,
        "returns": returns,
        "hops": sum(1 for a, b in pairs if a.party != b.party) if hops else None,
        "calls": sum(s.calls for s in steps),
    }


def summary(steps: Sequence[Step], hops: bool = False) -> dict[str, Any]:
    return {
        "figures": figures(steps, hops),
        "files": sorted({s.file for s in steps}),
        "steps": [s.as_dict() for s in steps],
    }


# --------------------------------------------------------------------------- the window


@dataclass
class Window:
    start: float
    end: float
    start_source: str
    end_sources: dict[str, str]


def window_start(
    server_calls: Sequence[Call], bracket: tuple[float, float], server_log: str
) -> tuple[float, str]:
    """The server's call of the round-opening function during the StartRound request of round 2."""
    lo, hi = bracket
    candidates = [c for c in server_calls if c.kind == "call" and matches(c.function, OPEN_SUFFIX)]
    inside = [c for c in candidates if lo <= c.time <= hi]
    if inside:
        call = inside[-1]  # the innermost: the request's handler calls the manager's method
        return call.time, f"trace: {call.file} {call.function} (call)"
    opened = log_times(server_log, "round opened", ROUND)
    if not opened:
        raise RuntimeError(f"no call of *{OPEN_SUFFIX} and no 'round opened' line for round {ROUND}")
    return opened[0][0], f"log: server 'round opened' round={ROUND} (resolution {opened[0][1]:g} s)"


def node_end(calls: Sequence[Call], node_log: str, name: str, after: float) -> tuple[float, str]:
    """When node ``name`` had applied round 2: its return from the sum-applying function."""
    applied = log_times(node_log, "applied round sum", ROUND)
    if not applied:
        raise RuntimeError(f"{name} logged no 'applied round sum' for round {ROUND}")
    logged, resolution = applied[0]
    # A readable time is rounded down; a JSON one is rounded to the millisecond.
    floor = logged - (resolution if resolution < 1 else 0.0)
    for call in calls:
        if call.kind == "return" and matches(call.function, APPLY_SUFFIX) and call.time >= max(floor, after):
            return call.time, f"trace: {call.file} {call.function} (return)"
    return logged, f"log: {name} 'applied round sum' round={ROUND} (resolution {resolution:g} s)"


# --------------------------------------------------------------------------- the run


def repo_root() -> Path:
    """The repository: the nearest folder above this file that holds pyproject.toml."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "pyproject.toml").exists():
            return folder
    raise RuntimeError(f"no pyproject.toml above {here}")


def _trace_env(root: Path, workdir: Path, site: Path, traces: Path) -> dict[str, str]:
    python_path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    skip = [root / ".venv", root / "tests", workdir]
    return {
        "PYTHONPATH": python_path,
        TRACE_DIR_ENV: str(traces),
        TRACE_ROOT_ENV: str(root),
        TRACE_SKIP_ENV: os.pathsep.join(os.path.join(str(p), "") for p in skip),
        TRACE_RETURNS_ENV: f"{OPEN_SUFFIX},{APPLY_SUFFIX}",
    }


def _wait_online(fed: LocalFederation, admin: pb_grpc.AdminStub, count: int, timeout: float) -> None:
    def online() -> bool:
        nodes = admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes
        return sum(bool(n.online) for n in nodes) >= count

    fed.wait_for(online, timeout, f"{count} nodes online")


def _wait_applied(fed: LocalFederation, admin: pb_grpc.AdminStub, number: int, timeout: float) -> None:
    """Every node logged that it applied round ``number`` and the server heard it from each."""
    names = [fed.node_name(i) for i in range(fed.nodes)]

    def done() -> bool:
        if not all(log_times(fed.log(name), "applied round sum", number) for name in names):
            return False
        info = admin.GetRound(pb.GetRoundRequest(round=number), timeout=10)
        if info.state == pb.ROUND_FAILED:
            raise RuntimeError(f"round {number} failed:\n{fed.log('server')[-3000:]}")
        return {str(o.node_name) for o in info.outcomes if o.applied} >= set(names)

    fed.wait_for(done, timeout, f"every node to apply round {number}")


def _open_round(admin: pb_grpc.AdminStub) -> tuple[int, float, float]:
    """Open a round (admin StartRound): its number, and the times before and after the request."""
    before = time.time()
    number = int(admin.StartRound(pb.StartRoundRequest(), timeout=60).round)
    return number, before, time.time()


def run_federation(workdir: Path, timeout: float) -> dict[str, Any]:
    """Run two masked rounds with the server and nodes traced; the analysis of round 2."""
    root = repo_root()
    site, traces = workdir / "site", workdir / "trace"
    site.mkdir(parents=True)
    traces.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = _trace_env(root, workdir, site, traces)
    fed = LocalFederation(
        workdir / "federation",
        nodes=NODES,
        node_options={"epochs": 1},
        node_log_json=True,
        rounds={"auto_start": False, "max_rounds": ROUND, "timeout_seconds": 300.0, "enrol_seconds": 60.0},
    )
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    bracket = (0.0, 0.0)
    try:
        fed.setup()
        fed.start_server(env=env)
        fed.wait_serving(timeout=min(120.0, left()))
        for i in range(NODES):
            fed.start_node(i, env=env)
        with fed.admin_channel() as channel:
            admin = pb_grpc.AdminStub(channel)
            _wait_online(fed, admin, NODES, left())
            for expected in range(1, ROUND + 1):
                number, before, after = _open_round(admin)
                if number != expected:
                    raise RuntimeError(f"opened round {number}, expected round {expected}")
                bracket = (before, after)
                _wait_applied(fed, admin, number, left())
        time.sleep(1.0)  # the node's after_round hook, then its return from applying
    finally:
        codes = fed.stop_all()
    roots = {proc.pid: key for key, proc in fed.procs.items()}
    return analyse(fed, read_traces(traces), roots, bracket, codes)


def analyse(
    fed: LocalFederation,
    traces: dict[int, ProcessTrace],
    roots: dict[int, str],
    bracket: tuple[float, float],
    codes: dict[str, int | None],
) -> dict[str, Any]:
    parties = assign_parties(traces, roots)
    by_party: dict[str, list[ProcessTrace]] = {}
    for pid, party in parties.items():
        by_party.setdefault(party, []).append(traces[pid])
    names = ["server", *(fed.node_name(i) for i in range(fed.nodes))]
    missing = [n for n in names if n not in by_party]
    if missing:
        raise RuntimeError(f"no trace from {', '.join(missing)} (is the sitecustomize loaded?)")

    def party_calls(party: str) -> list[Call]:
        return sorted((c for t in by_party[party] for c in t.calls), key=lambda c: c.time)

    start, start_source = window_start(party_calls("server"), bracket, fed.log("server"))
    ends = {n: node_end(party_calls(n), fed.log(n), n, start) for n in names[1:]}
    end = max(t for t, _ in ends.values())
    window = Window(start, end, start_source, {n: src for n, (_, src) in ends.items()})

    steps: dict[str, list[Step]] = {}
    for party in names:
        per_process = [
            collapse((c for c in t.calls if c.kind == "call" and start <= c.time <= end), party)
            for t in sorted(by_party[party], key=lambda t: t.pid)
        ]
        steps[party] = merge(per_process)
    overall = merge([steps["server"], steps[OVERALL_NODE]])
    return {
        "round": ROUND,
        "nodes": fed.nodes,
        "window": {
            "start": round(window.start, 6),
            "end": round(window.end, 6),
            "seconds": round(window.end - window.start, 3),
            "start_source": window.start_source,
            "end_sources": window.end_sources,
        },
        "parties": {party: summary(steps[party]) for party in names},
        "overall": {"parties": ["server", OVERALL_NODE], **summary(overall, hops=True)},
        "processes": [
            {
                "pid": t.pid,
                "party": parties.get(t.pid),
                "argv": t.argv,
                "complete": t.complete,
                "calls": len(t.calls),
            }
            for t in sorted(traces.values(), key=lambda t: t.pid)
        ],
        "exit_codes": codes,
    }


# --------------------------------------------------------------------------- output

COLUMNS = ("files", "folders", "steps", "crossings", "returns", "hops", "calls")


def table(report: dict[str, Any]) -> str:
    w = report["window"]
    lines = [
        f"Round {report['round']} of a {report['nodes']}-node masked federation "
        f"(digits trainer, 1 epoch): window {w['seconds']:.3f} s",
        f"  from {w['start_source']}",
        *(f"  to   {name}: {src}" for name, src in w["end_sources"].items()),
        "",
        f"{'party':<24}" + "".join(f"{c:>10}" for c in COLUMNS),
    ]
    rows = [(name, doc["figures"]) for name, doc in report["parties"].items()]
    rows.append((f"overall ({' + '.join(report['overall']['parties'])})", report["overall"]["figures"]))
    for name, figs in rows:
        cells = "".join(f"{'-' if figs[c] is None else figs[c]:>10}" for c in COLUMNS)
        lines.append(f"{name:<24}{cells}")
    incomplete = [p for p in report["processes"] if p["party"] and not p["complete"]]
    for p in incomplete:
        lines.append(f"warning: the trace of pid {p['pid']} ({p['party']}) has no end mark")
    bad = {k: v for k, v in report["exit_codes"].items() if v not in (0, None)}
    if bad:
        lines.append(f"warning: exit codes {bad}")
    return "\n".join(lines)


def listing(report: dict[str, Any]) -> str:
    lines: list[str] = []
    sections = [(name, doc["steps"]) for name, doc in report["parties"].items()]
    sections.append(("overall", report["overall"]["steps"]))
    for name, steps in sections:
        lines += ["", f"== {name}: {len(steps)} steps"]
        for i, step in enumerate(steps, 1):
            who = f"[{step['party']}] " if name == "overall" else ""
            lines.append(f"{i:6d} {who}{step['file']}: {', '.join(step['functions'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cipherhive.bench.trace_round",
        description="Trace one masked round of a real local federation: files, steps, folder crossings.",
    )
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument("--list", action="store_true", help="also print every step (file: functions)")
    parser.add_argument(
        "--workdir", type=Path, help="keep the federation, logs and traces here (an empty or new folder)"
    )
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        workdir = args.workdir.resolve()
        if workdir.exists() and any(workdir.iterdir()):
            parser.error(f"{workdir} is not empty")
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="cipherhive-trace-"))
    try:
        report = run_federation(workdir, args.timeout)
    finally:
        if args.workdir is None:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(table(report))
        if args.list:
            print(listing(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
