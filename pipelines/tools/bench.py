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
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from crossport.cli import summary_line
from crossport.errors import ConfigError, CrossportError, report
from crossport.files import foreign_entries, model_repository_around, write_bytes_atomic
from crossport.formats import BY_NAME, FORMATS, SERVED, TFLITE_FORMATS
from crossport.interface import ASSETS_EXTRA, INPUT, INPUT_SIZE, SCORES
from export.verify import read_manifest

BENCH_FILES = frozenset({"bench.json", "bench.md", "bench.png", "compare.md", "bench.log"})

log = logging.getLogger("crossport.bench")

# PyTorch, then every published format; bench.json keeps its historical name for the ONNX one
BENCH_NAME = {"onnx": "onnxruntime"}
RUNTIMES = ("pytorch", *(BENCH_NAME.get(fmt.name, fmt.name) for fmt in FORMATS))
SERVE_BACKENDS = SERVED
ROOT = Path(__file__).resolve().parents[2]  # the repository


# --- loading a runtime (also run inside the cold-start child process) -----------------------

def load_runtime(name: str, version_dir: Path, checkpoint: Path | None, threads: int | None = None,
                 instances: int = 1):
    """``threads``: the runtime's intra-op threads (None: the cores available, as pipelines.serve runs it);
    ``instances``: TFLite interpreters that concurrent callers share (the other runtimes run concurrent calls)."""
    from crossport.runtimes import load_format
    from serving.serve import available_cores

    threads = threads or available_cores()
    if name == "pytorch":
        from training.checkpoint import load_torch  # only here: a cold start measures its own runtime's imports

        return load_torch(checkpoint, threads)
    fmt = bench_format(name)
    return load_format(fmt, version_dir / fmt.path, threads, instances)


def bench_format(name: str):
    """The published format a benchmark runtime name stands for (None for PyTorch eager)."""
    return BY_NAME.get(next((key for key, value in BENCH_NAME.items() if value == name), name))


# the runtimes whose thread count the benchmark varies: one thread, every core as one caller's threads, and every
# core as that many concurrent callers of one thread each (pipelines.serve --workers N, or --instances N --threads 1)
THREADED = ("onnxruntime", *(fmt.name for fmt in TFLITE_FORMATS))


# Peak RSS is read from /proc/self/status (VmHWM): it belongs to the process image and
# restarts at exec, unlike getrusage's ru_maxrss, which keeps the forking parent's peak.
PEAK_RSS = r"""
def peak_rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
"""

COLD_CHILD = PEAK_RSS + r"""
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
from pipelines.tools.bench import load_runtime
run = load_runtime({name!r}, Path({version!r}), {checkpoint!r} and Path({checkpoint!r}))
run(np.zeros((1, 784), np.float32))
first = time.time()
for _ in range(200):
    run(np.zeros((128, 784), np.float32))
print(first, peak_rss_bytes())
"""

SERVERLESS_CHILD = PEAK_RSS + r"""
import json, sys, time
sys.path.insert(0, ".")
import handler
reply = handler.lambda_handler({"body": json.dumps({"pixels": [0.0] * 784})}, None)
assert reply["statusCode"] == 200, reply
print(time.time(), peak_rss_bytes())
"""


