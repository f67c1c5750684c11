"""Measure the product and its baselines in one run, on the same transport, and print a table.

Two kinds of figures:

* in-process, on one sample of the update (up to ``--sample`` values): encode+encrypt
  throughput with one worker and with all, server ingest (load + add) on one
  core, decryption, and the largest error of the decrypted average against numpy;
* end to end, with a real server and real node processes over mutual TLS on
  loopback: round wall time, bytes uploaded and downloaded per parameter, and
  the peak resident memory of the server and of a node.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cipherhive.bench import baselines, masked, phases
from cipherhive.bench import ingest as bench_ingest
from cipherhive.bench.options import MODES, add_bench_arguments
from cipherhive.bench.synthetic import member_samples, member_update
from cipherhive.ckks import codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import LEADING_VALUES, WEIGHT_SLOT
from cipherhive.node.crypto.pool import DEFAULT_CODEC, CryptoPool, default_workers
from cipherhive.node.training.update import weighted_vector
from cipherhive.runtime.fsutil import atomic_write
from cipherhive.secagg import masking
from cipherhive.server.ingest.running_sum import MaskedSum, RunningSum
from cipherhive.v1 import federation_pb2 as pb

WEIGHT_UNIT = 1000.0


@dataclass(frozen=True)
class Codecs:
    factory: str
    key: bytes
    server: codec.ServerCodec


def codecs_for(mode: str, keydir: Path) -> Codecs:
    if mode == "plaintext":
        return Codecs("cipherhive.bench.baselines:PlainNodeCodec", b"", baselines.PlainServerCodec())
    if mode == "tenseal-vector":
        secret = (keydir / "tenseal-secret.ctx").read_bytes()
        return Codecs(
            "cipherhive.bench.baselines:TensealNodeCodec",
            secret,
            baselines.TensealServerCodec((keydir / "tenseal-public.ctx").read_bytes()),
        )
    return Codecs(
        DEFAULT_CODEC,
        (keydir / keys.SECRET_FILE).read_bytes(),
        codec.PublicCodec((keydir / keys.PUBLIC_FILE).read_bytes()),
    )


def _vectors(size: int, nodes: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Members' ``[w, 1.0, e…, w·Δ…]`` vectors for ``size - LEADING_VALUES`` parameters, and the
    exact average."""
    params = size - LEADING_VALUES
    zero = np.zeros(params, dtype=np.float32)
    vectors, weighted, total = [], np.zeros(params), 0
    for shard in range(nodes):
        update = member_update(params, 7, 1, shard)
        samples = member_samples(shard)
        vectors.append(weighted_vector(update, zero, samples, WEIGHT_UNIT, 64))
        weighted += samples * update.astype(np.float64)
        total += samples
    return vectors, weighted / total


#: Throughputs are the best of this many passes: the machine's other work only ever slows
#: a pass down, so the fastest one is the closest to what the code itself costs.
REPEATS = 3


def _best_seconds(fn: Any) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def in_process(mode: str, keydir: Path, sample: int, nodes: int, workers: int) -> dict[str, float]:
    c = codecs_for(mode, keydir)
    vectors, expected = _vectors(sample, nodes)
    blobs: list[list[bytes]] = []
    with CryptoPool(c.key, 1, c.factory) as one:
        per_block = one.values_per_block
        blobs = [list(one.encrypt_vector(v)) for v in vectors]
        encrypt_1 = sample / _best_seconds(lambda: list(one.encrypt_vector(vectors[0])))
    with CryptoPool(c.key, workers or default_workers(), c.factory) as pool:
        list(pool.encrypt_vector(vectors[0][: per_block * pool.workers]))  # workers up and warm
        encrypt_all = sample / _best_seconds(lambda: list(pool.encrypt_vector(vectors[0])))

    figures: dict[str, float] = {
        "encrypt_params_per_s_1_worker": encrypt_1,
        "encrypt_params_per_s_all_workers": encrypt_all,
        "encrypt_speedup_all_vs_1": encrypt_all / encrypt_1,
    }
    if mode == "cipherhive":
        # The product's rounds are masked: Σ c0 on the server, c1 rebuilt from seeds on the nodes.
        assert isinstance(c.server, codec.PublicCodec)
        figures.update(_masked_sum(c.server, c.key, vectors, expected, sample, workers))
        return figures

    def ingest_all() -> RunningSum:
        running = RunningSum(c.server, len(blobs[0]))
        for member in blobs:
            for index, blob in enumerate(member):
                running.add(index, c.server.load(blob))
        return running

    ingest = nodes * sample / _best_seconds(ingest_all)
    summed_blobs = list(ingest_all().serialized())
    with CryptoPool(c.key, 1, c.factory) as one:
        decrypt_1 = sample / _best_seconds(lambda: list(one.decrypt(summed_blobs)))
        summed = np.concatenate(list(one.decrypt(summed_blobs)))
    mean = summed[LEADING_VALUES:sample] / summed[WEIGHT_SLOT]
    figures.update(
        {
            "server_ingest_params_per_s": ingest,
            "server_ingest_params_per_s_all_cores": ingest,
            "server_ingest_speedup_all_vs_1": 1.0,
            "decrypt_params_per_s_1_worker": decrypt_1,
            "max_abs_error": float(np.abs(mean - expected).max()),
            "upload_bytes_per_param_sample": sum(len(b) for b in blobs[0]) / sample,
            "download_bytes_per_param_sample": sum(len(b) for b in summed_blobs) / sample,
        }
    )
    return figures


