"""How the benchmark measures: a runtime loaded as a deployer would, cold start in a fresh process, warm
latency and throughput in timed rounds."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from crossport.errors import CrossportError
from crossport.formats import BY_NAME, FORMATS, TFLITE_FORMATS

log = logging.getLogger("crossport.bench")

# PyTorch, then every published format; bench.json keeps its historical name for the ONNX one
BENCH_NAME = {"onnx": "onnxruntime"}
RUNTIMES = ("pytorch", *(BENCH_NAME.get(fmt.name, fmt.name) for fmt in FORMATS))
ROOT = Path(__file__).resolve().parents[3]  # the repository


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
from pipelines.tools.bench.harness import load_runtime
run = load_runtime({name!r}, Path({version!r}), {checkpoint!r} and Path({checkpoint!r}))
run(np.zeros((1, *{shape!r}), np.float32))
first = time.time()
for _ in range(200):
    run(np.zeros((128, *{shape!r}), np.float32))
print(first, peak_rss_bytes())
"""

SERVERLESS_CHILD = PEAK_RSS + r"""
import json, sys, time
sys.path.insert(0, ".")
import handler
size = 1
for side in handler.model().shape:  # one example of the model's input, as the handler reads it from the file
    size *= side
reply = handler.lambda_handler({"body": json.dumps({"pixels": [0.0] * size})}, None)
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


def paired(theirs: list[Round], ours: list[Round], batch: int) -> dict:
    """Two files timed in the same interleaved rounds, compared round by round: per round, their figure ÷ ours (batch
    1: the round's median latency; larger batches: the round's rate), then the median and range of those ratios.
    What slows the machine down for a while slows both files of a round alike, so a ratio's range is narrower than
    either file's own spread: a range that leaves out 1 is a difference every round agreed on."""
    if len(theirs) != len(ours) or not ours:
        raise ValueError(f"paired rounds: {len(theirs)} against {len(ours)}")

    def figure(round_: Round) -> float:
        calls, wall = round_
        return float(np.median(calls)) if batch == 1 else len(calls) / wall

    return over_rounds([figure(a) / figure(b) for a, b in zip(theirs, ours, strict=True)])


def over_rounds(ratios: list[float]) -> dict:
    """Ratios taken round by round, summed up: their median and range, and how many rounds gave them."""
    values = np.asarray(ratios, dtype=np.float64)
    return {"median": float(np.median(values)), "low": float(values.min()), "high": float(values.max()),
            "rounds": len(values)}


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


