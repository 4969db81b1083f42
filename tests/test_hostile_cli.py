"""Hostile command lines, run directories, manifests, model repositories and output folders.

Each case: one line (``crossport: error: ...`` or argparse's ``error:``), the documented exit
code, no traceback, and nothing published or owned changed (hashed before and after)."""

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import onnx
import pytest

from crossport.files import sha256_path
from tests.helpers import ROOT, call, one_line_error, pipeline_here, run_cli, run_module, users_folder, wait_until


@pytest.fixture
def world(pipeline_run, tmp_path, capfd):
    """A copy of a finished run, a copy of its model repository, and their hashes to compare at the end."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run)
    models = tmp_path / "models"
    shutil.copytree(pipeline_run.models_dir, models)

    class World:
        def __init__(self):
            self.run, self.models, self.tmp = run, models, tmp_path
            self.version = models / "emnist_mlp" / "1"
            self.watched = {}  # path → sha256 when watching began

        def watch(self, path):
            self.watched[path] = sha256_path(path) if path.exists() else None

        def unwatch(self, path):
            """For cases that edit a published version on purpose, as an attacker or an accident would."""
            del self.watched[path]

        def cli(self, *args, models_dir=None):
            """The command line, in this process."""
            return pipeline_here(*args, "--models-dir", str(models_dir or models), "--no-tracking", capsys=capfd)

    world = World()
    world.watch(models)
    yield world
    for path, before in world.watched.items():
        assert (sha256_path(path) if path.exists() else None) == before, f"{path} changed"


def test_serve_on_an_address_it_cannot_bind(world):
    result = run_module("pipelines.serve", str(world.models / "emnist_mlp"), "--host", "no-such-host.invalid")
    one_line_error(result, 1, "cannot listen on no-such-host.invalid:8501")


# --- run directories -----------------------------------------------------------------------------

def test_a_second_writer_on_one_run_directory_is_refused_naming_the_holder(world):
    import fcntl

    world.watch(world.run)
    lock = world.run / ".lock"
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running pipeline holds it
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": 4242, "host": "build-7", "since": "2026-11-25T10:00:00+00:00",
                                 "command": "pipelines/run.py --stage all"}))
        handle.flush()
        before = sha256_path(world.run)
        result = world.cli("--stage", "validate", "--run-dir", str(world.run))
        one_line_error(result, 1, f"run directory {world.run} is in use by another crossport process",
                 "pid 4242 on build-7 since 2026-11-25T10:00:00+00:00")
        assert sha256_path(world.run) == before
    world.unwatch(world.run)


def test_two_concurrent_runs_into_one_run_directory(world):
    """The outside pass's case: the second dies with one line, the first finishes."""
    run = world.tmp / "shared"
    common = ("--stage", "all", "--dataset", "digits", "--epochs", "1", "--run-dir", str(run), "--models-dir",
              str(world.tmp / "m"), "--no-tracking")
    first = subprocess.Popen([sys.executable, "-m", "pipelines.run", *common], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until((run / "manifest.json").is_file, "the first run's manifest", process=first)
        second = run_cli(*common)
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    one_line_error(second, 1, "is in use by another crossport process", f"pid {first.pid}")


# --- tracking --------------------------------------------------------------------------------------

class _Unhealthy(BaseHTTPRequestHandler):
    """/health says OK; the API answers 503, as a server whose database is down does."""

    def do_GET(self):
        self._answer(200 if self.path == "/health" else 503)

    def do_POST(self):
        self._answer(503)

    def _answer(self, status):
        body = b"OK" if status == 200 else b'{"error_code": "TEMPORARILY_UNAVAILABLE"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_that_answers_health_but_not_its_api_fails_fast(world):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unhealthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        result = run_cli("--stage", "all", "--dataset", "digits", "--epochs", "1", "--run-dir",
                         str(world.tmp / "new"), "--models-dir", str(world.models), "--tracking-uri", uri,
                         timeout=120)  # MLflow's default retries would take about 4 minutes
    finally:
        server.shutdown()
    one_line_error(result, 1, f"MLflow tracking server {uri} answers /health but its API fails (HTTP 503")
    assert not (world.tmp / "new").exists()


# --- models from elsewhere -------------------------------------------------------------------------

def test_onnx_declaring_an_opset_from_the_future(world):
    from crossport.files import sha256_file
    from pipelines.manifest import Manifest

    model = onnx.load(str(world.run / "model.onnx"))
    model.opset_import[0].version = 99
    onnx.save(model, str(world.run / "model.onnx"))
    manifest = Manifest.load(world.run)
    manifest.record("onnx", world.run / "model.onnx", "export", parents=("checkpoint",))
    assert manifest.artifacts["onnx"].sha256 == sha256_file(world.run / "model.onnx")
    one_line_error(world.cli("--stage", "translate", "--run-dir", str(world.run)), 1, "model.onnx", "opset")


# --- published versions ----------------------------------------------------------------------------

@pytest.fixture
def lineage(capfd):
    """``python -m pipelines.lineage VERSION``, in this process (it only reads)."""
    from pipelines.tools.lineage import main

    return lambda version: call(main, str(version), capsys=capfd)


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda text: text[:100], "is unreadable or not a version manifest"),
    (lambda text: json.dumps({**json.loads(text), "artifacts": "x"}), "'artifacts' is not a list"),
    (lambda text: json.dumps({key: v for key, v in json.loads(text).items() if key != "version"}), "KeyError"),
])
def test_lineage_on_a_broken_version_manifest(world, edit, fragment, lineage):
    path = world.version / "assets.extra" / "manifest.json"
    path.write_text(edit(path.read_text()))
    world.unwatch(world.models)
    one_line_error(lineage(world.version), 1, fragment)


