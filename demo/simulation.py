"""`cipherhive.simulate`: a real local federation for any trainer plug-in, with nothing to write.

It is the product, not a model of it: a real server process and one real node
process per member, CKKS encryption, mutual TLS over loopback, with keys and
certificates made for the run. Only the set-up is done for you (by
:class:`LocalFederation`, which the demos and the integration tests share, so
protocol changes land in one place). Each node gets the shared ``options`` plus
its own entry of ``node_options`` (a data shard, a file), and logs JSON lines,
from which the per-round records are read (:mod:`node_logs`). At the end the
global model is exported by ``cipherhive node export`` from the first node, and
returned as a ``state_dict``, so the caller can evaluate it on data of its own.

Relative paths in options are read from the caller's working directory: the
processes run there, and options named like paths (``*_path``, ``*_dir``,
``*_file``) are resolved against it before they are written into node.toml.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cipherhive.demo.federation import LocalFederation, ProcessFailed
from cipherhive.demo.node_logs import NodeLog
from cipherhive.demo.plugin_ref import IMPORT_RULE, PluginError, plugin_ref
from cipherhive.demo.sim_result import NodeRound, RoundRecord, SimulationError, SimulationResult
from cipherhive.node.training.plugin_paths import resolve_options
from cipherhive.v1 import federation_pb2 as pb

#: Most nodes one simulation starts (each is a process holding torch and the model).
MAX_NODES = 32


def simulate(
    trainer: Any,
    nodes: int = 3,
    rounds: int = 5,
    *,
    options: Mapping[str, Any] | None = None,
    node_options: Sequence[Mapping[str, Any]] | None = None,
    workdir: str | Path | None = None,
    python_path: Sequence[str | Path] = (),
    timeout: float = 1800.0,
    insecure: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    optimizer: Mapping[str, Any] | None = None,
) -> SimulationResult:
    """Run ``rounds`` federated rounds of ``trainer`` on ``nodes`` local node processes.

    ``trainer``: a ``"package.module:object"`` string, or a class, factory function or
    module-level instance that node processes can import by its module path (not one defined
    in ``__main__`` or a notebook: put it in a module file). Classes and functions are called
    with ``options`` merged with ``node_options[i]`` for node i. ``workdir`` keeps keys,
    certificates, state, logs and the exported model (default: a temporary folder, removed after
    a successful run). ``timeout`` bounds the whole run (seconds). ``on_round`` is called with
    each round's record as soon as every node has applied it. ``optimizer`` is the server's
    [optimizer] section (FedAvg, FedAvgM, FedAdam or FedYogi run on every node; empty: FedAvg).

    Raises :class:`SimulationError` naming the plug-in or node and its log when the plug-in
    cannot be loaded, a trainer fails, a round fails or a node stops.
    """
    ref, common, own = check_arguments(
        trainer, nodes, rounds, options, node_options, python_path, timeout=timeout
    )
    started = time.monotonic()
    if workdir is not None:
        _check_unused(Path(workdir).resolve())
    root = (
        Path(workdir).resolve() if workdir is not None else Path(tempfile.mkdtemp(prefix="cipherhive-sim-"))
    )
    fed = LocalFederation(
        root,
        nodes=nodes,
        insecure=insecure,
        plugin=ref.spec,
        node_options=common,
        per_node_options=own,
        shard_options=False,
        python_path=ref.python_path,
        node_log_json=True,
        rounds={"max_rounds": rounds, "timeout_seconds": timeout},
        optimizer=dict(optimizer or {}),
        cwd=Path.cwd(),
    )
    run = _Run(fed, ref.spec, started + timeout)
    result = SimulationResult(ref.spec, run.names, [], workdir=root)
    cut_short = False
    try:
        run.start()
        for number in range(1, rounds + 1):
            record = run.wait_round(number)
            result.rounds.append(record)
            if on_round is not None:
                on_round(record)
    except SimulationError as exc:
        exc.result = result
        raise
    except BaseException:
        # Ctrl-C, or an error of on_round's: no SimulationError points at the logs, so a
        # temporary folder (keys, certificates) goes, once its processes are stopped.
        cut_short = workdir is None
        raise
    finally:
        codes = fed.stop_all()
        if cut_short:
            shutil.rmtree(root, ignore_errors=True)
    unclean = {k: c for k, c in codes.items() if c not in (0, None)}
    if unclean:
        key = sorted(unclean)[0]
        raise SimulationError(
            f"every round finished, but {', '.join(f'{k} (exit {c})' for k, c in unclean.items())} did not "
            f"stop cleanly; see {fed.log_file(key)}",
            log=fed.log_file(key),
            result=result,
        )
    run.export(result)
    result.seconds = round(time.monotonic() - started, 2)
    if workdir is None:
        shutil.rmtree(root, ignore_errors=True)
        result.workdir = None
    return result


def check_arguments(
    trainer: Any,
    nodes: int,
    rounds: int,
    options: Mapping[str, Any] | None,
    node_options: Sequence[Mapping[str, Any]] | None,
    python_path: Sequence[str | Path],
    *,
    timeout: float = 1800.0,
) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """The plug-in as the nodes will import it, and each node's options; SimulationError if unusable."""

    def refuse(message: str) -> SimulationError:
        return SimulationError(message, started=False)

    if not 2 <= nodes <= MAX_NODES:
        raise refuse(f"nodes must be 2 to {MAX_NODES} (a sum of one update is that update), not {nodes}")
    if rounds < 1:
        raise refuse(f"rounds must be at least 1, not {rounds}")
    if not timeout > 0:
        raise refuse(f"timeout must be a positive number of seconds, not {timeout}")
    per_node = list(node_options or [])
    if node_options is not None and len(per_node) != nodes:
        raise refuse(f"node_options has {len(per_node)} entries for {nodes} nodes: give one mapping per node")
    for what, value in [
        ("options", options or {}),
        *((f"node_options[{i}]", o) for i, o in enumerate(per_node)),
    ]:
        if not isinstance(value, Mapping):
            raise refuse(f"{what} must be a mapping of option names to values, not {type(value).__name__}")
        null = _null_key(value)
        if null:
            raise refuse(
                f"{what}: option {null!r} is None/null, which a node's TOML cannot hold; leave it out"
            )
    try:
        ref = plugin_ref(trainer, python_path)
    except PluginError as exc:
        raise refuse(str(exc)) from exc
    here = Path.cwd()
    return ref, resolve_options(dict(options or {}), here), [resolve_options(dict(o), here) for o in per_node]


