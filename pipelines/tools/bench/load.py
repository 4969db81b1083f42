"""The web service under a bounded loopback load: REST and gRPC clients against pipelines.serve, with the
server's CPU per request."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossport.errors import CrossportError
from crossport.interface import INPUT, SCORES
from pipelines.tools.bench.harness import ROOT

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
def serving(model_dir: Path, backend: str, workers: int = 1, *extra: str, output=None):
    """``pipelines.serve --workers workers`` (and ``extra`` flags) on 127.0.0.1 with REST and gRPC, answering once
    both listeners are up (:class:`Served`); stopped after. Every load of one backend goes to one server, as to a
    deployed one. ``output``: an open file for the server's console (default: discarded)."""
    import http.client

    port, grpc_port = _free_ports(2)
    server = subprocess.Popen([sys.executable, "-m", "pipelines.serve", str(model_dir), "--backend", backend,
                               "--port", str(port), "--grpc-port", str(grpc_port), "--workers", str(workers),
                               *extra],
                              cwd=ROOT,
                              stdout=output or subprocess.DEVNULL,
                              stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
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
                    where = f"; see {output.name}" if output else ""
                    raise CrossportError(f"pipelines.serve --backend {backend} did not start{where}") from None
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
    request_bytes = len(body)
    if protocol in GRPC_INPUTS:  # grpc: float32 in [0, 1]; grpc_uint8: the same pixels as 0-255, predict_uint8
        signature, as_input = GRPC_INPUTS[protocol]
        callers = [_grpc_caller(grpc_port, model_dir.name, as_input(images[:batch]), signature)
                   for _ in range(clients)]
        request_bytes = callers[0].request_bytes
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
            "batch": batch, "request_bytes": request_bytes,
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


GRPC_INPUTS = {"grpc": ("serving_default", lambda images: images.astype(np.float32)),
               "grpc_uint8": ("predict_uint8", lambda images: np.round(images * 255).astype(np.uint8))}


def _grpc_caller(port: int, name: str, batch: np.ndarray, signature: str = "serving_default"):
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
    request.model_spec.signature_name = signature
    request.inputs[INPUT].CopyFrom(array_to_tensor(batch))  # DT_UINT8 for a uint8 batch
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

    call.request_bytes = len(payload)
    return call


def model_cpu_ms(version_dir: Path, backend: str, images: np.ndarray, threads: int, seconds: float) -> float:
    """CPU milliseconds (every thread of this process) per call of the backend itself on ``images``, loaded as
    pipelines.serve loads it: what a request costs the server beyond the model is its CPU per request less this."""
    from serving.rest import load_backend

    predict = load_backend(version_dir, backend, threads).predict
    predict(images)  # warm-up
    calls, cpu, stop_at = 0, time.process_time(), time.monotonic() + seconds
    while time.monotonic() < stop_at or calls < 3:
        predict(images)
        calls += 1
    return (time.process_time() - cpu) / calls * 1e3
