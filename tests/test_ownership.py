"""Nothing the user owns is deleted or overwritten without being asked."""

import subprocess
import sys

import pytest

from crossport.files import sha256_path
from tests.helpers import ROOT, call


def serverless(version, out, *extra):
    return subprocess.run([sys.executable, "-m", "pipelines.serverless", str(version), "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def user_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "sub").mkdir(exist_ok=True)
    (directory / "sub" / "data.bin").write_bytes(b"\0\1\2")
    return sha256_path(directory)


def test_serverless_out_with_the_users_files_is_refused_unless_forced(pipeline_run, tmp_path):
    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    out = tmp_path / "mine"
    before = user_files(out)
    result = serverless(version, out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"crossport: error: --out {out} (or mine.zip) already holds files this command did not write; it would "
        "replace them. Pass a new or empty --out, or add --force to replace them."]
    assert sha256_path(out) == before and not (tmp_path / "mine.zip").exists()
    forced = serverless(version, out, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert not (out / "notes.txt").exists() and (out / "handler.py").is_file()


def test_serverless_rebuilds_its_own_package_in_place(pipeline_run, tmp_path):
    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    out = tmp_path / "lambda"
    assert serverless(version, out).returncode == 0
    again = serverless(version, out, "--variant", "int8_full")
    assert again.returncode == 0, again.stderr[-2000:]
    assert '"variant": "int8_full"' in (out / "servable.json").read_text()
    assert not list(tmp_path.glob(".lambda.partial-*"))


@pytest.mark.parametrize("where", ["version", "model", "inside"])
def test_serverless_never_writes_into_the_model_repository_even_forced(pipeline_run, tmp_path, where):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(pipeline_run.models_dir, models)
    before = sha256_path(models)
    out = {"version": models / "emnist_mlp" / "1", "model": models / "emnist_mlp",
           "inside": models / "emnist_mlp" / "1" / "assets.extra" / "pkg"}[where]
    result = serverless(models / "emnist_mlp" / "1", out, "--force")
    assert result.returncode == 1
    assert "is inside the model repository" in result.stderr and "never replaced" in result.stderr
    assert sha256_path(models) == before


def test_a_run_dir_that_is_not_a_crossport_run_is_left_alone(tmp_path, capsys):
    from pipelines.run import main

    run = tmp_path / "project"
    before = user_files(run)
    (run / "saved_model").mkdir()
    (run / "saved_model" / "keep.txt").write_text("the user's own SavedModel notes")
    before = sha256_path(run)
    result = call(main, "--stage", "all", "--dataset", "digits", "--epochs", "1", "--run-dir", str(run),
                  "--models-dir", str(tmp_path / "models"), "--no-tracking", capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"crossport: error: --run-dir {run} is not empty and is not a crossport run (no manifest.json): the pipeline "
        "would write over its files. Pass a new or empty --run-dir, or the directory of an earlier run to resume it."]
    assert sha256_path(run) == before and not (tmp_path / "models").exists()
