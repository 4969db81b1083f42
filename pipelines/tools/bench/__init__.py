"""``python -m pipelines.bench``: which format should a deployer ship?

    python -m pipelines.bench [<models-dir>/<name>/<N>] [--quick] [--out DIR] [--no-tracking]

Measures, in one run, for PyTorch eager, ONNX Runtime, the SavedModel signature and each
TFLite variant: batch-1 latency (p50/p90/p99) and throughput, batch-128 throughput (requests
and examples reported apart), cold start in a fresh process (and for the serverless
package), artifact and package sizes, peak RSS, this machine's matrix-multiply ceiling at
the model's shapes with each format's share of it, the web service under a bounded
loopback load per backend, and the pipeline's per-stage wall time. Writes ``bench.json``,
``bench.md`` and ``bench.png`` (default: the version's run directory) and logs them to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from crossport.cli import integer, summary_line
from crossport.errors import ConfigError, CrossportError, report
from crossport.files import foreign_entries, model_repository_around, write_bytes_atomic
from crossport.formats import BY_NAME, SERVED
from crossport.interface import ASSETS_EXTRA
from export.verify import read_manifest
from pipelines.tools.bench.ceiling import matmul_ceiling
from pipelines.tools.bench.harness import (
    COLD_CHILD,
    ROOT,
    RUNTIMES,
    SERVERLESS_CHILD,
    THREADED,
    bench_format,
    cold_start,
    load_runtime,
    log,
    summarize,
    timed,
)
from pipelines.tools.bench.load import model_cpu_ms, serve_load, serving
from pipelines.tools.bench.render import render_chart, render_comparison, render_markdown

# what --out may hold
BENCH_FILES = frozenset({"bench.json", "bench.md", "bench.png", "compare.md", "bench.log", "peers.json", "peers.md",
                         "peers.png", "rollout.json", "rollout.md", "rollout-serve.log"})

# --- the whole benchmark -------------------------------------------------------------------

def benchmark(version_dir: Path, quick: bool) -> dict:
    """Every measurement of one published version (bench.json's content)."""
    from serving.serve import available_cores
    from training.model import gemm_shapes, macs_per_example

    manifest = read_manifest(version_dir)
    run_dir = Path(manifest.get("run_dir") or "")
    checkpoint = run_dir / "model.pt"
    # A model brought as an ONNX file has no PyTorch original: its network is read from the published graph.
    imported = bool(manifest.get("source"))
    if not imported and not checkpoint.is_file():
        raise ConfigError(f"the version's run directory {run_dir} has no model.pt (PyTorch is benchmarked from it).",
                          hint="Benchmark a version published on this machine.")
    timing = QUICK if quick else FULL
    network = _network(version_dir, checkpoint, imported)
    macs = macs_per_example(network)
    results: dict = {"version_dir": str(version_dir), "quick": quick, "model": network.config.arch,
                     "macs_per_example": macs, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                     "machine": _machine()}
    log.info("matrix-multiply ceiling ...")
    cores = available_cores()
    results["ceiling"] = matmul_ceiling(timing.seconds, gemm_shapes(network, 128), macs, timing.rounds, cores)
    sizes = {f["name"]: (version_dir / f["path"]) for f in manifest["artifacts"]}
    # a version published with --undecided omit lacks the lossy variants its test split could not judge
    present = [name for name in RUNTIMES if (not name.startswith("tflite_") or name in sizes)
               and not (imported and name == "pytorch")]
    runtimes = {name: measure_runtime(name, version_dir, checkpoint, sizes, timing, quick, cores,
                                      results["ceiling"]["examples_per_s"]) for name in present}
    for name, accuracy in _accuracies(version_dir).items():
        if name in runtimes:
            runtimes[name]["test_accuracy"] = accuracy
    results["runtimes"] = runtimes
    results["serverless"] = serverless_packages(version_dir, sizes, timing.repeats)
    results["http"] = http_load(version_dir, run_dir, runtimes, sizes, timing, quick, cores)
    stages = json.loads((run_dir / "manifest.json").read_text()).get("stages", {})
    results["pipeline_stage_wall_s"] = {name: info.get("wall_s") for name, info in stages.items()}
    results["pipeline_stage_peak_rss_gib"] = {name: info.get("peak_rss_gib") for name, info in stages.items()}
    return results


@dataclass(frozen=True)
class Timing:
    seconds: float  # per timed round
    repeats: int  # cold starts per runtime
    rounds: int  # timed rounds per measurement, after a warm-up round
    load_seconds: float  # per web-service load


# --quick is a check that every measurement runs (about half a minute for the MLP): its rounds are short, so its
# figures are noisier than a full run's, which times each round for 3 s and each load for 5 s.
QUICK = Timing(seconds=0.2, repeats=1, rounds=3, load_seconds=0.5)
FULL = Timing(seconds=3.0, repeats=5, rounds=5, load_seconds=5.0)


def _network(version_dir: Path, checkpoint: Path, imported: bool):
    """The model as a torch network, for its shapes and MACs: the checkpoint, or the published ONNX graph."""
    if imported:
        import onnx

        from crossport.exact.graph import network_from_onnx

        return network_from_onnx(onnx.load(str(version_dir / BY_NAME["onnx"].path), load_external_data=False))
    from training.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint).model