def cold_start(code: str, cwd: Path, repeats: int, isolated: bool = False) -> dict:
    """Median seconds from process start to first prediction, and the child's peak RSS."""
    times, rss = [], []
    for _ in range(repeats):
        started = time.time()
        done = subprocess.run([sys.executable, *(["-I"] if isolated else []), "-c", code], cwd=cwd,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if done.returncode != 0:
            raise CrossportError(f"cold-start child failed: {done.stderr.strip().splitlines()[-1:]}")
        first, peak = done.stdout.strip().splitlines()[-1].split()
        times.append(float(first) - started)
        rss.append(int(peak))
    return {"median_s": statistics.median(times), "runs": len(times), "all_s": times, "peak_rss_mb": max(rss) / 1e6}


# --- warm latency and throughput -----------------------------------------------------------

Round = tuple[list[float], float]  # per-call seconds, and the round's wall seconds


def timed(run, batch: np.ndarray, seconds: float, rounds: int = 5, min_calls: int = 10,
          callers: int = 1) -> list[Round]:
    """``rounds`` rounds of ``seconds / rounds`` each, after a warm-up round of the same length (first-call
    allocations, thread pools spinning up and caches are the warm-up's, not the first round's); ``callers`` threads
    call ``run`` at once in each round (a round's rate is all their calls over its wall time)."""
    per_round = seconds / rounds
    _round(run, batch, per_round, min_calls, callers)  # warm-up, discarded
    return [_round(run, batch, per_round, min_calls, callers) for _ in range(rounds)]


def _round(run, batch, seconds: float, min_calls: int, callers: int) -> Round:
    results: list[list[float]] = [[] for _ in range(callers)]
    started = time.perf_counter()
    deadline = started + seconds
    threads = [threading.Thread(target=_calls, args=(run, batch, deadline, min_calls, out)) for out in results[1:]]
    for thread in threads:
        thread.start()
    _calls(run, batch, deadline, min_calls, results[0])
    for thread in threads:
        thread.join()
    return [value for out in results for value in out], time.perf_counter() - started


def _calls(run, batch, deadline: float, min_calls: int, latencies: list[float]) -> None:
    while time.perf_counter() < deadline or len(latencies) < min_calls:
        started = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - started)


def summarize(rounds: list[Round], batch: int) -> dict:
    """Latency percentiles over every call; throughput as the median round's, with the rounds' spread
    ((max - min) / median of the round rates): repeated benchmarks are compared by the median, not by luck."""
    values = np.concatenate([np.asarray(calls) for calls, _ in rounds])
    rates = np.asarray([len(calls) / wall for calls, wall in rounds])
    median = float(np.median(rates))
    return {"batch": batch, "calls": len(values), "rounds": len(rounds),
            "p50_ms": float(np.percentile(values, 50) * 1e3), "p90_ms": float(np.percentile(values, 90) * 1e3),
            "p99_ms": float(np.percentile(values, 99) * 1e3),
            "requests_per_s": median, "examples_per_s": median * batch,
            "spread": float((rates.max() - rates.min()) / median)}


def matmul_ceiling(seconds: float, shapes: list[tuple[int, int, int]], macs_per_example: int,
                   rounds: int = 5, cores: int = 1) -> dict:
    """This machine's float32 matmul rate at the model's own products (``shapes`` at batch 128, convolutions as
    their im2col products), in examples/s for a model of ``macs_per_example``: the best of numpy, and of torch and
    ONNX Runtime each on every core as one caller and as ``cores`` concurrent callers of one thread (the two ways a
    runtime can use every core).

    Measured exactly as the runtimes are (:func:`timed`, median round), so a runtime's share of it compares like
    with like. It is the float32 ceiling only: int8 kernels do four times the multiply-adds per instruction (VNNI), so
    formats whose arithmetic is int8 get no share of it."""
    import torch

    rng = np.random.default_rng(0)
    mats = [(rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)) for m, k, n in shapes]
    macs = sum(m * k * n for m, k, n in shapes)
    results, spreads = {}, {}
    layouts = [("numpy", np.matmul, lambda a: a, 1), ("torch", torch.matmul, torch.from_numpy, 1)]
    if cores > 1:
        layouts.append((f"torch, {cores} callers x 1 thread", torch.matmul, torch.from_numpy, cores))
    threads = torch.get_num_threads()
    try:
        for name, matmul, wrap, callers in layouts:
            pairs = [(wrap(a), wrap(b)) for a, b in mats]
            torch.set_num_threads(1 if callers > 1 else threads)
            with torch.no_grad():
                summary = summarize(timed(lambda _, matmul=matmul, pairs=pairs: [matmul(a, b) for a, b in pairs],
                                          None, seconds, rounds, callers=callers), 1)
            results[name], spreads[name] = macs * summary["requests_per_s"], summary["spread"]
    finally:
        torch.set_num_threads(threads)
    # ONNX Runtime's own GEMM (MLAS) is faster than torch's at some shapes: a ceiling a runtime exceeds is none
    for callers in sorted({1, cores}):
        name = "onnxruntime" if callers == 1 else f"onnxruntime, {cores} callers x 1 thread"
        summary = summarize(timed(_onnx_matmuls(mats, threads=1 if callers > 1 else cores), None, seconds, rounds,
                                  callers=callers), 1)
        results[name], spreads[name] = macs * summary["requests_per_s"], summary["spread"]
    best_name = max(results, key=results.get)
    return {"macs_per_s": results[best_name], "gflops": 2 * results[best_name] / 1e9, "library": best_name,
            "by_library_gflops": {k: 2 * v / 1e9 for k, v in results.items()}, "spread": spreads[best_name],
            "examples_per_s": results[best_name] / macs_per_example, "shapes": shapes}


