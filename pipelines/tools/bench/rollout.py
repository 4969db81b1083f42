"""A rollout under load, measured: clients keep calling ``pipelines.serve`` while new versions are published into
its repository, and one tampered version appears.

In a scratch folder (never the user's repository): a copy of the version's run directory publishes version 1
(``pipelines.run --stage publish --republish``, as a user publishes), the server starts on that repository
polling every ``poll`` seconds, REST and gRPC clients call it without pause, and meanwhile the run is published
``publishes`` more times and one copy of the newest version with one byte changed is renamed into place. What it
measures: every failed request (there must be none), when each new version first answered a gRPC client (the
answer names its version) against when its directory appeared and what the server logged as its load time, that
the tampered version never answered, and the server's resident memory over ``steady`` further requests once the
rollout is done.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from crossport.errors import CrossportError
from crossport.interface import INPUT
from pipelines.tools.bench.harness import ROOT
from pipelines.tools.bench.load import serving

PICKUP_LIMIT_S = 120  # the longest a new version may take to answer after the publishing is over
LOADED = re.compile(r"(?:worker (?P<worker>\d+): )?serving (?P<name>\S+) version (?P<version>\d+) "
                    r"\(checked and loaded in (?P<s>[\d.]+) s\)")
REFUSED = re.compile(r"(?:worker (?P<worker>\d+): )?refused (?P<name>\S+) version (?P<version>\d+): ")


def rollout(version_dir: Path, workdir: Path, *, seconds: float = 60, clients: int = 4, publishes: int = 3,
            backend: str = "saved_model", poll: int = 1, steady: int = 10_000, workers: int = 1) -> dict:
    """Measure one rollout (see the module's docstring); ``workdir`` is made and filled. Bounded: the clients stop
    after ``seconds`` (or the last publish, if later), the steady phase after ``steady`` requests (one server
    process only: with ``workers`` it is skipped)."""
    from export.servable import image_contract
    from export.verify import read_manifest

    manifest = read_manifest(version_dir)
    example = np.full((1, *image_contract(version_dir).shape), 0.5, np.float32)  # one request's batch
    name, run_dir = manifest["name"], Path(manifest.get("run_dir") or "")
    if not (run_dir / "manifest.json").is_file():
        raise CrossportError(f"{version_dir}'s run directory {run_dir} is gone: a rollout republishes that run.",
                             hint="Pass a version whose run directory is still on this machine.")
    workdir.mkdir(parents=True, exist_ok=True)
    run, models = workdir / "run", workdir / "models"
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(run_dir, run)
    _publish(run, models)
    log_path = workdir / "serve.out"
    with log_path.open("w") as log, serving(models / name, backend, workers, "--file-system-poll-wait-seconds",
                                            str(poll), "--log-file", str(workdir / "serve-libraries.log"),
                                            output=log) as served:
        server, port, grpc_port = served.process, served.port, served.grpc_port
        clients_ = _Clients(name, port, grpc_port, clients, example)
        clients_.start()
        events = _publisher(run, models, name, seconds, publishes)
        # on a busy machine the last version may still be loading: the clients go on until each new version has
        # answered one of them (or PICKUP_LIMIT_S passes, and the version is reported as never answering)
        deadline = time.monotonic() + PICKUP_LIMIT_S
        while not _settled(clients_, events, log_path, name, workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        clients_.stop()
        answered_tampered = _answers(port, f"/v1/models/{name}/versions/{events['tampered']}:predict", example)
        memory = _steady(server, name, port, steady if workers == 1 else 0, example)
        status = json.loads(_get(port, f"/v1/models/{name}"))
    text = log_path.read_text()
    loads = [m for m in LOADED.finditer(text) if m["name"] == name]
    refusals = [m for m in REFUSED.finditer(text) if m["name"] == name]
    versions = []
    for number, appeared in events["published"].items():
        first = clients_.first_answer.get(number)
        mine = [m for m in loads if int(m["version"]) == number]
        versions.append({"version": number, "load_s": max((float(m["s"]) for m in mine), default=None),
                         "loaded_by_workers": sorted(int(m["worker"] or 0) for m in mine),
                         "first_answer_after_s": None if first is None else first - appeared})
    states = {int(entry["version"]): entry for entry in status["model_version_status"]}
    return {
        "model": name, "backend": backend, "poll_s": poll, "clients": clients, "workers": workers,
        "seconds": clients_.seconds,
        "requests": clients_.requests, "failed": clients_.failed, "failures": clients_.failures[:5],
        "versions": versions, "tampered": {"version": events["tampered"],
                                           "answered": clients_.first_answer.get(events["tampered"]) is not None
                                           or answered_tampered,
                                           "state": states.get(events["tampered"], {}),
                                           "refused_by_workers": sorted(int(m["worker"] or 0) for m in refusals
                                                                        if int(m["version"]) == events["tampered"])},
        "memory": memory,
    }


def _settled(clients: _Clients, events: dict, log_path: Path, name: str, workers: int) -> bool:
    """Every new version has answered a client, and every worker has logged loading it and refusing the tampered
    one (each worker polls on its own)."""
    if not all(number in clients.first_answer for number in events["published"]):
        return False
    text = log_path.read_text()
    everyone = set(range(1, workers + 1)) if workers > 1 else {0}
    loaded = {(int(m["version"]), int(m["worker"] or 0)) for m in LOADED.finditer(text) if m["name"] == name}
    refused = {int(m["worker"] or 0) for m in REFUSED.finditer(text)
               if m["name"] == name and int(m["version"]) == events["tampered"]}
    return refused == everyone and all((number, worker) in loaded for number in events["published"]
                                       for worker in everyone)


def _publish(run: Path, models: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipelines.run", "--stage", "publish", "--republish", "--run-dir",
                             str(run), "--models-dir", str(models), "--no-tracking"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise CrossportError(f"publishing {run} failed: {(result.stderr or result.stdout).strip()[-500:]}")


def _get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


def _answers(port: int, path: str, example: np.ndarray) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, json.dumps({"instances": example.tolist()}).encode(),
                           {"Content-Type": "application/json"})
        return connection.getresponse().status == 200
    finally:
        connection.close()


class _Clients:
    """Half REST, half gRPC, each calling without pause until stopped; every answer that is not a success is a
    failure, and each gRPC answer's version is noted with the time it first answered."""

    def __init__(self, name: str, port: int, grpc_port: int, count: int, example: np.ndarray) -> None:
        self.name, self.port, self.grpc_port, self.count, self.example = name, port, grpc_port, count, example
        self.requests = self.failed = 0
        self.failures: list[str] = []
        self.first_answer: dict[int, float] = {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads: list[threading.Thread] = []
        self.seconds = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        for index in range(self.count):
            target = self._grpc if index % 2 else self._rest
            self._threads.append(threading.Thread(target=target, daemon=True))
            self._threads[-1].start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        self.seconds = time.monotonic() - self._started

    def _note(self, ok: bool, what: str = "", version: int | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            if not ok:
                self.failed += 1
                self.failures.append(what)
            if version is not None and version not in self.first_answer:
                self.first_answer[version] = now

    def _rest(self) -> None:
        body = json.dumps({"instances": self.example.tolist()}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self._stop.is_set():
            try:
                connection.request("POST", f"/v1/models/{self.name}:predict", body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                self._note(response.status == 200, f"REST {response.status}: {answer[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                self._note(False, f"REST {error!r}")

    def _grpc(self) -> None:
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        from serving.grpc_service import array_to_tensor

        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}",
                                        options=[("grpc.use_local_subchannel_pool", 1)])
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.name
        request.inputs[INPUT].CopyFrom(array_to_tensor(self.example))
        while not self._stop.is_set():
            try:
                answer = stub.Predict(request, timeout=60)
                self._note(True, version=answer.model_spec.version.value)
            except grpc.RpcError as error:
                self._note(False, f"gRPC {error.code().name}: {error.details()}")
        channel.close()


def _publisher(run: Path, models: Path, name: str, seconds: float, publishes: int) -> dict:
    """Publish ``publishes`` versions spread over ``seconds``, and rename a tampered copy of the newest version into
    place after the first; when each directory appeared (watched while its publisher runs)."""
    from export.publish import versions

    base, started = models / name, time.monotonic()
    published, tampered = {}, None
    for index in range(publishes):
        _wait(started + seconds * (index + 1) / (publishes + 1))
        number = versions(base)[-1] + 1
        target = base / str(number)
        publisher = threading.Thread(target=_publish, args=(run, models))
        publisher.start()
        while publisher.is_alive() and not target.exists():
            time.sleep(0.005)
        appeared = time.monotonic()
        publisher.join()
        if not target.exists():
            raise CrossportError(f"publishing did not make {target}")
        published[number] = appeared
        if index == 0:
            tampered = _tamper(base)
    _wait(started + seconds)
    return {"published": published, "tampered": tampered}


def _tamper(base: Path) -> int:
    """A copy of the newest version with one byte of its ONNX file changed, renamed into place as the next version
    (as a half-done or hostile edit would appear): the server must never serve it."""
    from export.publish import versions

    newest = versions(base)[-1]
    staging = base / ".tampering"
    shutil.copytree(base / str(newest), staging)
    onnx = staging / "assets.extra" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    os.rename(staging, base / str(newest + 1))
    return newest + 1


def _wait(until: float) -> None:
    remaining = until - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise CrossportError(f"no resident set size for process {pid}")


def _steady(server: subprocess.Popen, name: str, port: int, count: int, example: np.ndarray) -> dict | None:
    """Resident memory of the server after a warm-up of 1,000 REST requests and after ``count`` more."""
    if count <= 0 or not Path("/proc").is_dir():
        return None
    body = json.dumps({"instances": example.tolist()}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(times: int) -> None:
        for _ in range(times):
            connection.request("POST", f"/v1/models/{name}:predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise CrossportError(f"the steady phase got HTTP {response.status}")

    call(1000)
    before = _rss_kib(server.pid)
    call(count)
    after = _rss_kib(server.pid)
    connection.close()
    return {"requests": count, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
            "growth_percent": 100 * (after - before) / before}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_rollout(result: dict) -> str:
    lines = [f"# Rollout under load: {result['model']} ({result['backend']}), poll {result['poll_s']} s", "",
             f"{result['clients']} clients (REST and gRPC) for {result['seconds']:.1f} s: {result['requests']} "
             f"requests, {result['failed']} failed.", "",
             "| version | load (s) | poll + load (s) | first answer after it appeared (s) | within poll + load |",
             "|---|---|---|---|---|"]
    for entry in result["versions"]:
        load, first = entry["load_s"], entry["first_answer_after_s"]
        bound = None if load is None else result["poll_s"] + load
        within = "-" if bound is None or first is None else "yes" if first <= bound else "no"
        lines.append(f"| {entry['version']} | {_number(load)} | {_number(bound)} | "
                     f"{'never' if first is None else _number(first)} | {within} |")
    tampered = result["tampered"]
    lines += ["", f"Tampered version {tampered['version']}: "
                  f"{'ANSWERED' if tampered['answered'] else 'never answered'}; status "
                  f"{tampered['state'].get('state', '?')} "
                  f"({tampered['state'].get('status', {}).get('error_code', '?')})."]
    memory = result["memory"]
    if memory:
        lines += ["", f"Resident memory over {memory['requests']} requests after warm-up: "
                      f"{memory['rss_before_mib']:.1f} → {memory['rss_after_mib']:.1f} MiB "
                      f"({memory['growth_percent']:+.2f} %)."]
    return "\n".join(lines) + "\n"
