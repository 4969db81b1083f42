"""``pipelines.serve --workers N``: N server processes behind one REST port (and one gRPC port), so a Python server
uses every core.

One process holds the GIL while it parses a request's JSON, so a single ``pipelines.serve`` uses about one core
however many threads its runtime has. With ``--workers N`` a supervisor binds the REST socket and starts N worker
processes (``pipelines.serve`` itself, each loading the version) that share it:

- each worker takes connections in a blocking ``accept()`` on the shared socket; the kernel hands a new connection
  to the worker that has waited longest, so connections are spread in turn;
- the socket starts listening only once every worker has loaded, so no early client lands on one worker alone;
- gRPC workers bind the same port with ``SO_REUSEPORT`` (gRPC's default on Linux) and the kernel spreads
  connections by their addresses: a client channel is one connection, so it stays on one worker;
- the supervisor stops every worker on SIGTERM or Ctrl-C, and stops them all and exits 1 when one dies, so a
  half-working server never keeps a port; a worker exits when its supervisor is gone.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NamedTuple

log = logging.getLogger("crossport.serve")

READY_TIMEOUT_S = 600  # a worker loading a SavedModel on a busy machine takes seconds; a hung one must not hang us


def listening_socket(host: str, port: int) -> socket.socket:
    """The REST socket, bound but not yet listening (``OSError`` when the address is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def free_grpc_port(host: str, port: int) -> int:
    """``port`` if nothing else listens there (0: a free one), checked with a plain socket: gRPC's own bind uses
    SO_REUSEPORT and would share a port another server of the same user holds."""
    with listening_socket(host, port) as probe:
        return probe.getsockname()[1]


def supervise(argv: list[str], workers: int, sock: socket.socket, threads: int, instances: int,
              grpc_port: int | None, log_file: str | None, ready_lines: list[str]) -> int:
    """Start ``workers`` copies of ``pipelines.serve argv`` on ``sock``, log ``ready_lines`` once all listen, and
    serve until stopped. The exit code."""
    children: list[tuple[subprocess.Popen, int, int]] = []  # process, ready pipe (read end), control (write end)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for index in range(1, workers + 1):
            children.append(_start(argv, index, sock, threads, instances, grpc_port, log_file))
        for index, (process, ready, _control) in enumerate(children, start=1):
            if not _wait_ready(process, ready):
                code = process.poll()
                log.error("worker %d did not start (%s); stopping", index,
                          f"exit code {code}" if code is not None else f"not ready after {READY_TIMEOUT_S} s")
                return code or 1
        sock.listen(socket.SOMAXCONN)  # as serving.serve.RestServer: a burst waits, it is not reset
        for _process, _ready, control in children:
            os.write(control, b"g")  # go: the control pipe stays open while the supervisor lives
        for line in ready_lines:
            log.info("%s", line)
        log.info("%d workers (pids %s), %d runtime thread%s each", workers,
                 ", ".join(str(process.pid) for process, _, _ in children), threads, "" if threads == 1 else "s")
        log.debug("TFLite backends: %d interpreters per worker", instances)
        while True:
            for index, (process, _ready, _control) in enumerate(children, start=1):
                code = process.poll()
                if code is not None:
                    log.error("worker %d (pid %d) exited with code %d; stopping the others", index, process.pid,
                              code)
                    return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(children)
        sock.close()


def _start(argv, index, sock, threads, instances, grpc_port, log_file):
    ready_read, ready_write = os.pipe()
    control_read, control_write = os.pipe()
    command = [sys.executable, "-m", "pipelines.serve", *argv, "--workers", "1", "--threads", str(threads),
               "--instances", str(instances), "--worker", f"{index},{sock.fileno()},{ready_write},{control_read}"]
    if grpc_port is not None:
        command += ["--grpc-port", str(grpc_port)]
    if log_file is not None:
        command += ["--log-file", log_file]
    # the console: under the quiet console sys.stderr is the terminal while descriptor 2 is the library log
    process = subprocess.Popen(command, pass_fds=(sock.fileno(), ready_write, control_read),
                               stdout=sys.stdout.fileno(), stderr=sys.stderr.fileno())
    os.close(ready_write)
    os.close(control_read)
    return process, ready_read, control_write


def _wait_ready(process: subprocess.Popen, ready: int) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([ready], [], [], 0.2)
        if readable:
            return os.read(ready, 1) == b"r"
        if process.poll() is not None:
            return False
    return False


def _stop(children) -> None:
    for process, ready, control in children:
        for fd in (ready, control):
            os.close(fd)
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 10
    for process, _ready, _control in children:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- in a worker ---------------------------------------------------------------------------

class Worker(NamedTuple):
    """What a supervisor hands one worker: its index and the descriptors it inherits."""

    index: int
    listen_fd: int  # the REST socket every worker accepts on
    ready_fd: int  # written once the worker serves
    control_fd: int  # closed by the supervisor to stop the worker


def parse_worker(value: str) -> Worker:
    """An argparse ``type`` for the hidden ``--worker index,listen,ready,control`` its supervisor passes."""
    import argparse

    parts = value.split(",")
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected index,listen,ready,control (four integers, which a --workers "
                                         f"supervisor passes its workers; start the server with --workers N "
                                         f"instead), found {value!r}")
    return Worker(*(int(part) for part in parts))


def adopt(server, listen_fd: int) -> None:
    """Make ``server`` (a socketserver built with ``bind_and_activate=False``) serve the supervisor's socket."""
    server.socket.close()
    server.socket = socket.socket(fileno=listen_fd)
    server.server_address = server.socket.getsockname()


def serve_as_worker(server, ready_fd: int, control_fd: int) -> None:
    """Tell the supervisor this worker has loaded, wait for its go, then accept until stopped."""
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    if os.read(control_fd, 1) != b"g":  # the supervisor stopped before the go
        return

    def orphaned() -> None:  # the supervisor's end of the control pipe closes when it exits, however it exits
        os.read(control_fd, 1)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    while True:
        # a blocking accept, not select: the kernel wakes the longest-waiting worker, so workers take turns
        request, address = server.socket.accept()
        server.process_request(request, address)