def test_lineage_flags_files_the_manifest_does_not_list(world, lineage):
    world.unwatch(world.models)
    (world.version / "assets.extra" / "notes.txt").write_text("added after publishing")
    result = lineage(world.version)
    assert result.returncode == 1 and "PROBLEM: assets.extra/notes.txt is not listed in the version's manifest" \
        in result.stdout


def test_lineage_flags_a_link_leading_out_of_the_version(world, lineage):
    world.unwatch(world.models)
    (world.version / "assets.extra" / "outside").symlink_to("/etc")
    result = lineage(world.version)
    assert result.returncode == 1 and "assets.extra/outside is a link leading outside the version" in result.stdout


def test_lineage_flags_a_manifest_path_leading_out(world, lineage):
    world.unwatch(world.models)
    path = world.version / "assets.extra" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["artifacts"].append({"name": "passwd", "path": "../../../../../../etc/passwd", "sha256": "0" * 64})
    path.write_text(json.dumps(manifest))
    result = lineage(world.version)
    assert result.returncode == 1 and "passwd (../../../../../../etc/passwd) leads outside the version" \
        in result.stdout


def test_serve_refuses_a_version_whose_files_changed(world):
    world.unwatch(world.models)
    (world.version / "assets.extra" / "model.onnx").write_bytes(b"swapped")
    result = run_module("pipelines.serve", str(world.models / "emnist_mlp"), "--backend", "onnx", "--port", "0")
    one_line_error(result, 1, "no longer matches its manifest", "onnx (assets.extra/model.onnx) changed",
                   "--allow-changed")


def test_serve_with_allow_changed_serves_and_warns(world):
    from tests.helpers import Server

    world.unwatch(world.models)
    (world.version / "assets.extra" / "labels.txt").write_text("\n".join("ABCDEFGHIJ") + "\n")
    server = Server(world.models / "emnist_mlp", "saved_model", "--allow-changed")
    try:
        assert server.post("/v1/models/emnist_mlp:predict", {"instances": [[0.0] * 784]})[0] == 200
    finally:
        server.stop()
    assert "no longer matches its manifest" in server.output()


@pytest.mark.parametrize(("backend", "edit", "fragments"), [
    ("saved_model", lambda version: (version / "assets.extra" / "labels.txt").write_text(
        "\n".join("ABCDEFGHI") + "\n"), ["labels.txt lists 9 labels; the model outputs 10 classes; this version "
                                        "cannot be served"]),
    ("tflite_fp32", lambda version: (version / "assets.extra" / "model_fp32.tflite").write_bytes(
        (version / "assets.extra" / "model_fp32.tflite").read_bytes()[:1000]), ["tflite_fp32 cannot load",
                                                                                "model_fp32.tflite"]),
], ids=["labels-cut-to-9", "truncated-tflite"])
def test_serve_with_allow_changed_refuses_at_start_what_cannot_be_served(world, backend, edit, fragments):
    world.unwatch(world.models)
    edit(world.version)
    result = run_module("pipelines.serve", str(world.models / "emnist_mlp"), "--backend", backend, "--port", "0",
                        "--allow-changed")
    one_line_error(result, 1, *fragments)


# --- model repositories and output folders the user owns -------------------------------------------

@pytest.mark.parametrize(("setup", "fragment"), [
    (lambda models: users_folder(models), "holds a file 'thesis.tex' that is not a crossport model"),
    (lambda models: (models.mkdir(), (models / "models.config").write_text("model_config_list {}\n"),
                     users_folder(models / "resnet" / "1")),
     "holds a models.config that crossport did not write"),
    (lambda models: users_folder(models / "emnist_mlp" / "1"), "holds a model folder 'emnist_mlp' that is not"),
    (lambda models: users_folder(models / "photos"), "holds a folder 'photos' that is not a crossport model"),
])
def test_models_dir_that_is_not_a_crossport_repository(world, setup, fragment):
    models = world.tmp / "theirs"
    setup(models)
    world.watch(models)
    result = world.cli("--stage", "publish", "--run-dir", str(world.run), models_dir=models)
    one_line_error(result, 1, f"--models-dir {models} {fragment}", "Pass a new or empty --models-dir")


def test_models_dir_written_by_crossport_takes_the_next_version(world):
    world.unwatch(world.models)
    result = world.cli("--stage", "publish", "--run-dir", str(world.run),
                       "--republish")  # the same files as version 1: published again only when asked
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (world.models / "emnist_mlp").iterdir()) == ["1", "2"]
    assert (world.models / "models.config").read_text().startswith("# TF Serving ModelServerConfig")


def test_bench_out_holding_the_users_files(world):
    out = users_folder(world.tmp / "report")
    world.watch(out)
    one_line_error(run_module("pipelines.bench", str(world.version), "--quick", "--out", str(out), "--no-tracking"), 2,
             f"--out {out} holds files the benchmark did not write (thesis.tex)", "--force")


def test_bench_out_inside_the_model_repository(world):
    out = world.models / "emnist_mlp" / "bench"
    one_line_error(run_module("pipelines.bench", str(world.version), "--quick", "--out", str(out), "--no-tracking"), 2,
             "is inside the model repository")
    assert not out.exists()