def _check_unused(root: Path) -> None:
    """A folder with an earlier run's state would resume that federation (its rounds are done): refuse it."""
    earlier = sorted(p.name for p in [root / "server-state", *root.glob("node-*-state")] if p.exists())
    if earlier:
        raise SimulationError(
            f"workdir {root} already holds an earlier run's state ({', '.join(earlier)}); "
            "give a new or empty folder, or delete that one",
            started=False,
        )


def _null_key(options: Mapping[str, Any], prefix: str = "") -> str:
    for key, value in options.items():
        if value is None:
            return f"{prefix}{key}"
        if isinstance(value, Mapping):
            found = _null_key(value, f"{prefix}{key}.")
            if found:
                return found
    return ""


class _Run:
    """One simulation in progress: starting it, following its rounds, explaining what went wrong."""

    def __init__(self, fed: LocalFederation, spec: str, deadline: float) -> None:
        self.fed, self.spec, self.deadline = fed, spec, deadline
        self.names = [fed.node_name(i) for i in range(fed.nodes)]
        self.logs = {name: NodeLog(fed.log_file(name)) for name in self.names}
        self.last = time.monotonic()

    def start(self) -> None:
        try:
            self.fed.setup()
        except ProcessFailed as exc:  # `node layout` loads the plug-in with node-1's options
            why = _error_line(exc.output)
            hint = f" ({IMPORT_RULE}; python_path= adds folders)" if "cannot import" in why else ""
            raise SimulationError(
                f"plug-in {self.spec} could not be loaded with {self.names[0]}'s options: {why}"
                f"{hint}; full output in {exc.log}",
                log=exc.log,
                started=False,
            ) from exc
        try:
            self.fed.start()
        except (RuntimeError, TimeoutError) as exc:
            log = self.fed.log_file("server")
            raise SimulationError(f"the server did not start: {exc}; see {log}", log=log) from exc
        self.last = time.monotonic()

    def wait_round(self, number: int) -> RoundRecord:
        """Wait until every node applied round ``number``; fail at once when something says it won't."""
        remaining = self.deadline - time.monotonic()
        try:
            info: pb.RoundInfo = self.fed.wait_for(
                lambda: self._done(number), max(remaining, 0.0), f"round {number}"
            )
        except ProcessFailed as exc:
            raise self._process_failed(exc, number) from exc
        except TimeoutError as exc:
            raise SimulationError(
                f"round {number} did not finish within the timeout; nodes' last words: {self._last_words()}; "
                f"logs in {self.fed.workdir}",
                log=self.fed.log_file("server"),
            ) from exc
        for log in self.logs.values():
            log.poll()  # a node logs before it reports to the server: its lines are all there now
        now = time.monotonic()
        record = RoundRecord(
            round=number,
            participants=sorted(s.node_name for s in info.submissions),
            seconds=round(now - self.last, 2),
            aggregation_seconds=round(max(info.closed_unix - info.opened_unix, 0.0), 2),
            nodes={name: self._node_round(name, number) for name in self.names},
        )
        self.last = now
        return record

    def _done(self, number: int) -> pb.RoundInfo | None:
        for name, log in self.logs.items():
            log.poll()
            why = log.failure(number)
            if why:
                raise SimulationError(
                    f"round {number}: {name} could not take part: {why} (plug-in {self.spec}); "
                    f"see {log.path}",
                    log=log.path,
                )
        info = self.fed.get_round(number)
        if info is None or info.state == pb.ROUND_OPEN:
            return None
        if info.state == pb.ROUND_FAILED:
            raise SimulationError(
                f"round {number} failed: {info.reason}; nodes' last words: {self._last_words()}; "
                f"logs in {self.fed.workdir}",
                log=self.fed.log_file("server"),
            )
        if info.state == pb.ROUND_WITHDRAWN:
            raise SimulationError(
                f"round {number} was withdrawn: {info.withdrawn_reason}; logs in {self.fed.workdir}",
                log=self.fed.log_file("server"),
            )
        outcomes = {o.node_name: o for o in info.outcomes}
        for name, outcome in sorted(outcomes.items()):
            if not outcome.applied:
                log_path = self.fed.log_file(name)
                raise SimulationError(
                    f"round {number}: {name} rejected the sum: {outcome.reason}; see {log_path}", log=log_path
                )
        # Only participants report an outcome to the server; the others follow and apply it too.
        submitted = {s.node_name for s in info.submissions}
        done = all(
            name in outcomes if name in submitted else self.logs[name].applied(number) is not None
            for name in self.names
        )
        return info if done else None

    def _node_round(self, name: str, number: int) -> NodeRound:
        log = self.logs[name]
        sent, applied = log.submitted(number), log.applied(number)
        evaluation = _federated_eval(applied)
        if sent is None:
            return NodeRound(
                submitted=False,
                applied=applied is not None,
                apply_seconds=_get(applied, "fetch_decrypt_apply_s"),
                federated_eval=evaluation,
            )
        return NodeRound(
            submitted=True,
            samples=int(sent["samples"]) if "samples" in sent else None,
            metrics={str(k): float(v) for k, v in dict(sent.get("metrics") or {}).items()},
            train_seconds=_get(sent, "train_s"),
            encrypt_upload_seconds=_get(sent, "encrypt_upload_s"),
            upload_bytes=int(sent["bytes"]) if "bytes" in sent else None,
            applied=applied is not None,
            apply_seconds=_get(applied, "fetch_decrypt_apply_s"),
            federated_eval=evaluation,
        )

    def _process_failed(self, exc: ProcessFailed, number: int) -> SimulationError:
        if exc.who in self.logs:
            log = self.logs[exc.who]
            log.poll()
            return SimulationError(
                f"{exc.who} stopped (exit {exc.code}) in round {number}: "
                f"{log.last_error() or 'no error logged'} "
                f"(plug-in {self.spec}); see {exc.log}",
                log=exc.log,
            )
        return SimulationError(
            f"{exc.who} stopped (exit {exc.code}) in round {number}; see {exc.log}", log=exc.log
        )

    def _last_words(self) -> str:
        words = []
        for name, log in self.logs.items():
            log.poll()
            error = log.last_error()
            if error:
                words.append(f"{name}: {error}")
        return "; ".join(words) or "none logged an error"

    def export(self, result: SimulationResult) -> None:
        """The final global model, through `cipherhive node export` of the first node."""
        from cipherhive.node.export import load_export

        try:
            out = self.fed.export_model(0, self.fed.workdir / "model")
        except ProcessFailed as exc:
            raise SimulationError(
                f"every round finished, but exporting the model failed: {_error_line(exc.output)}; "
                f"see {exc.log}",
                log=exc.log,
                result=result,
            ) from exc
        exported = load_export(out)
        result.state_dict, result.model_round = exported.tensors, exported.round


def _get(doc: dict[str, Any] | None, key: str) -> float | None:
    return float(doc[key]) if doc is not None and key in doc else None


def _error_line(output: str) -> str:
    """The line of a command's output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return lines[-1] if lines else "no output"


def _federated_eval(applied: dict[str, Any] | None) -> dict[str, float]:
    """The ``eval_*`` fields of a node's "applied round sum" line (already rounded by the node)."""
    if applied is None:
        return {}
    out = {
        key[len("eval_") :]: float(value)
        for key, value in applied.items()
        if key.startswith("eval_") and isinstance(value, int | float)
    }
    return out if out.get("examples") else {}
