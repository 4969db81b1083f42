"""``pipelines.serve --workers N``: N processes behind one REST port and one gRPC port, started together, spread
over in turn, stopped together; never a port left held by half a server."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, Server, burst, call, wait_until

PREDICT = "/v1/models/emnist_mlp:predict"


def wait_channel(pid: int) -> str:
    """Where the process's main thread sleeps in the kernel (``inet_csk_accept``: in accept()); "0" while it runs, or
    always on a kernel that does not show wait channels."""
    return Path(f"/proc/{pid}/wchan").read_text()


def worker_pids(supervisor: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def option(argv: list[str], flag: str) -> str:
    """The value argparse takes for ``flag``: the one after its last occurrence."""
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def predict(connection: http.client.HTTPConnection, rows: np.ndarray) -> np.ndarray:
    connection.request("POST", PREDICT, json.dumps({"instances": rows.tolist()}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return np.asarray(json.loads(response.read())["predictions"])


@pytest.fixture
def served(pipeline_run):  # its one test stops the server to read its log: a server per test, never one shared
    from pipelines.tools.bench.load import _free_ports

    rest, grpc_port = _free_ports(2)
    server = Server(pipeline_run.models_dir / "emnist_mlp", "tflite_fp32", "--workers", "2", "--grpc-port",
                    str(grpc_port), port=rest)
    yield server, grpc_port
    if server.process.poll() is None:
        server.stop()


def test_connections_are_spread_over_the_workers_in_turn_and_answer_alike(served, pipeline_run):
    from crossport.formats import BY_NAME
    from crossport.runtimes import load_format

    server, _ = served
    assert len(worker_pids(server.process.pid)) == 2
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)
    for pid in worker_pids(server.process.pid):  # cores split over the workers; interpreters to use all of them
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert option(argv, "--threads") == str(threads)
        assert option(argv, "--instances") == str(max(1, cores // threads))
    rows = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=60) for _ in range(4)]
    answers = []
    pids = worker_pids(server.process.pid)
    shown = wait_channel(server.process.pid) != "0"  # the idle supervisor sleeps: "0" means the kernel hides them
    for connection in connections:
        # the kernel hands a connection to the worker that has waited longest in accept(); a worker still on its way
        # back to accept() (its last connection's thread being started, on a loaded machine) is not waiting, and
        # once gave the other worker three connections in a row: each connection opens once both are waiting
        if shown:
            wait_until(lambda: all(wait_channel(pid) == "inet_csk_accept" for pid in pids),
                       "both workers waiting in accept()", process=server.process)
        answers += [predict(connection, rows) for _ in range(2)]  # the connection opens here and is kept alive
    for connection in connections:
        connection.close()
    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    expected = load_format(BY_NAME["tflite_fp32"], version / BY_NAME["tflite_fp32"].path, 1)(rows)["scores"]
    for answer in answers:
        np.testing.assert_array_equal(answer, expected.astype(np.float64))
    server.stop()
    output = server.output()
    workers = re.findall(r"worker (\d): 127\.0\.0\.1 \"POST /v1/models/emnist_mlp:predict", output)
    # four connections, each kept by the worker that accepted it: two each, in turn
    assert sorted(workers) == ["1"] * 4 + ["2"] * 4, output
    assert "2 workers (pids" in output and "1 runtime thread each" in output
    assert output.count("serving emnist_mlp version 1 (tflite_fp32)") == 1  # one banner, from the supervisor


def test_every_worker_answers_grpc_on_the_one_port(pipeline_run):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from pipelines.tools.bench.load import _free_ports
    from serving.grpc_service import array_to_tensor

    rest, grpc_port = _free_ports(2)
    server = Server(pipeline_run.models_dir / "emnist_mlp", "onnx", "--workers", "2", "--grpc-port", str(grpc_port),
                    port=rest)
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "emnist_mlp"
        request.inputs["images"].CopyFrom(array_to_tensor(np.zeros((2, 784), np.float32)))
        served_by = set()
        for _ in range(40):  # each channel is its own connection; the kernel spreads them over the workers
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                answer = stub.Predict(request, timeout=30)
                assert next(d.size for d in answer.outputs["scores"].tensor_shape.dim) == 2
                served_by |= holders(established(grpc_port), worker_pids(server.process.pid))
            if len(served_by) == 2:
                break
        assert served_by == set(worker_pids(server.process.pid))
    finally:
        server.stop()


def established(port: int) -> set[str]:
    """Socket inodes of the connections accepted on ``port`` (local port, state 01 in /proc/net/tcp and tcp6: gRPC
    listens on IPv6 sockets with IPv4-mapped addresses)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                found.add(fields[9])
    return found


