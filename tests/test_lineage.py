"""The lineage command, and the defined order: publish first, then register."""

import json
import shutil

import pytest

from tests.helpers import call, free_port, pipeline_here


@pytest.fixture
def lineage(capfd):
    """``python -m pipelines.lineage ARGS``, in this process (it only reads)."""
    from pipelines.tools.lineage import main

    return lambda *args: call(main, *map(str, args), capsys=capfd)


def test_lineage_traces_the_servable_back_to_the_data(pipeline_run, lineage):
    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    result = lineage(str(version), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["verified"] and not report["problems"]
    assert [link["name"] for link in report["chain"]] == ["saved_model", "tf_graph", "onnx", "checkpoint", "dataset"]
    chain = {link["name"]: link for link in report["chain"]}
    assert chain["onnx"]["parents"] == {"checkpoint": chain["checkpoint"]["sha256"]}
    assert chain["saved_model"]["parents"]["tf_graph"] == chain["tf_graph"]["sha256"]
    run_manifest = json.loads((pipeline_run.run_dir / "manifest.json").read_text())
    assert report["dataset"]["digest"] == run_manifest["facts"]["dataset"]["digest"]
    assert report["provenance"]["code"]["commit"] == run_manifest["facts"]["provenance"]["code"]["commit"]
    assert set(report["mlflow"]["runs"]) >= {"pipeline", "data", "train", "export", "validate", "publish"}
    assert report["registry"]["status"] == "registered" and "validated" in report["registry"]["aliases"]
    text = lineage(str(version))
    assert "verified: every hash matches" in text.stdout and "code commit" in text.stdout
    assert f"parity report {version / 'assets.extra' / 'parity.html'}" in text.stdout


def test_lineage_by_registry_version(pipeline_run, lineage):
    registry = json.loads((pipeline_run.run_dir / "manifest.json").read_text())["facts"]["registry"]
    result = lineage("--name", "emnist_mlp", "--registry-version", str(registry["version"]),
                     "--tracking-uri", pipeline_run.tracking_uri, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["servable"] == str((pipeline_run.models_dir / "emnist_mlp" / "1").resolve())
    missing = lineage("--name", "emnist_mlp", "--registry-version", "999", "--tracking-uri", pipeline_run.tracking_uri)
    assert missing.returncode == 1 and "has no version 999" in missing.stderr


def test_lineage_says_which_artifact_changed(pipeline_run, tmp_path, lineage):
    copy = tmp_path / "emnist_mlp" / "1"
    shutil.copytree(pipeline_run.models_dir / "emnist_mlp" / "1", copy)
    (copy / "assets.extra" / "model_int8_full.tflite").write_bytes(b"tampered")
    result = lineage(str(copy), "--tracking-uri", pipeline_run.tracking_uri)
    assert result.returncode == 1
    assert "CHANGED assets.extra/model_int8_full.tflite" in result.stdout
    assert "PROBLEM: tflite_int8_full (assets.extra/model_int8_full.tflite) changed" in result.stdout


def test_publish_then_register_a_failed_registration_is_flagged_and_repaired(pipeline_run, tmp_path, lineage, capfd):
    """Order: publish (atomic, on disk) first, then register. If registering fails, the
    version stays published, lineage flags it, and re-running the register step repairs it."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run)
    models = tmp_path / "models"
    uri = pipeline_run.tracking_uri
    published = pipeline_here("--stage", "publish", "--run-dir", str(run), "--models-dir", str(models),
                        "--tracking-uri", uri, capsys=capfd)
    assert published.returncode == 0, published.stderr[-2000:]
    version = models / "emnist_mlp" / "1"

    flagged = lineage(str(version))
    assert flagged.returncode == 1
    assert "published but not registered" in flagged.stdout
    assert f"--stage register --run-dir {run.resolve()}" in flagged.stdout or f"--run-dir {run}" in flagged.stdout

    dead = f"http://127.0.0.1:{free_port()}"
    failed = pipeline_here("--stage", "register", "--run-dir", str(run), "--tracking-uri", dead, capsys=capfd)
    assert failed.returncode == 1 and "is unreachable" in failed.stderr
    assert lineage(str(version)).returncode == 1  # still flagged, still published
    assert (version / "saved_model.pb").is_file()

    repaired = pipeline_here("--stage", "register", "--run-dir", str(run), "--tracking-uri", uri, capsys=capfd)
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    report = json.loads(lineage(str(version), "--json").stdout)
    assert report["verified"] and report["registry"]["status"] == "registered"
    again = pipeline_here("--stage", "register", "--run-dir", str(run), "--tracking-uri", uri, capsys=capfd)
    assert again.returncode == 0
    assert json.loads(lineage(str(version), "--json").stdout)["registry"]["version"] == report["registry"]["version"]


def test_a_missing_version_directory_gets_one_line_not_a_traceback(tmp_path, capfd):
    from pipelines.tools.lineage import main

    result = call(main, str(tmp_path / "no" / "such" / "dir"), capsys=capfd)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"crossport: error: {tmp_path / 'no' / 'such' / 'dir'} is not a published crossport version: "
        "no assets.extra/manifest.json. Pass a directory like models/emnist_mlp/1."]
