"""``python -m pipelines.serve``: a model repository behind TF Serving's REST and gRPC APIs, plus an upload page.

    python -m pipelines.serve models                  # every model in the repository, each its newest version
    python -m pipelines.serve models/emnist_mlp [--version N] [--backend saved_model|onnx|tflite_fp32|...]
    python -m pipelines.serve --model-config-file models/models.config   # TF Serving's ModelServerConfig
          [--file-system-poll-wait-seconds 1] [--host 127.0.0.1] [--port 8501] [--grpc-port 8500]
          [--threads N] [--workers N]

Routes: ``/v1/models/<name>[/versions/<N>|/labels/<label>]`` ``:predict``, ``:classify``, ``/metadata``
and the status route (as TF Serving answers them), ``GET /`` (drop a PNG, see the top 3 labels and the image the
model sees; the first model's newest version) and ``POST /v1/upload`` (a PNG body). With ``--grpc-port`` the same
versions also answer TF Serving's gRPC ``PredictionService`` and ``ModelService`` (:mod:`serving.grpc_service`).
Every base path is polled for new versions (:mod:`serving.repository`). ``--workers N`` runs N such processes
behind the same ports (:mod:`serving.workers`), each polling. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from crossport.cli import PORT, integer, summary_line
from crossport.errors import ConfigError, CrossportError, report
from crossport.formats import SERVED

log = logging.getLogger("crossport.serve")

BACKENDS = SERVED
MAX_REST_BYTES = 8 * 1024 * 1024  # ~2,000 images per predict call as JSON
MAX_UPLOAD_BYTES = 1024 * 1024
MAX_DRAIN_BYTES = 64 * 1024 * 1024
PAGE = Path(__file__).with_name("upload.html")


def pick_version(model_dir: Path, version: int | None) -> tuple[int, Path]:
    from export.publish import versions

    available = versions(model_dir)
    if not available:
        raise ConfigError(f"{model_dir} has no published versions (integer directories).",
                          hint="Pass <models-dir>/<name>, e.g. models/emnist_mlp, after a run has published.")
    chosen = available[-1] if version is None else version
    if chosen not in available:
        raise ConfigError(f"{model_dir} has no version {chosen}: found {available}.", hint="Pick one with --version.")
    return chosen, model_dir / str(chosen)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container or taskset limits it)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def open_repository(path: Path | None, version: int | None, backend: str, *, config_file: Path | None = None,
                    serving_root: str = "/models", config_poll: int = 0, threads: int | None = None, instances: int = 1,
                    allow_changed: bool = False, load: bool = True, who: str = ""):
    """The repository a command line names, polled once: every model has a version AVAILABLE, or this raises why
    not (the newest refusal, in one line). ``load`` False checks each version without loading it (a ``--workers``
    supervisor, which serves nothing itself)."""
    from serving.repository import Repository, config_reader, sources_at

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}.")
    if config_file is not None:
        if path is not None or version is not None:
            raise ConfigError("--model-config-file names the models, their versions and labels; a model path or "
                              "--version was given as well.", hint="Pass one or the other.")
        discover = config_reader(config_file, serving_root, config_poll)
    elif path is None:
        raise ConfigError("no models to serve: expected a model repository, a model's directory or a version "
                          "directory, or --model-config-file.", hint="e.g. python -m pipelines.serve models")
    else:
        discover = sources_at(Path(path), version)
    repository = Repository(discover, servable_loader(backend, threads, instances) if load else None,
                            allow_changed=allow_changed, who=who)
    repository.poll()
    error = repository.first_error()
    if error is not None:
        raise error
    return repository


def servable_loader(backend: str, threads: int | None = None, instances: int = 1):
    """``load(name, number, directory)``: one checked version loaded in ``backend``, behind TF Serving's REST
    semantics (:class:`serving.rest.Servable`)."""
    from serving.rest import Servable, load_backend

    def load(name: str, number: int, directory: Path):
        return Servable(name, number, directory, load_backend(directory, backend, threads or available_cores(),
                                                               instances))

    return load


def make_server(repository, host: str, port: int, *, worker: int | None = None) -> RestServer:
    """The REST server; a ``worker`` (its index under ``--workers``) is left unbound for the supervisor's socket."""
    handler = type("Handler", (RequestHandler,), {"repository": repository, "worker": worker})
    return RestServer((host, port), handler, bind_and_activate=worker is None)


