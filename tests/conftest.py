"""Shared fixtures: a tiny seeded model carried through every converter, and one real pipeline run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from crossport.frameworks import own_the_process
from tests.helpers import free_port, run_cli, wait_until

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A test process is set up as a crossport command's (crossport.frameworks.own_the_process): the same libraries loaded,
# and collected as seldom, whichever route, in-process or command line, a test takes.
own_the_process()

TINY_LABELS = ("a", "b", "c", "d", "e")


# Fixtures that start processes (a pipeline run, an MLflow server): every test using one is slow, by this rule.
PROCESS_FIXTURES = frozenset({"pipeline_run", "mlflow_server"})
# Programs a run asks something of in a few milliseconds (provenance: git; platform.processor(): uname; `ldconfig -p`,
# which the first `import torch` in a process starts to find libdl: whichever test imports PyTorch first in its
# process starts it, so without it here a test would pass or fail by the order the tests ran in).
QUICK_TOOLS = frozenset({"git", "uname", "ldconfig"})


# What the session makes once for all its processes (pytest-xdist workers): a folder every process can reach.
SHARED = "CROSSPORT_TEST_SESSION"


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or the only process): its workers inherit the folder
        base = config._tmp_path_factory.getbasetemp()
        os.environ[SHARED] = str(base)
        # what the session's processes put in "the system's temporary folder" (a command's libraries' log,
        # crossport.console.command_log, one per served or checked process) stays in the session's folder, which
        # pytest keeps for three sessions, instead of piling up in /tmp run after run
        scratch = base / "system-tmp"
        scratch.mkdir(exist_ok=True)
        os.environ["TMPDIR"] = str(scratch)
        tempfile.tempdir = None  # this process asks again: TMPDIR
        return
    # Test processes share the cores as distributed ranks do (training.distributed.threads_per_rank): two
    # processes each spinning two OpenMP threads on two cores made one run's training 3.6x slower.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


def pytest_unconfigure(config):
    """The controller stops the processes the session's fixtures left running, once every worker is done."""
    if hasattr(config, "workerinput") or SHARED not in os.environ:
        return
    for record in (Path(os.environ[SHARED]) / "processes").glob("*.pid"):
        _stop_group(int(record.read_text()))


def _stop_group(pid: int) -> None:
    import signal

    def ended() -> bool:
        try:  # reaped here when this process started it (no pytest-xdist), else by init
            return os.waitpid(pid, os.WNOHANG)[0] == pid
        except ChildProcessError:
            return not Path(f"/proc/{pid}").exists()

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        try:
            wait_until(ended, f"process group {pid} to end", timeout=20)
            return
        except AssertionError:
            continue


def owned(pid: int) -> None:
    """A process (and its group) the session stops at its end, whichever worker started it."""
    folder = Path(os.environ[SHARED]) / "processes"
    folder.mkdir(exist_ok=True)
    (folder / f"{pid}.pid").write_text(str(pid))


def once(name: str, make) -> dict:
    """``make(folder)``'s record, made by whichever process asks first; the others wait for it and read it. A
    failed ``make`` records nothing, so every process that asks sees the failure itself."""
    import fcntl
    import json

    root = Path(os.environ[SHARED])
    record = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            made = make(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))
            partial = record.with_suffix(".partial")
            partial.write_text(json.dumps(made))
            os.replace(partial, record)
        return json.loads(record.read_text())


# CROSSPORT_REPEAT=N runs every selected test N times, round after round (each repetition a test of its own, so
# fixtures are set up afresh as in a new run): the loops that show a test never fails by chance, e.g.
# CROSSPORT_REPEAT=30 pytest tests/test_workers.py. Unset: each test once.
REPEAT = int(os.environ.get("CROSSPORT_REPEAT") or 1)


def pytest_generate_tests(metafunc):
    if REPEAT > 1:
        metafunc.fixturenames.append("_repetition")
        metafunc.parametrize("_repetition", range(REPEAT), ids=lambda i: f"round{i}")