def _onnx_matmuls(mats, threads: int):
    """The products alone as one ONNX graph (weights as initializers), run by ONNX Runtime with ``threads``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inputs, outputs, weights = [], [], [], []
    for index, (left, right) in enumerate(mats):
        inputs.append(helper.make_tensor_value_info(f"a{index}", TensorProto.FLOAT, list(left.shape)))
        outputs.append(helper.make_tensor_value_info(f"c{index}", TensorProto.FLOAT, None))
        weights.append(numpy_helper.from_array(right, f"b{index}"))
        nodes.append(helper.make_node("MatMul", [f"a{index}", f"b{index}"], [f"c{index}"]))
    model = helper.make_model(helper.make_graph(nodes, "products", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {f"a{index}": left for index, (left, _) in enumerate(mats)}
    return lambda _: session.run(None, feeds)


# --- HTTP under load -----------------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open while choosing, so the kernel cannot hand one out twice)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass(frozen=True)
class Served:
    process: subprocess.Popen
    port: int
    grpc_port: int
    backend: str
    workers: int


@contextlib.contextmanager
def serving(model_dir: Path, backend: str, workers: int = 1):
    """``pipelines.serve --workers workers`` on 127.0.0.1 with REST and gRPC, answering once both listeners are up
    (:class:`Served`); stopped after. Every load of one backend goes to one server, as to a deployed one."""
    import http.client

    port, grpc_port = _free_ports(2)
    server = subprocess.Popen([sys.executable, "-m", "pipelines.serve", str(model_dir), "--backend", backend,
                               "--port", str(port), "--grpc-port", str(grpc_port), "--workers", str(workers)],
                              cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", f"/v1/models/{model_dir.name}")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise CrossportError(f"pipelines.serve --backend {backend} did not start") from None
                time.sleep(0.3)
        yield Served(server, port, grpc_port, backend, workers)
    finally:
        server.terminate()
        server.wait(timeout=30)


def serve_load(served: Served, model_dir: Path, seconds: float, clients: int, batch: int, images: np.ndarray,
               protocol: str = "rest") -> dict:
    """Several concurrent clients for a fixed time against a server :func:`serving` started, over REST (JSON,
    one kept-alive connection per client) or gRPC (TF Serving's PredictionService, tensor_content, one channel per
    client); the clients in this process."""
    import http.client

    server, port, grpc_port = served.process, served.port, served.grpc_port
    body = json.dumps({"instances": images[:batch].tolist()}).encode()
    path = f"/v1/models/{model_dir.name}:predict"
    callers: list = [None] * clients
    if protocol == "grpc":
        callers = [_grpc_caller(grpc_port, model_dir.name, images[:batch]) for _ in range(clients)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(call) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # kept alive, as clients do
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                if call is not None:
                    ok = call()
                else:
                    connection.request("POST", path, body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    response.read()
                    ok = response.status == 200
            except (OSError, http.client.HTTPException):
                connection.close()  # the next request opens a new connection
                ok = False
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(call,)) for call in callers]
    server_cpu, client_cpu, wall = _tree_cpu_s(server.pid), time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    client_cpu = time.process_time() - client_cpu  # this process runs nothing but the clients meanwhile
    after = _tree_cpu_s(server.pid)
    server_cpu = after - server_cpu if after is not None and server_cpu is not None else None
    values = np.asarray(latencies or [float("nan")])

    def per_request(cpu_s: float | None) -> float | None:
        return cpu_s / len(latencies) * 1e3 if cpu_s is not None and latencies else None

    return {"backend": served.backend, "protocol": protocol, "clients": clients, "workers": served.workers,
            "batch": batch,
            "seconds": wall,
            "requests": len(latencies),
            "errors": errors[0], "requests_per_s": len(latencies) / wall,
            "examples_per_s": len(latencies) * batch / wall,
            "p50_ms": float(np.percentile(values, 50) * 1e3), "p99_ms": float(np.percentile(values, 99) * 1e3),
            # what a deployer sizes machines by: one core serves 1000 / server_cpu_ms_per_request requests/s
            "server_cpu_ms_per_request": per_request(server_cpu), "client_cpu_ms_per_request": per_request(client_cpu)}


def _tree_cpu_s(root: int) -> float | None:
    """CPU seconds (user + system) used so far by process ``root`` and every process below it (a --workers
    supervisor and its workers), from /proc; None where there is no /proc."""
    proc = Path("/proc")
    ticks, parents = {}, {}
    try:
        entries = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:  # after the command's closing parenthesis: state, ppid, ..., utime (12th), stime (13th)
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
        parents[int(entry.name)] = int(fields[1])
    if root not in ticks:
        return None
    tree, grown = {root}, True
    while grown:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= below
        grown = bool(below)
    return sum(ticks[pid] for pid in tree) / os.sysconf("SC_CLK_TCK")


def _grpc_caller(port: int, name: str, batch: np.ndarray):
    """``Predict`` with one PredictRequest (tensor_content) serialized once, sent as bytes over a channel of its own
    (its own connection, as a separate client's: under --workers each connection stays on one worker), its answers
    left undecoded: a load generator costs the two cores little, as a C one would (the first answer is decoded and
    checked). True when answered."""
    import grpc
    from tensorflow_serving.apis import predict_pb2

    from serving.grpc_service import array_to_tensor

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
    grpc.channel_ready_future(channel).result(timeout=120)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs[INPUT].CopyFrom(array_to_tensor(batch))
    payload = request.SerializeToString()
    predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")  # bytes in, bytes out
    answer = predict_pb2.PredictResponse.FromString(predict(payload, timeout=60))
    shape = [dim.size for dim in answer.outputs[SCORES].tensor_shape.dim]
    if shape[:1] != [len(batch)]:
        raise CrossportError(f"gRPC Predict answered scores of shape {shape} for a batch of {len(batch)}")

    def call() -> bool:
        try:
            predict(payload, timeout=30)
            return True
        except grpc.RpcError:
            return False

    return call


# --- the whole benchmark -------------------------------------------------------------------

def benchmark(version_dir: Path, quick: bool) -> dict:
    from serving.serve import available_cores
    from serving.serverless import build_package

    manifest = read_manifest(version_dir)
    run_dir = Path(manifest.get("run_dir") or "")
    checkpoint = run_dir / "model.pt"
    # A model brought as an ONNX file has no PyTorch original: its network is read from the published graph.
    imported = bool(manifest.get("source"))
    if not imported and not checkpoint.is_file():
        raise ConfigError(f"the version's run directory {run_dir} has no model.pt (PyTorch is benchmarked from it).",
                          hint="Benchmark a version published on this machine.")
    seconds = 0.5 if quick else 3.0
    repeats = 1 if quick else 5
    rounds = 3 if quick else 5  # timed rounds per measurement, after a warm-up round
    rng = np.random.default_rng(0)
    batch1, batch128 = (rng.random((1, INPUT_SIZE), dtype=np.float32),
                        rng.random((128, INPUT_SIZE), dtype=np.float32))
    from training.checkpoint import load_checkpoint
    from training.model import gemm_shapes, macs_per_example

    if imported:
        import onnx

        from crossport.exact.graph import chain_from_onnx

        network = chain_from_onnx(onnx.load(str(version_dir / BY_NAME["onnx"].path), load_external_data=False))
    else:
        network = load_checkpoint(checkpoint).model
    macs = macs_per_example(network)
    results: dict = {"version_dir": str(version_dir), "quick": quick, "model": network.config.arch,
                     "macs_per_example": macs, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                     "machine": _machine()}
    log.info("matrix-multiply ceiling ...")
    cores = available_cores()
    results["ceiling"] = matmul_ceiling(seconds, gemm_shapes(network, 128), macs, rounds, cores)
    sizes = {f["name"]: (version_dir / f["path"]) for f in manifest["artifacts"]}
    # a version published with --undecided omit lacks the lossy variants its test split could not judge
    present = [name for name in RUNTIMES if (not name.startswith("tflite_") or name in sizes)
               and not (imported and name == "pytorch")]
    runtimes = {}
    for name in present:
        log.info("runtime %s ...", name)
        run = load_runtime(name, version_dir, checkpoint)
        one, many = (summarize(timed(run, batch1, seconds, rounds), 1),
                     summarize(timed(run, batch128, seconds, rounds), 128))
        cold_runtime = name in ("onnxruntime", "tflite_fp32", "tflite_int8_full") or not quick
        cold = (cold_start(COLD_CHILD.format(root=str(ROOT), name=name, version=str(version_dir),
                                             checkpoint=str(checkpoint)), ROOT, repeats) if cold_runtime else None)
        artifact = {"pytorch": checkpoint, "onnxruntime": sizes["onnx"].resolve(),
                    "saved_model": version_dir}.get(name, sizes.get(name))
        single = parallel = None
        if name in THREADED:
            single = summarize(timed(load_runtime(name, version_dir, checkpoint, threads=1), batch128, seconds,
                                     rounds), 128)
            if cores > 1:  # every core as concurrent one-thread callers: what pipelines.serve --workers N runs
                shared = load_runtime(name, version_dir, checkpoint, threads=1, instances=cores)
                parallel = summarize(timed(shared, batch128, seconds, rounds, callers=cores), 128)
        best = max((many, parallel), key=lambda row: row["examples_per_s"] if row else 0)
        fmt = bench_format(name)
        arithmetic = fmt.arithmetic if fmt else "float32"  # PyTorch eager runs the float32 model
        runtimes[name] = {
            "batch1": one, "batch128": many, "batch128_one_thread": single, "batch128_callers": parallel,
            "threads": cores, "batch128_all_cores": best["examples_per_s"],
            "all_cores_layout": (f"{cores} callers x 1 thread" if best is parallel else f"1 caller x {cores} threads"),
            "cold_start": cold,
            "artifact_bytes": _size(artifact, exclude_extra=name == "saved_model"),
            "arithmetic": arithmetic,
            "ceiling_share": (best["examples_per_s"] / results["ceiling"]["examples_per_s"]
                              if arithmetic == "float32" else None),
        }
    results["runtimes"] = runtimes
    from export.layout import placement, saved_model_ops, tflite_ops

    for name, info in runtimes.items():
        if name == "saved_model":
            info["layout"] = placement(saved_model_ops(version_dir))
        elif name.startswith("tflite_"):
            info["layout"] = placement(tflite_ops(sizes[name]))
    for name, accuracy in _accuracies(version_dir).items():
        if name in runtimes:
            runtimes[name]["test_accuracy"] = accuracy
    with tempfile.TemporaryDirectory() as scratch:
        packages = {}
        for variant in (v for v in ("fp32", "int8_full") if f"tflite_{v}" in sizes):
            directory, archive = build_package(version_dir, Path(scratch) / f"lambda_{variant}", variant)
            packages[variant] = {
                "unzipped_bytes": sum(p.stat().st_size for p in directory.iterdir()),
                "zipped_bytes": archive.stat().st_size,
                "runtime_bytes": _installed_bytes(("ai_edge_litert", "numpy", "PIL", "numpy.libs", "pillow.libs")),
                "cold_start": cold_start(SERVERLESS_CHILD, directory, repeats, isolated=True),
            }
        results["serverless"] = packages
    with np.load(run_dir / "data.npz") as data:
        images = data["x_test"][:128].astype(np.float32) / 255.0
    backends = [b for b in (("onnx", "tflite_fp32") if quick else SERVE_BACKENDS)
                if not b.startswith("tflite_") or b in sizes]
    workers = cores  # one server process per core: the GIL limits each to about one
    results["http"] = []
    for backend in backends:
        with serving(version_dir.parent, backend, workers) as served:
            results["http"] += [serve_load(served, version_dir.parent, 1.0 if quick else 5.0, 4, batch, images,
                                           protocol)
                                for protocol, batches in (("rest", (1, 32)), ("grpc", (1, 128)))
                                for batch in (batches[:1] if quick else batches)]
    in_process = {"onnx": "onnxruntime"}
    for row in results["http"]:  # the service against the same backend called in this process, same batch
        runtime = runtimes.get(in_process.get(row["backend"], row["backend"]))
        if runtime and row["batch"] in (1, 128):  # batch 128: the backend's best way to use every core
            reference = runtime["batch1"]["examples_per_s"] if row["batch"] == 1 else runtime["batch128_all_cores"]
            row["in_process_share"] = row["examples_per_s"] / reference
    stages = json.loads((run_dir / "manifest.json").read_text()).get("stages", {})
    results["pipeline_stage_wall_s"] = {name: info.get("wall_s") for name, info in stages.items()}
    return results


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


def render_comparison(results: list[dict]) -> str:
    """Models side by side per format: accuracy, batch-1 latency (and its ratio to ONNX Runtime), throughput, size."""
    lines = ["| format | " + " | ".join(
                 f"{r['model']}: accuracy / batch-1 p50 ms (× ORT) / batch-128 ex/s / MB" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    names = [name for name in results[0]["runtimes"] if all(name in r["runtimes"] for r in results)]
    for name in names:
        cells = []
        for r in results:
            info, ort = r["runtimes"][name], r["runtimes"].get("onnxruntime")
            ratio = info["batch1"]["p50_ms"] / ort["batch1"]["p50_ms"] if ort else float("nan")
            accuracy = info.get("test_accuracy")
            cells.append(f"{'-' if accuracy is None else f'{accuracy:.2%}'} / {info['batch1']['p50_ms']:.3f} "
                         f"({ratio:.2f}×) / {info['batch128']['examples_per_s']:,.0f} / "
                         f"{(info['artifact_bytes'] or 0) / 1e6:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| model | MACs per example | ceiling (ex/s) |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['macs_per_example']:,} | {r['ceiling']['examples_per_s']:,.0f} |" for r in results]
    return "\n".join(lines) + "\n"


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


def render_markdown(results: dict) -> str:
    ceiling = results["ceiling"]
    cores = next(iter(results["runtimes"].values()), {}).get("threads", results["machine"]["cpus"])
    lines = [f"Benchmark of `{results['version_dir']}` on {results['date'][:10]} ({results['machine']['cpus']} CPUs"
             f"{', quick' if results['quick'] else ''}). Ceiling: {ceiling['gflops']:.1f} GFLOP/s float32 matmul "
             f"({ceiling['library']}) at the model's shapes = {ceiling['examples_per_s']:,.0f} examples/s "
             f"(spread {100 * ceiling.get('spread', 0):.0f} %). Throughput is the median of "
             f"{next(iter(results['runtimes'].values()))['batch128'].get('rounds', 1)} timed rounds after a warm-up; "
             "spread: (max - min) / median of the rounds.", "",
             f"| runtime | batch 1 p50 / p99 (ms) | batch 1 ex/s | batch 128 req/s | batch 128 ex/s (spread) "
             f"| batch 128 ex/s, {cores} callers x 1 thread (spread) | % of ceiling (best of the two) "
             "| batch 128 ex/s, 1 thread | cold start (s) | peak RSS (MB) | artifact (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, info in results["runtimes"].items():
        cold = info["cold_start"]
        cold_s = f"{cold['median_s']:.2f}" if cold else "-"
        rss = f"{cold['peak_rss_mb']:.0f}" if cold else "-"
        share = (f"{100 * info['ceiling_share']:.0f} %" if info.get("ceiling_share") is not None
                 else f"({info.get('arithmetic', 'int8')}: not comparable)")
        one_thread, callers = info.get("batch128_one_thread"), info.get("batch128_callers")
        single = f"{one_thread['examples_per_s']:,.0f}" if one_thread else "-"
        parallel = f"{callers['examples_per_s']:,.0f} ± {100 * callers['spread']:.0f} %" if callers else "-"
        lines.append(
            f"| {name} | {info['batch1']['p50_ms']:.3f} / {info['batch1']['p99_ms']:.3f} | "
            f"{info['batch1']['examples_per_s']:,.0f} | {info['batch128']['requests_per_s']:,.0f} | "
            f"{info['batch128']['examples_per_s']:,.0f} ± {100 * info['batch128']['spread']:.0f} % | {parallel} | "
            f"{share} | "
            f"{single} | {cold_s} | {rss} | "
            f"{(info['artifact_bytes'] or 0) / 1e6:.2f} |")
    layouts = {name: info["layout"] for name, info in results["runtimes"].items() if info.get("layout")}
    if layouts:
        lines += ["", "Transpose ops (between convolutions): " + ", ".join(
            f"{name} {layout['transposes']} ({layout['between_convs']})" for name, layout in layouts.items())]
    lines += ["", "| serverless package | unzipped (MB) | zipped (MB) | + runtime installed (MB) | cold start (s) |",
              "|---|---|---|---|---|"]
    for variant, info in results["serverless"].items():
        lines.append(f"| {variant} | {info['unzipped_bytes'] / 1e6:.2f} | {info['zipped_bytes'] / 1e6:.2f} | "
                     f"{info['runtime_bytes'] / 1e6:.0f} | {info['cold_start']['median_s']:.2f} |")
    lines += ["", "| web service backend | protocol | workers | clients | batch | req/s | ex/s | % of in process | "
                  "p50 (ms) | p99 (ms) | server CPU per request (ms) | clients' CPU per request (ms) | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cpu(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for row in results["http"]:
        share = f"{100 * row['in_process_share']:.0f} %" if row.get("in_process_share") is not None else "-"
        lines.append(f"| {row['backend']} | {row.get('protocol', 'rest')} | {row.get('workers', 1)} | "
                     f"{row['clients']} | {row['batch']} | "
                     f"{row['requests_per_s']:,.0f} | {row['examples_per_s']:,.0f} | {share} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {cpu(row.get('server_cpu_ms_per_request'))} | "
                     f"{cpu(row.get('client_cpu_ms_per_request'))} | {row['errors']} |")
    stages = results["pipeline_stage_wall_s"]
    lines += ["", "Pipeline stages (s): " + ", ".join(f"{k} {v}" for k, v in stages.items())]
    advice = recommendations(results)
    if advice:
        lines += ["", "Recommendation on this machine (every format listed passed the parity gate):", *advice]
    return "\n".join(lines) + "\n"


def render_chart(results: dict, path: Path) -> None:
    from pipelines.reports import pyplot

    plt = pyplot()
    names = list(results["runtimes"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.barh(names, [results["runtimes"][n]["batch128_all_cores"] for n in names], color="#3b6ea8")
    left.axvline(results["ceiling"]["examples_per_s"], color="#c0392b", linestyle="--", label="matmul ceiling")
    left.set_xscale("log")
    left.set_xlabel("examples/s at batch 128, every core (log)")
    left.legend(fontsize=8)
    right.barh(names, [results["runtimes"][n]["batch1"]["p50_ms"] for n in names], color="#2e8b57")
    right.set_xlabel("batch-1 latency p50, ms")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("version_dir", nargs="?", type=Path,
                        help="a published version (default: the newest under models/emnist_mlp)")
    parser.add_argument("--quick", action="store_true", help="a run under a minute (fewer repeats, fewer backends)")
    parser.add_argument("--out", type=Path, help="where to write bench.json/.md/.png (default: the run directory)")
    parser.add_argument("--compare", type=Path, nargs="+", default=[], metavar="VERSION_DIR",
                        help="also benchmark these versions (e.g. another architecture) and write compare.md: "
                             "the models side by side per format")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--force", action="store_true",
                        help="write bench.json/.md/.png into an --out holding other files (never a model repository)")
    parser.add_argument("--debug", action="store_true",
                        help="leave the libraries' output on the console (default: in bench.log beside bench.json)")
    args = parser.parse_args(argv)
    from crossport.console import quiet_console, run_command

    def body() -> int:
        version_dir = args.version_dir or _newest(Path("models") / "emnist_mlp")
        out = args.out or Path(results_run_dir(version_dir))
        check_out(out, force=args.force)  # before minutes of measuring
        out.mkdir(parents=True, exist_ok=True)
        with quiet_console(out / "bench.log", args.debug):  # in its output folder, known only now
            return _bench(args, version_dir, out)

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


def _log_to_mlflow(version_dir: Path, out: Path) -> str | None:
    """A ``bench`` run in the version's experiment, with the numbers and the three files: where it went."""
    from pipelines.tracking import log_benchmark

    manifest = read_manifest(version_dir)
    uri = (manifest.get("mlflow") or {}).get("tracking_uri")
    if uri:
        run_id = log_benchmark(uri, manifest["name"], json.loads((out / "bench.json").read_text()), out)
        return f"MLflow run {run_id} in {uri}, experiment {manifest['name']!r}"
    return None


def recommendations(results: dict) -> list[str]:
    """One line per goal: the format that serves it best here, with what it costs in accuracy."""
    runtimes = {name: info for name, info in results["runtimes"].items() if name != "pytorch"}
    if not runtimes:
        return []

    def accuracy(name: str) -> str:
        value = runtimes[name].get("test_accuracy")
        return f", test accuracy {value:.2%}" if value is not None else ""

    fastest = min(runtimes, key=lambda n: runtimes[n]["batch1"]["p50_ms"])
    busiest = max(runtimes, key=lambda n: runtimes[n]["batch128_all_cores"])
    smallest = min(runtimes, key=lambda n: runtimes[n]["artifact_bytes"] or float("inf"))
    return [f"- lowest latency: {fastest} ({runtimes[fastest]['batch1']['p50_ms']:.3f} ms p50 at batch 1"
            f"{accuracy(fastest)})",
            f"- highest throughput: {busiest} ({runtimes[busiest]['batch128_all_cores']:,.0f} ex/s at "
            f"batch 128, {runtimes[busiest]['all_cores_layout']}{accuracy(busiest)})",
            f"- smallest: {smallest} ({(runtimes[smallest]['artifact_bytes'] or 0) / 1e6:.2f} MB{accuracy(smallest)})"]


if __name__ == "__main__":
    sys.exit(main())