def holders(inodes: set[str], pids: list[int]) -> set[int]:
    """The processes among ``pids`` holding one of the sockets ``inodes``."""
    found = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.add(pid)
    return found


def test_stopping_the_supervisor_stops_every_worker(pipeline_run):
    server = Server(pipeline_run.models_dir / "emnist_mlp", "onnx", "--workers", "2")
    workers = worker_pids(server.process.pid)
    assert len(workers) == 2
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    wait_until(lambda: not any(alive(pid) for pid in workers), "every worker to exit")
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))


def test_a_dead_worker_stops_the_server_with_one_line(pipeline_run):
    server = Server(pipeline_run.models_dir / "emnist_mlp", "onnx", "--workers", "2")
    first, second = sorted(worker_pids(server.process.pid))
    os.kill(first, signal.SIGKILL)
    assert server.process.wait(timeout=30) == 1
    wait_until(lambda: not alive(second), "the other worker to exit")
    output = server.output()
    assert re.search(rf"worker \d \(pid {first}\) exited with code -9; stopping the others", output), output


def test_workers_leave_when_their_supervisor_is_killed(pipeline_run):
    server = Server(pipeline_run.models_dir / "emnist_mlp", "onnx", "--workers", "2")
    workers = worker_pids(server.process.pid)
    server.process.kill()  # no chance to stop them: they must notice on their own
    server.process.wait(timeout=30)
    wait_until(lambda: not any(alive(pid) for pid in workers), "the orphaned workers to exit")


@pytest.mark.parametrize(("extra", "fragment"), [
    (("--version", "9"), "has no version 9"),
    (("--backend", "tflite_fp32", "--port", "PORT_IN_USE"), "cannot listen on 127.0.0.1:"),
    # checked with a plain socket: gRPC's own SO_REUSEPORT bind would share a port held by the same user
    (("--port", "0", "--grpc-port", "PORT_IN_USE"), "cannot listen on 127.0.0.1:"),
    (("--host", "no-such-host.invalid"), "cannot listen on no-such-host.invalid:"),
])
def test_bad_input_is_refused_before_any_worker_starts(pipeline_run, extra, fragment, capfd):
    """In this process (the supervisor refuses before it starts any worker); the first case as its own process too,
    for the wiring of ``python -m pipelines.serve``."""
    from serving.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = [str(pipeline_run.models_dir / "emnist_mlp"), "--workers", "2",
                *(a.replace("PORT_IN_USE", port) for a in extra)]
        if extra[0] == "--version":
            result = subprocess.run([sys.executable, "-m", "pipelines.serve", *args], cwd=ROOT, capture_output=True,
                                    text=True, timeout=120)
        else:
            result = call(main, *args, capsys=capfd)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "workers (pids" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_grpc_port_held_by_another_server_is_refused_not_shared(pipeline_run, workers):
    """gRPC binds with SO_REUSEPORT on Linux by default: a second server would share a stale one's port and get half
    its connections. Only the workers of one server share theirs."""
    with socket.socket() as stale:
        stale.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stale.bind(("127.0.0.1", 0))
        stale.listen()
        result = subprocess.run([sys.executable, "-m", "pipelines.serve", str(pipeline_run.models_dir / "emnist_mlp"),
                                 "--backend", "onnx", "--port", "0", "--grpc-port", str(stale.getsockname()[1]),
                                 "--workers", workers], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "cannot listen on 127.0.0.1:" in errors[0], result.stderr


@pytest.mark.parametrize("value", ["1,2,3", "a,b,c,d", "1,2,3,-4", ""])
def test_a_hand_typed_worker_option_is_refused_in_one_line(pipeline_run, value):
    result = subprocess.run([sys.executable, "-m", "pipelines.serve", str(pipeline_run.models_dir / "emnist_mlp"),
                             f"--worker={value}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "start the server with --workers N" in errors[0], result.stderr


def test_a_burst_of_new_connections_is_answered_by_the_workers_never_reset(pipeline_run):
    """The supervisor's socket has the same deep backlog as one process's: 1,000 clients at once, all answered.
    A server of its own: the module's shared one is stopped by the tests that stop a server."""
    server = Server(pipeline_run.models_dir / "emnist_mlp", "onnx", "--workers", "2")
    try:
        outcomes = burst(server.port, "/v1/models/emnist_mlp:predict",
                         json.dumps({"instances": [[0.5] * 784]}).encode(), 1000)
    finally:
        server.stop()
    assert outcomes == [200] * 1000, sorted(set(map(repr, outcomes)))[:5]
