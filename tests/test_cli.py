"""The command line as a user meets it: help, flags, and one clear line per error."""

import socket
import subprocess
import sys

from tests.conftest import ROOT, run_cli


def assert_one_line_error(result, exit_code: int, pattern: str) -> None:
    import re

    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("crossport: error:")]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_every_flag_without_importing_frameworks():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--stage", "--run-dir", "--dataset", "--data-dir", "--epochs", "--seed", "--models-dir",
                 "--name", "--tracking-uri", "--no-tracking", "--debug"):
        assert flag in result.stdout
    for stage in ("data", "train", "export", "translate", "package", "tflite", "validate", "publish"):
        assert stage in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pipelines.run import build_parser; build_parser(); "
         "print(sorted(m for m in ('torch', 'tensorflow', 'mlflow', 'onnxruntime') if m in sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"


def test_unknown_stage_and_dataset_are_rejected_by_the_parser():
    result = run_cli("--stage", "deploy")
    assert result.returncode == 2 and "invalid choice: 'deploy'" in result.stderr
    result = run_cli("--dataset", "cifar10")
    assert result.returncode == 2 and "invalid choice: 'cifar10'" in result.stderr


def test_single_stage_without_a_run_directory_says_what_to_do(tmp_path):
    result = run_cli("--stage", "train", "--run-dir", str(tmp_path / "nothing"))
    assert_one_line_error(result, 1, r"is not a crossport run directory: no manifest.json\. Run --stage all first")


def test_path_traversal_in_model_name_is_refused(tmp_path):
    result = run_cli("--name", "../escape", "--run-dir", str(tmp_path / "run"), "--no-tracking")
    assert_one_line_error(result, 2, r"model name '\.\./escape' is not allowed")
    assert not (tmp_path / "run").exists()


def test_contradictory_and_invalid_flags_are_refused(tmp_path):
    result = run_cli("--no-tracking", "--tracking-uri", "sqlite:///x.db", "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, 2, r"--no-tracking and --tracking-uri contradict each other")
    result = run_cli("--epochs", "0", "--run-dir", str(tmp_path / "r"), "--no-tracking")
    assert_one_line_error(result, 2, r"--epochs must be at least 1, found 0")


def test_unreachable_tracking_server_fails_before_any_work(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_cli("--dataset", "digits", "--run-dir", str(tmp_path / "run"),
                     "--tracking-uri", f"http://127.0.0.1:{port}")
    assert_one_line_error(result, 1, rf"MLflow tracking server http://127.0.0.1:{port} is unreachable.*--no-tracking")
    assert not (tmp_path / "run").exists()