class RestServer(ThreadingHTTPServer):
    """A thread per connection, and a listen backlog as deep as the system allows (``socket.SOMAXCONN``): a burst
    of new connections waits to be accepted; socketserver's default backlog of 5 reset them."""

    request_queue_size = socket.SOMAXCONN
    daemon_threads = True


class RequestHandler(BaseHTTPRequestHandler):
    repository = None  # set per server
    worker = None  # the worker's index under --workers, named in each request's log line
    server_version = "crossport-serve"
    # keep-alive, as TF Serving's REST server: a client's next request reuses its connection (and this thread);
    # every answer has a Content-Length, and a request whose body length is unknown closes the connection
    protocol_version = "HTTP/1.1"
    # headers and body go out as two writes: without TCP_NODELAY the body waits for the client's delayed ACK
    # (40 ms per request on a kept-alive connection)
    disable_nagle_algorithm = True
    timeout = 30  # seconds a client may take to send its request (or an idle connection stays): no hanging

    def log_message(self, format: str, *args) -> None:
        log.info("%s%s %s", f"worker {self.worker}: " if self.worker else "", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            return
        self._rest("GET", None)

    def do_POST(self) -> None:
        limit = MAX_UPLOAD_BYTES if self.path == "/v1/upload" else MAX_REST_BYTES
        body = self._read_body(limit)
        if body is None:
            return
        if self.path == "/v1/upload":
            self._upload(body)
        else:
            self._rest("POST", body)

    def _read_body(self, limit: int) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            self.close_connection = True  # where its body ends is unknown: the next request cannot be found
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
            return None
        if int(length) > limit:
            # Read (and drop) a moderately oversized body so the client, still sending, gets
            # the 413 instead of a broken pipe; past MAX_DRAIN_BYTES just hang up.
            remaining = int(length) if int(length) <= MAX_DRAIN_BYTES else 0
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
            self.close_connection = True
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"request body of {length} bytes is over the limit of {limit} bytes"})
            return None
        return self.rfile.read(int(length))

    def _rest(self, method: str, body: bytes | None) -> None:
        from serving.rest import RestError, handle

        try:
            status, payload = handle(self.repository, method, self.path, body)
        except RestError as error:
            status, payload = error.status, {"error": str(error)}
        except Exception:  # a bug must answer 500 with a message, never hang the client
            log.exception("request failed")
            status, payload = 500, {"error": "internal error; see the server log"}
        self._json(status, payload)

    def _upload(self, body: bytes) -> None:
        from serving.repository import ServingError
        from serving.serverless_handler import BadInput

        try:
            with self.repository.acquire(self.repository.names[0]) as servable:
                answer = _uploaded(servable, body)
        except ServingError as error:
            self._json(404, {"error": str(error)})
        except BadInput as error:
            self._json(400, {"error": str(error)})
        else:
            self._json(200, answer)

    def _json(self, status: int, payload: dict) -> None:
        self._send(int(status), encode_json(payload), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _uploaded(servable, body: bytes) -> dict:
    """The top 3 labels of an uploaded image, with the image the model sees (``BadInput``: not an image)."""
    from serving.serverless_handler import image_to_pixels, resized_image, to_model_input, top_k

    image = servable.backend.image
    upright = image_to_pixels(body) if image.flat else resized_image(body, *image.shape)
    row = to_model_input(upright) if image.flat else upright
    scores = np.asarray(servable.backend.predict(row[np.newaxis]))[0]
    # what the model sees: for a 28×28 model EMNIST orientation (transposed); any other, the resized image
    seen = row.reshape(28, 28) if image.flat else upright
    return {"predictions": top_k(scores, servable.labels), "model_input_png": _png_data_url(seen),
            "upright_png": _png_data_url(upright), "backend": servable.backend.kind, "version": servable.version}


def encode_json(payload: dict) -> bytes:
    """orjson where installed (12x json's speed on a batch of scores): the same numbers, each float written as the
    shortest decimal that reads back as the same float64, as json writes it; only the spacing differs. NumPy arrays
    (the scores) are written as nested lists, by orjson without a Python float per element."""
    try:
        import orjson
    except ImportError:
        return json.dumps(payload, default=lambda value: value.tolist()).encode()
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def _png_data_url(pixels: np.ndarray, scale: int = 8) -> str:
    from PIL import Image

    levels = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(levels[:, :, 0] if levels.ndim == 3 and levels.shape[2] == 1 else levels)
    image = image.resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def build_parser() -> argparse.ArgumentParser:
    from serving.workers import parse_worker

    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("model_dir", type=Path, nargs="?",
                        help="a model repository (every model in it), e.g. models; one model's directory, e.g. "
                             "models/emnist_mlp; or one version directory, e.g. models/emnist_mlp/1")
    parser.add_argument("--version", type=integer(1),
                        help="with one model's directory: serve this version only (default: the newest, and each "
                             "newer one published while serving)")
    parser.add_argument("--model-config-file", "--model_config_file", type=Path,
                        help="TF Serving's ModelServerConfig (e.g. the models/models.config a publish writes): "
                             "each model's base_path, model_version_policy (latest N, specific, all) and "
                             "version_labels, instead of a path")
    parser.add_argument("--model-config-file-poll-wait-seconds", "--model_config_file_poll_wait_seconds",
                        type=integer(0), default=0,
                        help="re-read --model-config-file this often when it changed, TF Serving's flag and default "
                             "(default: 0, never; crossport's publish moves the 'validated' label in it)")
    parser.add_argument("--serving-root", default="/models",
                        help="base paths under this folder in --model-config-file are read from the config's own "
                             "folder, as TF Serving's container mounts the repository there (default: /models)")
    parser.add_argument("--file-system-poll-wait-seconds", "--file_system_poll_wait_seconds", type=integer(0),
                        default=1, help="seconds between polls of every base path for new versions, TF Serving's "
                                        "flag and default (default: 1; 0: only at start)")
    parser.add_argument("--backend", default="saved_model", choices=BACKENDS, help="runtime (default: saved_model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=PORT, default=8501, help="port (default: 8501, TF Serving's REST port)")
    parser.add_argument("--grpc-port", type=PORT, help="also serve TF Serving's gRPC API on this port (TF Serving's "
                                                       "is 8500; default: no gRPC)")
    parser.add_argument("--threads", type=integer(1), help="runtime threads (default: the cores available)")
    parser.add_argument("--instances", type=integer(1),
                        help="TFLite backends: interpreters answering at once, each with --threads threads "
                             "(default: 1, or with --workers the cores divided by --threads, so a worker holding "
                             "more than its share of connections still uses every core; e.g. --instances 2 "
                             "--threads 1 trades batch-1 latency for throughput under concurrent load)")
    parser.add_argument("--workers", type=integer(1), default=1,
                        help="server processes sharing the ports, each loading the version (default: 1; one "
                             "process parses JSON on one core: --workers 2 on two cores about doubles REST "
                             "throughput). Runtime threads default to the cores available divided by the workers")
    parser.add_argument("--worker", type=parse_worker, help=argparse.SUPPRESS)  # set by the --workers supervisor
    parser.add_argument("--allow-changed", action="store_true",
                        help="serve a version whose files no longer match its manifest (logs a warning)")
    parser.add_argument("--log-file", type=Path,
                        help="where TensorFlow's, LiteRT's and gRPC's own output goes (default: "
                             "crossport-serve-<pid>.log in the system's temporary folder)")
    parser.add_argument("--debug", action="store_true", help="leave the libraries' output on the console")
    return parser


def main(argv: list[str] | None = None) -> int:
    from crossport.console import command_log, quiet_console, run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    log_file = args.log_file or command_log("serve")

    def body() -> int:
        try:
            if not args.debug:  # with --debug nothing goes there: no file is made
                log_file.open("ab").close()
        except OSError as error:
            raise ConfigError(f"--log-file {log_file} cannot be written ({error.strerror or error}).",
                              hint="Pass a --log-file in a folder you can write to.") from None
        with quiet_console(log_file, args.debug):
            if not args.debug and not args.worker:
                log.info("library output in %s", log_file)
            if args.workers > 1 and not args.worker:
                return _supervise(args, argv, None if args.debug else log_file)
            return _serve(args)

    return run_command(body, debug=args.debug)


def _supervise(args: argparse.Namespace, argv: list[str], log_file: Path | None) -> int:
    from serving.workers import free_grpc_port, listening_socket, supervise

    port, grpc_port = args.port, None
    try:  # every version checked (not loaded) before a worker starts: a bad path fails here, in one line
        repository = open_repository(args.model_dir, args.version, args.backend, config_file=args.model_config_file,
                                     serving_root=args.serving_root, allow_changed=args.allow_changed, load=False)
        sock = listening_socket(args.host, port)
        if args.grpc_port is not None:
            port = args.grpc_port
            grpc_port = free_grpc_port(args.host, port)
    except CrossportError as error:
        return report(error)
    except (OSError, OverflowError) as error:
        return _cannot_listen(args.host, port, error)
    host, rest_port = sock.getsockname()[:2]
    ready = banner(repository, args.backend, host, rest_port, args.host, grpc_port)
    threads = args.threads or max(1, available_cores() // args.workers)
    # gRPC connections stay on the worker the kernel gave them: one holding more than its share runs them at once
    instances = args.instances or max(1, available_cores() // threads)
    return supervise(argv, args.workers, sock, threads, instances, grpc_port, str(log_file) if log_file else None,
                     ready)


def _cannot_listen(host: str, port: int, error: Exception) -> int:
    reason = getattr(error, "strerror", None) or error
    sys.stderr.write(f"crossport: error: cannot listen on {host}:{port}: {reason}.\n")
    return 1


def banner(repository, backend: str, host: str, port: int, grpc_host: str, grpc_port: int | None) -> list[str]:
    """What the console says once the server listens: each model, the versions it serves, where."""
    lines = []
    for name in repository.names:
        served = repository.served(name)
        lines.append(f"serving {name} version{'s' if len(served) > 1 else ''} {', '.join(map(str, served))} "
                     f"({backend}) on http://{host}:{port}/  (REST: /v1/models/{name}:predict)")
    if grpc_port is not None:
        lines.append(f"gRPC (TF Serving's PredictionService and ModelService) on {grpc_host}:{grpc_port}")
    return lines


def _serve(args: argparse.Namespace) -> int:
    from serving.workers import adopt, serve_as_worker

    grpc_server, port = None, args.port
    worker = args.worker
    try:
        repository = open_repository(args.model_dir, args.version, args.backend, config_file=args.model_config_file,
                                     serving_root=args.serving_root,
                                     config_poll=args.model_config_file_poll_wait_seconds, threads=args.threads,
                                     instances=args.instances or 1, allow_changed=args.allow_changed,
                                     who=f"worker {worker.index}: " if worker else "")
        server = make_server(repository, args.host, port, worker=worker.index if worker else None)
        if worker:
            adopt(server, worker.listen_fd)
        if args.grpc_port is not None:
            from serving.grpc_service import make_grpc_server

            port = args.grpc_port
            grpc_server = make_grpc_server(repository, args.host, port, reuse_port=worker is not None)
    except CrossportError as error:
        return report(error)
    except (OSError, OverflowError, RuntimeError) as error:  # grpc raises RuntimeError for a port in use
        return _cannot_listen(args.host, port, error)
    if grpc_server is not None:
        grpc_server.start()
    repository.start(args.file_system_poll_wait_seconds)
    if not worker:  # a worker's supervisor says it, once
        host, port = server.server_address[:2]
        for line in banner(repository, args.backend, host, port, args.host,
                           grpc_server.crossport_port if grpc_server is not None else None):
            log.info("%s", line)
    try:
        if worker:
            serve_as_worker(server, worker.ready_fd, worker.control_fd)
        else:
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        repository.stop()
        server.server_close()
        if grpc_server is not None:
            grpc_server.stop(grace=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