def _masked_sum(
    public: codec.PublicCodec,
    secret_context: bytes,
    vectors: list[np.ndarray],
    expected: np.ndarray,
    sample: int,
    workers: int,
) -> dict[str, float]:
    """Ingest (1 core and all), and decryption with c1 rebuilt from every member's seed."""
    secret = codec.SecretCodec(secret_context)
    per_block = secret.values_per_block
    plans = [masking.MaskPlan.fresh([], secret.modulus) for _ in vectors]
    uploads = [
        [
            secret.encrypt_masked(v[start : start + per_block], i, plan)
            for i, start in enumerate(range(0, v.shape[0], per_block))
        ]
        for v, plan in zip(vectors, plans, strict=True)
    ]
    cores = workers or default_workers()
    # At least INGEST_BLOCKS blocks in all, as longer uploads of the same members (a pass of a
    # few milliseconds would measure thread start-up, not ingest; one thread per member, as
    # in the server).
    repeat = -(-bench_ingest.INGEST_BLOCKS // (len(uploads) * len(uploads[0])))
    longer = [member * repeat for member in uploads]
    ingest_1 = bench_ingest.measure(public, longer, 1)
    ingest_all = bench_ingest.measure(public, longer, cores) if cores > 1 else ingest_1
    running = MaskedSum(public.upload_parser(), len(uploads[0]))
    for member in uploads:
        for index, blob in enumerate(member):
            running.add(index, running.load(blob))
    running.remove_self_masks([p.self_seed for p in plans])
    records = list(running.serialized())
    seeds = [[masking.upload_seed(m[i]) for m in uploads] for i in range(len(records))]

    def decrypt() -> list[np.ndarray]:
        return [secret.decrypt_c0_sum(r, s, i) for i, (r, s) in enumerate(zip(records, seeds, strict=True))]

    decrypt_1 = sample / _best_seconds(decrypt)
    summed = np.concatenate(decrypt())
    mean = summed[LEADING_VALUES:sample] / summed[WEIGHT_SLOT]
    return {
        "server_ingest_params_per_s": ingest_1,
        "server_ingest_params_per_s_all_cores": ingest_all,
        "server_ingest_speedup_all_vs_1": ingest_all / ingest_1,
        "decrypt_params_per_s_1_worker": decrypt_1,
        "max_abs_error": float(np.abs(mean - expected).max()),
        "upload_bytes_per_param_sample": sum(len(b) for b in uploads[0]) / sample,
        "download_bytes_per_param_sample": sum(len(r) for r in records) / sample,
    }


def _peak_rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0


def baseline_rss() -> int:
    """Peak RSS of a node process before it holds any model: interpreter, torch, TenSEAL, gRPC."""
    code = (
        "import re, pathlib, cipherhive.node.daemon;"
        "print(re.search(r'VmHWM:\\s+(\\d+)', pathlib.Path('/proc/self/status').read_text()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


def end_to_end(mode: str, keydir: Path, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    records = workdir / "records"
    fed = LocalFederation(
        workdir,
        nodes=args.nodes,
        plugin="cipherhive.bench.synthetic:SyntheticTrainer",
        node_options={"params": args.params, "record_dir": str(records)},
        rounds={
            # Every member takes part in every round: the figures are for --nodes members.
            "min_participants": args.nodes,
            "max_rounds": args.rounds,
            "timeout_seconds": 7200.0,
            "interval_seconds": 0.5,
            "weight_unit": WEIGHT_UNIT,
            # The product's pipeline runs masked rounds; the baselines have no SEAL format to mask.
            "masked": mode == "cipherhive",
        },
        masked=mode == "cipherhive",
        launcher="cipherhive.bench.launch",
        env={
            "CIPHERHIVE_BENCH_MODE": mode,
            "CIPHERHIVE_BENCH_KEYS": str(keydir),
            # Millisecond timestamps for the phase breakdown (bench.phases).
            "CIPHERHIVE_LOG_LOG_JSON": "true",
            "CIPHERHIVE_LIMITS_INGEST_WORKERS": str(args.ingest_workers),
        },
        node_settings={"workers": args.workers},
        server_settings={"grace_seconds": 2.0},
    )
    fed.setup()
    try:
        fed.start()

        def done() -> bool:
            count: int = len(list(records.glob(f"round-{args.rounds}-shard-*.json")))
            return count == int(args.nodes)

        fed.wait_for(done, 7200, f"{mode}: {args.rounds} rounds")
        rounds = [r for r in fed.list_rounds() if r.state == pb.ROUND_SUM_READY]
        server_rss = _peak_rss(fed.procs["server"].pid)
        node_rss = max(_peak_rss(fed.procs[fed.node_name(i)].pid) for i in range(args.nodes))
        server_cpu = phases.cpu_seconds(fed.procs["server"].pid)
        node_cpu = [phases.cpu_seconds(fed.procs[fed.node_name(i)].pid) for i in range(args.nodes)]
    finally:
        fed.stop_all()
    names = [fed.node_name(i) for i in range(args.nodes)]
    breakdown = [phases.round_phases(workdir, names, info.round) for info in rounds]
    walls = []
    for info in rounds:
        applied = [
            json.loads(p.read_text())["applied_unix"]
            for p in records.glob(f"round-{info.round}-shard-*.json")
        ]
        walls.append(max(applied) - info.opened_unix)
    sums = workdir / "server-state" / "sums"
    download = max(p.stat().st_size for p in sums.iterdir()) / args.params
    upload = rounds[0].submissions[0].num_bytes / args.params
    mparams = args.params / 1e6
    return {
        "round_seconds": float(np.mean(walls)),
        "upload_bytes_per_param": upload,
        "download_bytes_per_param": download,
        "server_peak_rss_bytes": server_rss,
        "node_peak_rss_bytes": node_rss,
        # The whole run (start-up included), per round: what an operator sizes a server by.
        "server_cpu_seconds": server_cpu / len(rounds),
        "node_cpu_seconds": float(np.mean(node_cpu)) / len(rounds),
        "server_cpu_seconds_per_member_per_mparam": server_cpu / len(rounds) / args.nodes / mparams,
        "phases": {k: float(np.mean([b[k] for b in breakdown if b])) for k in (breakdown[0] or {})},
    }


def write_keys(keydir: Path) -> None:
    """The product's federation key and the tenseal-vector baseline's contexts: secrets at 0600."""
    keys.keygen(keydir, force=True)
    secret, public, fingerprint = baselines.tenseal_contexts()
    atomic_write(keydir / "tenseal-secret.ctx", secret, mode=0o600)
    atomic_write(keydir / "tenseal-public.ctx", public, mode=0o644)
    atomic_write(keydir / "tenseal-fingerprint", fingerprint.encode(), mode=0o644)


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown or args.nodes < 2:
        raise SystemExit(f"cipherhive bench: error: modes must be among {MODES} and --nodes at least 2")
    if args.workdir is not None:
        return measure(args, modes, args.workdir)
    # Without --workdir nothing outlives the run: the folder holds secret contexts and private
    # keys, so it goes when the run ends, on an error and on Ctrl-C too (every process it
    # started is stopped by then: end_to_end stops them in its own finally).
    with tempfile.TemporaryDirectory(prefix="cipherhive-bench-", ignore_cleanup_errors=True) as tmp:
        return measure(args, modes, Path(tmp))


def measure(args: argparse.Namespace, modes: list[str], workdir: Path) -> dict[str, Any]:
    """Every figure of ``modes``, with keys, state and logs in ``workdir``."""
    keydir = workdir / "keys"
    write_keys(keydir)
    sample = min(args.sample, args.params)
    results: dict[str, dict[str, float]] = {}
    for mode in modes:
        figures = in_process(mode, keydir, sample, args.nodes, args.workers)
        figures.update(end_to_end(mode, keydir, workdir / mode, args))
        results[mode] = figures
        if not args.json:
            print(f"  measured {mode}: round {figures['round_seconds']:.2f}s", file=sys.stderr)
    report: dict[str, Any] = {
        "machine": {"cores": default_workers(), "python": sys.version.split()[0]},
        "config": {
            "params": args.params,
            "nodes": args.nodes,
            "rounds": args.rounds,
            "workers": args.workers or default_workers(),
            "sample": sample,
        },
        "baseline_process_rss_bytes": baseline_rss(),
        "modes": results,
    }
    if "cipherhive" in results:
        secret_context = (keydir / keys.SECRET_FILE).read_bytes()
        report["masked"] = masked.measure(secret_context, sample)
    if "cipherhive" in results:
        ours = results["cipherhive"]
        report["ingest_goal"] = {
            "workers": args.ingest_workers or default_workers(),
            "speedup_all_vs_1": ours["server_ingest_speedup_all_vs_1"],
            "goal": 1.7,
        }
    if "cipherhive" in results and "plaintext" in results:
        ours, plain = results["cipherhive"], results["plaintext"]
        report["round_goal"] = {
            "round_seconds": ours["round_seconds"],
            "plaintext_round_seconds": plain["round_seconds"],
            "ratio": ours["round_seconds"] / plain["round_seconds"],
            "goal": 2.2,
        }
        update_bytes = 4 * args.params
        report["node_rss_over_update"] = (
            ours["node_peak_rss_bytes"] - report["baseline_process_rss_bytes"]
        ) / update_bytes
    return report


PHASES = [
    "enrol_roster",
    "train",
    "encrypt_upload",
    "commit_release",
    "unmask_publish",
    "download_decrypt_apply",
    "total",
]

FIGURES = [
    ("upload_bytes_per_param", "upload bytes / param", "{:.2f}"),
    ("download_bytes_per_param", "download bytes / param", "{:.2f}"),
    ("encrypt_params_per_s_1_worker", "encrypt params/s, 1 worker", "{:.3g}"),
    ("encrypt_params_per_s_all_workers", "encrypt params/s, all workers", "{:.3g}"),
    ("encrypt_speedup_all_vs_1", "encrypt speed-up, all vs 1", "{:.2f}x"),
    ("server_ingest_params_per_s", "server ingest params/s, 1 core", "{:.3g}"),
    ("server_ingest_params_per_s_all_cores", "server ingest params/s, all cores", "{:.3g}"),
    ("server_ingest_speedup_all_vs_1", "server ingest speed-up, all vs 1", "{:.2f}x"),
    ("decrypt_params_per_s_1_worker", "decrypt params/s, 1 worker", "{:.3g}"),
    ("round_seconds", "round wall time (s)", "{:.2f}"),
    ("server_cpu_seconds", "server CPU s per round", "{:.2f}"),
    ("node_cpu_seconds", "node CPU s per round (mean)", "{:.2f}"),
    ("server_cpu_seconds_per_member_per_mparam", "server CPU s / member / M params", "{:.3f}"),
    ("server_peak_rss_bytes", "server peak RSS (MB)", "{:.0f}"),
    ("node_peak_rss_bytes", "node peak RSS (MB)", "{:.0f}"),
    ("max_abs_error", "max abs error of the average", "{:.2e}"),
]


def render(report: dict[str, Any]) -> str:
    modes = report["modes"]
    names = list(modes)
    header = f"{'figure':<34}" + "".join(f"{n:>16}" for n in names)
    ratios = [n for n in ("unmasked", "plaintext", "tenseal-vector") if n in modes and "cipherhive" in modes]
    header += "".join(f"{'vs ' + r:>18}" for r in ratios)
    lines = [header, "-" * len(header)]
    for key, label, fmt in FIGURES:
        cells = []
        for n in names:
            value = modes[n][key]
            if key.endswith("rss_bytes"):
                value /= 1e6
            cells.append(f"{fmt.format(value):>16}")
        line = f"{label:<34}" + "".join(cells)
        for r in ratios:
            base = modes[r][key]
            line += f"{(modes['cipherhive'][key] / base if base else float('nan')):>17.2f}x"
        lines.append(line)
    cfg = report["config"]
    lines.append("")
    lines.append(
        f"{cfg['params']:,} params, {cfg['nodes']} nodes, {cfg['rounds']} round(s), "
        f"{cfg['workers']} workers, {report['machine']['cores']} cores; "
        f"in-process figures on {cfg['sample']:,} values"
    )
    if "masked" in report:
        lines += ["", "double masks (SecAgg), 1 core:", masked.render(report["masked"])]
    phase_names = sorted({k for n in names for k in modes[n].get("phases", {})}, key=PHASES.index)
    if phase_names:
        lines += ["", f"{'phase (s, from the daemons JSON logs)':<34}" + "".join(f"{n:>16}" for n in names)]
        for phase in phase_names:
            row = "".join(f"{modes[n].get('phases', {}).get(phase, float('nan')):>16.2f}" for n in names)
            lines.append(f"{phase:<34}" + row)
    ingest = report.get("ingest_goal")
    if ingest:
        lines.append(
            f"server ingest on {ingest['workers']} workers vs 1: {ingest['speedup_all_vs_1']:.2f}x "
            f"(goal >= {ingest['goal']})"
        )
    goal = report.get("round_goal")
    if goal:
        lines.append(
            f"encrypted (masked) round vs plaintext round: {goal['round_seconds']:.2f}s / "
            f"{goal['plaintext_round_seconds']:.2f}s = {goal['ratio']:.2f}x (goal <= {goal['goal']})"
        )
        lines.append(
            f"node peak RSS above a bare node process ({report['baseline_process_rss_bytes'] / 1e6:.0f} MB): "
            f"{report['node_rss_over_update']:.2f}x the float32 update"
        )
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="cipherhive bench", description=__doc__)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
