"""The bad-input corpus: each case gets one clear line, a non-zero exit code, and nothing
is written to the models directory."""

import pickle
import resource
import shutil
import socket
import subprocess
import sys

import onnx
import pytest
import torch

from pipelines.manifest import Manifest
from tests.helpers import ROOT, PicklePayload, make_emnist_archive, one_line_error, pipeline_here


@pytest.fixture
def case(pipeline_run, tmp_path, capfd, monkeypatch):
    """A copy of a finished run, an empty models directory, and a helper to swap artifacts."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run)
    models = tmp_path / "models"

    class Case:
        def __init__(self):
            self.run, self.models, self.tmp, self.capfd = run, models, tmp_path, capfd

        def replace(self, name: str, data: bytes, stage: str, parents=()):
            manifest = Manifest.load(run)
            path = run / manifest.artifacts[name].path
            path.write_bytes(data)
            manifest.record(name, path, stage, parents=parents)  # recorded as if a stage made it

        def cli(self, *args, env=None):
            """The command line, in this process."""
            return pipeline_here(*args, "--run-dir", str(run), "--models-dir", str(models), "--no-tracking",
                                 capsys=capfd, env=env, monkeypatch=monkeypatch)

    yield Case()
    assert not models.exists() or not any(models.rglob("saved_model.pb")), "nothing may be published"


def onnx_bytes(case, edit) -> bytes:
    model = onnx.load(str(case.run / "model.onnx"))
    edit(model)
    return model.SerializeToString()


# --- ONNX ------------------------------------------------------------------------------------

def test_missing_onnx(case):
    (case.run / "model.onnx").unlink()
    one_line_error(case.cli("--stage", "translate"), 1, "artifact 'onnx'", "missing on disk", "Re-run stage 'export'")


def test_truncated_onnx(case):
    case.replace("onnx", (case.run / "model.onnx").read_bytes()[:5000], "export", ("checkpoint",))
    one_line_error(case.cli("--stage", "translate"), 1, "does not pass onnx.checker", "Re-run the export stage")


def test_corrupt_onnx(case):
    case.replace("onnx", b"\x08\x07garbage" * 100, "export", ("checkpoint",))
    one_line_error(case.cli("--stage", "translate"), 1, "model.onnx")


def test_onnx_op_the_translator_cannot_handle(case):
    def edit(model):
        model.graph.node[1].op_type = "Swish"
        model.graph.node[1].domain = "com.example"
        model.opset_import.add(domain="com.example", version=1)

    case.replace("onnx", onnx_bytes(case, edit), "export", ("checkpoint",))
    result = case.cli("--stage", "translate")
    assert result.returncode == 1 and "Swish" in result.stderr and "Traceback" not in result.stderr


def test_onnx_breaking_the_input_shape(case):
    case.replace("onnx", onnx_bytes(case, lambda m: setattr(
        m.graph.input[0].type.tensor_type.shape.dim[1], "dim_value", 1024)), "export", ("checkpoint",))
    one_line_error(case.cli("--stage", "translate"), 1, "must be FLOAT[batch, 784]", "found FLOAT[None, 1024]")


def test_onnx_breaking_the_input_dtype(case):
    case.replace("onnx", onnx_bytes(case, lambda m: setattr(
        m.graph.input[0].type.tensor_type, "elem_type", onnx.TensorProto.DOUBLE)), "export", ("checkpoint",))
    one_line_error(case.cli("--stage", "translate"), 1, "found DOUBLE")


# --- checkpoints -----------------------------------------------------------------------------

def test_checkpoint_with_nan_weights(case):
    payload = torch.load(case.run / "model.pt", weights_only=True)
    payload["state_dict"]["layers.3.weight"][0, 0] = float("nan")
    torch.save(payload, case.tmp / "nan.pt")
    case.replace("checkpoint", (case.tmp / "nan.pt").read_bytes(), "train", ("dataset", "labels"))
    one_line_error(case.cli("--stage", "export"), 1, "non-finite values in 'layers.3.weight'")


def test_checkpoint_carrying_a_pickle_payload_is_never_executed(case):
    marker = case.tmp / "executed"
    case.replace("checkpoint", pickle.dumps({"format": "crossport-checkpoint", "x": PicklePayload(str(marker))},
                                            protocol=2), "train", ("dataset", "labels"))
    one_line_error(case.cli("--stage", "export"), 1, "could not be loaded safely")
    assert not marker.exists()


# --- datasets ------------------------------------------------------------------------------

@pytest.fixture
def fresh(tmp_path, capfd, monkeypatch):
    """A new run in this process with EMNIST downloads pointed at a file that is not there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CROSSPORT_EMNIST_URL", (tmp_path / "none.zip").as_uri())

    def cli(*args):
        return pipeline_here(*args, "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "new"),
                             "--models-dir", str(tmp_path / "models"), "--no-tracking", capsys=capfd)

    yield cli
    assert not (tmp_path / "models").exists(), "nothing may be published"


def test_missing_emnist_archive(fresh):
    one_line_error(fresh("--dataset", "emnist-letters"), 1, "EMNIST download from", "To use EMNIST")


def test_corrupt_emnist_archive(fresh, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gzip.zip").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    one_line_error(fresh("--dataset", "emnist-byclass"), 1, "corrupt or unreadable")


def test_wrong_format_emnist_archive(fresh, tmp_path):
    make_emnist_archive(tmp_path / "data" / "gzip.zip", split="digits", num_classes=10)
    one_line_error(fresh("--dataset", "emnist-balanced"), 1, "not NIST's EMNIST archive",
                   "gzip/emnist-balanced-train-images-idx3-ubyte.gz")


# --- the models directory --------------------------------------------------------------------

def test_unwritable_models_directory(case):
    blocker = case.tmp / "blocker"
    blocker.write_text("a file where a directory should be")
    result = pipeline_here("--stage", "publish", "--run-dir", str(case.run), "--models-dir", str(blocker / "models"),
                           "--no-tracking", capsys=case.capfd)
    one_line_error(result, 1, "cannot write to models directory", "Check its permissions")


def test_full_disk_while_publishing(case):
    """RLIMIT_FSIZE makes writes past 1 MB fail with EFBIG, as a full disk fails them with ENOSPC."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    result = subprocess.run([sys.executable, "-m", "pipelines.run", "--stage", "publish", "--run-dir", str(case.run),
                             "--models-dir", str(case.models), "--no-tracking"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, preexec_fn=limit)
    one_line_error(result, 1, "publishing under", "File too large", "Nothing was published")
    assert not list((case.models / "emnist_mlp").iterdir())  # staging removed too


# --- tracking, flags, run directories --------------------------------------------------------

def test_unreachable_tracking_server(case):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = pipeline_here("--stage", "publish", "--run-dir", str(case.run), "--models-dir", str(case.models),
                           "--tracking-uri", f"http://127.0.0.1:{port}", capsys=case.capfd)
    one_line_error(result, 1, "is unreachable", "--no-tracking")


def test_directory_that_is_not_a_run(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    result = pipeline_here("--stage", "validate", "--run-dir", str(tmp_path / "empty"), "--no-tracking", capsys=capfd)
    one_line_error(result, 1, "is not a crossport run directory")


def test_changed_artifact_is_refused_before_the_stage(case):
    (case.run / "model_fp16.tflite").write_bytes(b"edited by hand")
    one_line_error(case.cli("--stage", "validate"), 1, "artifact 'tflite_fp16'", "changed since stage 'tflite'")