# The modules that take longest are handed out first, longest first (the classic longest-processing-time rule, whose
# last module to finish is a short one): `--dist loadscope --no-loadscope-reorder` (the Makefile) gives each process
# whole modules in collection order, so a long module collected last (test_workers, 65 s) would run alone at the end
# while the other process idles. (Without --no-loadscope-reorder pytest-xdist orders modules by their number of tests
# instead, and test_scale, six tests, started nine minutes into a 13-minute run.) The order is each module's summed
# `--durations=0` on 2026-12-05 (seconds): scale 146, robustness 108, bench 71, distributed 70, workers 65,
# exact_graph 51, gate 47, servables 41, import_e2e 39, rollout 39, hostile_cli 35, cnn 35, image_e2e 26. Only the
# order changes; no test depends on it.
LONGEST_FIRST = ("test_scale.py", "test_robustness.py", "test_bench.py", "test_distributed.py", "test_workers.py",
                 "test_exact_graph.py", "test_gate.py", "test_servables.py", "test_import_e2e.py", "test_rollout.py",
                 "test_hostile_cli.py", "test_cnn.py", "test_image_e2e.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if REPEAT > 1:  # every test once per round, rounds in order
        items.sort(key=lambda item: item.callspec.params["_repetition"])


@pytest.fixture(autouse=True)
def _release_run_locks():
    """A command line run in this process (tests.helpers.pipeline_here) keeps its run directory's lock, as a process
    does until it exits: each test's locks are released after it."""
    from pipelines import lock

    before = set(lock._HELD)
    yield
    for key in set(lock._HELD) - before:
        os.close(lock._HELD.pop(key))


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request, monkeypatch):
    """The fast tier (``make test-fast``: ``-m "not slow"``) is every test that starts no process: a test that does
    (a command line, a server, torchrun, a spawned rank) must say so with ``@pytest.mark.slow``, or it fails here."""
    if request.node.get_closest_marker("slow"):
        return

    real = subprocess.Popen._execute_child

    def refuse(popen, args, *rest, **kwargs):
        if isinstance(args, list | tuple) and args and Path(str(args[0])).name in QUICK_TOOLS:
            return real(popen, args, *rest, **kwargs)
        raise AssertionError(f"{request.node.nodeid} starts a process but is not marked slow: add "
                             "@pytest.mark.slow (the fast tier starts no process)")

    import multiprocessing.util

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", lambda *a, **k: refuse(None, None))
    monkeypatch.setattr(os, "fork", lambda: refuse(None, None))


@dataclass(frozen=True)
class TinyArtifacts:
    root: Path
    checkpoint: Path
    onnx: Path
    tf_graph: Path
    saved_model: Path
    tflite: Path
    labels: tuple[str, ...]
    images: np.ndarray  # float32 [N, 784] in [0, 1]


@pytest.fixture(scope="session")
def tiny_images() -> np.ndarray:
    return np.random.default_rng(7).random((37, 784), dtype=np.float32)


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from training.model import MLP, ModelConfig

    torch.manual_seed(0)
    return MLP(ModelConfig(hidden_sizes=(32, 16), num_classes=len(TINY_LABELS), dropout=0.0)).eval()


@pytest.fixture(scope="session")
def tiny_exact(tiny_model, tiny_images):
    """The tiny model's exact (float64) outputs and float32 error bounds on the tiny images."""
    from crossport.exact import exact_outputs

    return exact_outputs(tiny_model, tiny_images)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_model, tiny_images) -> TinyArtifacts:
    """A tiny seeded MLP taken through every converter with the library functions."""
    from crossport.files import sha256_file
    from export.servable import build_saved_model
    from export.tflite import convert_tflite
    from training.checkpoint import save_checkpoint
    from training.train import TrainConfig
    from translation.onnx_export import export_onnx
    from translation.onnx_to_tf import translate

    root = tmp_path_factory.mktemp("tiny")
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, tiny_model, TINY_LABELS, "0" * 64, {"test_accuracy": 0.0}, TrainConfig())
    onnx_path = root / "model.onnx"
    export_onnx(tiny_model, TINY_LABELS, sha256_file(checkpoint), onnx_path)
    translate(onnx_path, root / "tf_graph")
    build_saved_model(root / "tf_graph", TINY_LABELS, root / "saved_model")
    convert_tflite(root / "saved_model", root / "model_fp32.tflite")
    return TinyArtifacts(root, checkpoint, onnx_path, root / "tf_graph", root / "saved_model",
                         root / "model_fp32.tflite", TINY_LABELS, tiny_images)


@pytest.fixture(scope="session")
def mlflow_server():
    """A real ``mlflow server`` (SQLite backend, local artifact store) on 127.0.0.1, one for the whole session."""
    return once("mlflow_server", _start_mlflow_server)["uri"]


def _start_mlflow_server(root: Path) -> dict:
    import urllib.request

    port = free_port()
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # no job runners (huey consumers, seven processes): crossport submits no MLflow jobs, as pipelines.ui
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    owned(server.pid)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, f"mlflow server's /health on {uri}", process=server, interval=0.2)
    except AssertionError as error:
        pytest.fail(f"{error}: {(root / 'server.log').read_text()[-2000:]}")
    return {"uri": uri}


@dataclass(frozen=True)
class PipelineRun:
    result: subprocess.CompletedProcess
    run_dir: Path
    models_dir: Path
    tracking_uri: str


@pytest.fixture(scope="session")
def pipeline_run(mlflow_server) -> PipelineRun:
    """One real ``--stage all`` on the bundled digits, tracked by a real MLflow server over HTTP; one per session."""

    def make(root: Path) -> dict:
        result = run_cli("--stage", "all", "--dataset", "digits", "--epochs", "3", "--run-dir", str(root / "run"),
                         "--models-dir", str(root / "models"), "--tracking-uri", mlflow_server)
        assert result.returncode == 0, result.stderr[-4000:]
        return {"root": str(root), "stdout": result.stdout, "stderr": result.stderr}

    made = once("pipeline_run", make)
    root = Path(made["root"])
    result = subprocess.CompletedProcess(["pipelines.run"], 0, made["stdout"], made["stderr"])
    return PipelineRun(result, root / "run", root / "models", mlflow_server)