def measure_runtime(name: str, version_dir: Path, checkpoint: Path, sizes: dict, timing: Timing, quick: bool,
                    cores: int, ceiling: float) -> dict:
    """One runtime: batch-1 and batch-128 throughput, one thread and every core, cold start, size, layout."""
    from export.layout import placement, saved_model_ops, tflite_ops
    from export.servable import image_contract

    log.info("runtime %s ...", name)
    rng = np.random.default_rng(0)
    shape = image_contract(version_dir).shape  # one example, as the version declares it
    batch1, batch128 = (rng.random((1, *shape), dtype=np.float32), rng.random((128, *shape), dtype=np.float32))
    seconds, rounds = timing.seconds, timing.rounds
    run = load_runtime(name, version_dir, checkpoint)
    one = summarize(timed(run, batch1, seconds, rounds), 1)
    many = summarize(timed(run, batch128, seconds, rounds), 128)
    cold_runtime = name in ("onnxruntime", "tflite_fp32", "tflite_int8_full") or not quick
    cold = (cold_start(COLD_CHILD.format(root=str(ROOT), name=name, version=str(version_dir),
                                         checkpoint=str(checkpoint), shape=shape), ROOT, timing.repeats)
            if cold_runtime else None)
    artifact = {"pytorch": checkpoint, "onnxruntime": sizes["onnx"].resolve(),
                "saved_model": version_dir}.get(name, sizes.get(name))
    single = parallel = None
    if name in THREADED:
        single = summarize(timed(load_runtime(name, version_dir, checkpoint, threads=1), batch128, seconds, rounds),
                           128)
        if cores > 1:  # every core as concurrent one-thread callers: what pipelines.serve --workers N runs
            shared = load_runtime(name, version_dir, checkpoint, threads=1, instances=cores)
            parallel = summarize(timed(shared, batch128, seconds, rounds, callers=cores), 128)
    best = max((many, parallel), key=lambda row: row["examples_per_s"] if row else 0)
    fmt = bench_format(name)
    arithmetic = fmt.arithmetic if fmt else "float32"  # PyTorch eager runs the float32 model
    info = {
        "batch1": one, "batch128": many, "batch128_one_thread": single, "batch128_callers": parallel,
        "threads": cores, "batch128_all_cores": best["examples_per_s"],
        "all_cores_layout": (f"{cores} callers x 1 thread" if best is parallel else f"1 caller x {cores} threads"),
        "cold_start": cold,
        "artifact_bytes": _size(artifact, exclude_extra=name == "saved_model"),
        "arithmetic": arithmetic,
        "ceiling_share": best["examples_per_s"] / ceiling if arithmetic == "float32" else None,
    }
    if name == "saved_model":
        info["layout"] = placement(saved_model_ops(version_dir))
    elif name.startswith("tflite_"):
        info["layout"] = placement(tflite_ops(sizes[name]))
    return info


def serverless_packages(version_dir: Path, sizes: dict, repeats: int) -> dict:
    """The Lambda package of each headline variant: sizes and cold start in an isolated interpreter."""
    from serving.serverless import build_package

    packages = {}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in (v for v in ("fp32", "int8_full") if f"tflite_{v}" in sizes):
            directory, archive = build_package(version_dir, Path(scratch) / f"lambda_{variant}", variant)
            packages[variant] = {
                "unzipped_bytes": sum(p.stat().st_size for p in directory.iterdir()),
                "zipped_bytes": archive.stat().st_size,
                "runtime_bytes": _installed_bytes(("ai_edge_litert", "numpy", "PIL", "numpy.libs", "pillow.libs")),
                "cold_start": cold_start(SERVERLESS_CHILD, directory, repeats, isolated=True),
            }
    return packages


def http_load(version_dir: Path, run_dir: Path, runtimes: dict, sizes: dict, timing: Timing, quick: bool,
              cores: int) -> list[dict]:
    """The web service per backend under the bounded loopback load, REST and gRPC, against the same backend
    called in this process."""
    with np.load(run_dir / "data.npz") as data:
        images = data["x_test"][:128].astype(np.float32) / 255.0
    backends = [b for b in (("onnx", "tflite_fp32") if quick else SERVED)
                if not b.startswith("tflite_") or b in sizes]
    workers = cores  # one server process per core: the GIL limits each to about one
    rows = []
    for backend in backends:
        with serving(version_dir.parent, backend, workers) as served:
            rows += [serve_load(served, version_dir.parent, timing.load_seconds, 4, batch, images, protocol)
                     for protocol, batches in (("rest", (1, 32)), ("grpc", (1, 128)))
                     for batch in (batches[:1] if quick else batches)]
            if quick and backend == "tflite_fp32":  # --quick: on this server, for the fp32 TFLite file alone
                rows += request_cost(served, version_dir, backend, images, workers, timing)
        if not quick:  # what a request costs beyond the model, on one server process of its own
            with serving(version_dir.parent, backend, 1) as served:
                rows += request_cost(served, version_dir, backend, images, 1, timing)
    in_process = {"onnx": "onnxruntime"}
    for row in rows:  # the service against the same backend called in this process, same batch
        runtime = runtimes.get(in_process.get(row["backend"], row["backend"]))
        if runtime and row["batch"] in (1, 128):  # batch 128: the backend's best way to use every core
            reference = runtime["batch1"]["examples_per_s"] if row["batch"] == 1 else runtime["batch128_all_cores"]
            row["in_process_share"] = row["examples_per_s"] / reference
    return rows


def request_cost(served, version_dir: Path, backend: str, images: np.ndarray, workers: int,
                 timing: Timing) -> list[dict]:
    """What a request costs the server beyond the model: gRPC at batch 128, float32 to serving_default against the
    same pixels as uint8 to predict_uint8, with the backend's own call timed in this process (the threads each of
    the server's ``workers`` runs it with) just before the loads and just after, and the mean of the two taken: on
    a shared machine one timing was up to 50 % off the loads' (the CNN's ONNX Runtime call measured 10.3 and 15.9 ms
    within minutes)."""
    from serving.serve import available_cores

    def model_call() -> float:
        return model_cpu_ms(version_dir, backend, images[:128], max(1, available_cores() // workers), timing.seconds)

    before = model_call()
    cost = [serve_load(served, version_dir.parent, timing.load_seconds, 2, 128, images, protocol)
            for protocol in ("grpc", "grpc_uint8")]
    bracket = (before, model_call())
    model_ms = sum(bracket) / 2
    for row in cost:
        row["model_cpu_ms_per_call"] = model_ms
        row["model_cpu_ms_before_after"] = list(bracket)
        row["server_cpu_over_model"] = (row["server_cpu_ms_per_request"] / model_ms
                                        if row["server_cpu_ms_per_request"] else None)
        row["cost"] = True  # the request-cost rows; the others are the throughput rows
    return cost


def _accuracies(version_dir: Path) -> dict[str, float]:
    """Test accuracy per benchmarked runtime, from the parity report the version was published with."""
    try:
        report = json.loads((version_dir / ASSETS_EXTRA / "parity.json").read_text())
    except (OSError, ValueError):
        return {}
    found = {}
    reference = report.get("reference", "pytorch")
    for hop in report.get("hops", []):
        if hop.get("reference") == reference:
            found[reference] = hop.get("reference_accuracy")
            found[hop["candidate"].removesuffix(":serving_default")] = hop.get("candidate_accuracy")
    return {name: value for name, value in found.items() if value is not None}


def _machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def _size(path: Path | None, exclude_extra: bool = False) -> int | None:
    from crossport.files import size_path

    if path is None or not Path(path).exists():
        return None
    return size_path(Path(path), exclude=(ASSETS_EXTRA,) if exclude_extra else ())


def _installed_bytes(packages: tuple[str, ...]) -> int:
    """What ``pip install -r requirements.txt`` puts beside a serverless handler (site-packages)."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    return sum(_size(site / name) or 0 for name in packages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("version_dir", nargs="?", type=Path,
                        help="a published version (default: the newest under models/emnist_mlp)")
    parser.add_argument("--quick", action="store_true",
                        help="a check that every measurement runs, in about half a minute (short rounds, few backends)")
    parser.add_argument("--out", type=Path, help="where to write bench.json/.md/.png (default: the run directory)")
    parser.add_argument("--compare", type=Path, nargs="+", default=[], metavar="VERSION_DIR",
                        help="also benchmark these versions (e.g. another architecture) and write compare.md: "
                             "the models side by side per format")
    parser.add_argument("--peers", action="store_true",
                        help="instead: crossport side by side with litert-torch and onnx2tf on this version's model, "
                             "each installed in an environment of its own (peers/*.txt); writes peers.json/.md")
    parser.add_argument("--rollout", action="store_true",
                        help="instead: a rollout under load in a scratch folder (--out): clients call pipelines.serve "
                             "while this version's run is published three more times and a tampered version "
                             "appears; failed requests, each version's pick-up time, memory; writes rollout.json/.md")
    parser.add_argument("--seconds", type=integer(1), default=60, help="with --rollout: how long the clients call "
                                                                       "(default: 60)")
    parser.add_argument("--no-install", action="store_true",
                        help="with --peers: use the peers' environments as they are; a missing one is a row saying so")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--force", action="store_true",
                        help="write bench.json/.md/.png into an --out holding other files (never a model repository)")
    parser.add_argument("--debug", action="store_true",
                        help="leave the libraries' output on the console (default: in bench.log beside bench.json)")
    args = parser.parse_args(argv)
    from crossport.console import quiet_console, run_command

    def body() -> int:
        version_dir = args.version_dir or _newest(Path("models") / "emnist_mlp")
        read_manifest(version_dir)  # a published version, before anything is written
        out = args.out or Path(results_run_dir(version_dir))
        check_out(out, force=args.force)  # before minutes of measuring
        out.mkdir(parents=True, exist_ok=True)
        with quiet_console(out / "bench.log", args.debug):  # in its output folder, known only now
            if args.rollout:
                return _rollout(args, version_dir, out)
            return _peers(args, version_dir, out) if args.peers else _bench(args, version_dir, out)

    return run_command(body, debug=args.debug)


def _bench(args: argparse.Namespace, version_dir: Path, out: Path) -> int:
    try:
        results = benchmark(version_dir, args.quick)
        write_bytes_atomic(out / "bench.json", (json.dumps(results, indent=2) + "\n").encode())
        write_bytes_atomic(out / "bench.md", render_markdown(results).encode())
        render_chart(results, out / "bench.png")
        tracked = None if args.no_tracking else _log_to_mlflow(version_dir, out)
        if args.compare:
            compared = [results] + [benchmark(other, args.quick) for other in args.compare]
            comparison = render_comparison(compared)
            write_bytes_atomic(out / "compare.md", comparison.encode())
    except CrossportError as error:
        return report(error)
    sys.stdout.write(render_markdown(results))
    if args.compare:
        sys.stdout.write("\n" + comparison)
    names = ("bench.json", "bench.md", "bench.png", *(("compare.md",) if args.compare else ()),
             *(() if args.debug else ("bench.log",)))
    written = ", ".join(names)
    sys.stdout.write(f"\nwrote {written} to {out}" + (f"; {tracked}" if tracked else "; not tracked") + "\n")
    return 0


def _rollout(args: argparse.Namespace, version_dir: Path, out: Path) -> int:
    from pipelines.tools.bench.rollout import render_rollout, rollout

    with tempfile.TemporaryDirectory(prefix="crossport-rollout-") as scratch:  # a copy of the run, a repository
        try:
            result = rollout(version_dir, Path(scratch), seconds=args.seconds)
        except CrossportError as error:
            return report(error)
        finally:
            if (Path(scratch) / "serve.out").is_file():  # the server's own lines: what it loaded, refused, unloaded
                write_bytes_atomic(out / "rollout-serve.log", (Path(scratch) / "serve.out").read_bytes())
    write_bytes_atomic(out / "rollout.json", (json.dumps(result, indent=2) + "\n").encode())
    write_bytes_atomic(out / "rollout.md", render_rollout(result).encode())
    sys.stdout.write(render_rollout(result) + f"\nwrote rollout.json, rollout.md and rollout-serve.log to {out}\n")
    return 0 if result["failed"] == 0 and not result["tampered"]["answered"] else 3


def _peers(args: argparse.Namespace, version_dir: Path, out: Path) -> int:
    from pipelines.tools.bench.peers import compare_peers, render_peers, render_peers_chart

    run_dir = Path(read_manifest(version_dir).get("run_dir") or "")
    if not (run_dir / "manifest.json").is_file():
        raise ConfigError(f"the version's run directory {run_dir} is not here (the peers convert its model).",
                          hint="Compare a version published on this machine.")
    results = compare_peers(version_dir, run_dir, install=not args.no_install, quick=args.quick)
    write_bytes_atomic(out / "peers.json", (json.dumps(results, indent=2) + "\n").encode())
    table = render_peers(results)
    write_bytes_atomic(out / "peers.md", table.encode())
    render_peers_chart(results, out / "peers.png")
    tracked = None if args.no_tracking else _log_to_mlflow(version_dir, out, "peers", results)
    sys.stdout.write(table + f"\nwrote peers.json, peers.md, peers.png to {out}; {tracked or 'not tracked'}\n")
    return 0


def check_out(out: Path, *, force: bool = False) -> None:
    """Write only into a new or empty folder, a crossport run directory, or an earlier benchmark's folder.

    ``--force`` allows a folder holding other files (only the three bench files are written,
    nothing else is touched); a model repository is never written into.
    """
    place = model_repository_around(out)
    if place is not None:
        raise ConfigError(f"--out {out} is inside the model repository {place}; benchmark files are never written "
                          "there.", hint="Pass an --out outside the models directory, e.g. runs/bench.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, expected a directory.", hint="Pass a new directory.")
    foreign = foreign_entries(out, BENCH_FILES)
    if foreign and not force and not (out / "manifest.json").is_file():
        raise ConfigError(f"--out {out} holds files the benchmark did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}).",
                          hint="Pass a new or empty --out, or add --force to add the bench files beside them.")


def _newest(model_dir: Path) -> Path:
    from serving.serve import pick_version

    return pick_version(model_dir, None)[1]


def results_run_dir(version_dir: Path) -> str:
    return read_manifest(version_dir)["run_dir"]


def _log_to_mlflow(version_dir: Path, out: Path, kind: str = "bench", results: dict | None = None) -> str | None:
    """A ``kind`` run (bench, or peers with its ``results``) in the version's experiment, with the numbers and the
    three files: where it went (None when the version was published untracked)."""
    from pipelines.tracking import log_benchmark, log_peers

    manifest = read_manifest(version_dir)
    uri = (manifest.get("mlflow") or {}).get("tracking_uri")
    if uri:
        log = {"bench": log_benchmark, "peers": log_peers}[kind]
        run_id = log(uri, manifest["name"], results or json.loads((out / f"{kind}.json").read_text()), out)
        return f"MLflow run {run_id} in {uri}, experiment {manifest['name']!r}"
    return None


