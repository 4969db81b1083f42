"""Nothing lost, nothing half-published: crashes, concurrent publishers, resume, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from crossport.files import sha256_path
from tests.helpers import ROOT, pipeline_here, run_cli, wait_until


def copy_run(pipeline_run, tmp_path, name="run") -> Path:
    run = tmp_path / name
    shutil.copytree(pipeline_run.run_dir, run)
    return run


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def complete_versions(base: Path) -> dict[int, str]:
    """Every integer directory must be a complete version whose files match its manifest."""
    from pipelines.tools.lineage import trace

    found = {}
    for child in sorted(base.iterdir()) if base.is_dir() else []:
        if not child.name.isdigit():
            assert child.name.startswith(".partial-"), child  # only hidden staging leftovers besides versions
            continue
        report = trace(child, None)  # what `python -m pipelines.lineage VERSION --json` reports
        assert not [f for f in report["files"] if not f["ok"]], f"version {child.name} is incomplete or changed"
        found[int(child.name)] = sha256_path(child)
    return found


# --- atomic publish, proven by SIGKILL -------------------------------------------------------

def stage_running(run: Path, stage: str, since: str) -> bool:
    """The runner's own marker: the manifest records the stage as running, started at or after ``since``."""
    try:
        record = json.loads((run / "manifest.json").read_text())["stages"].get(stage, {})
    except (OSError, ValueError, KeyError):
        return False  # between the runner's atomic writes
    return record.get("status") == "running" and record.get("started", "") >= since


def test_sigkill_during_package_and_publish_never_leaves_half_a_version(pipeline_run, tmp_path):
    run = copy_run(pipeline_run, tmp_path)
    models = tmp_path / "models"
    base = models / "emnist_mlp"
    first = run_cli("--stage", "publish", "--run-dir", str(run), "--models-dir", str(models), "--no-tracking")
    assert first.returncode == 0, first.stderr[-2000:]
    snapshot = complete_versions(base)
    rng = random.Random(7)
    kills = 0
    attempts = 20
    for attempt in range(attempts):
        stage = "package" if attempt % 2 else "publish"
        since = datetime.now(UTC).isoformat(timespec="seconds")
        process = start_cli("--stage", stage, "--run-dir", str(run), "--models-dir", str(models), "--no-tracking",
                            "--republish")  # the same files each time: publish them anyway, to be killed doing it
        # Kill on the stage's own markers, not after a guessed sleep: the manifest says the stage
        # is running, and for publish the staging directory exists. Both stages then still import
        # TensorFlow (seconds) before they can finish, so a kill within 0.3 s lands mid-stage on
        # any machine, at a different point each time.
        wait_until(lambda stage=stage, since=since: stage_running(run, stage, since), f"stage {stage} to start",
                   process=process, interval=0.005)
        if stage == "publish":
            wait_until(lambda: any(base.glob(".partial-*")), "the staging directory", process=process,
                       interval=0.005)
        # not a wait: a random point inside the stage's remaining seconds, so the kills land all over it
        threading.Event().wait(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(timeout=120)
        now = complete_versions(base)
        for number, digest in snapshot.items():
            assert now[number] == digest, f"published version {number} changed"
        snapshot = now
    assert kills == attempts, f"only {kills} of {attempts} attempts were killed mid-stage"
    # the run directory may hold a half-written SavedModel now: the next run repairs it
    repaired = run_cli("--stage", "all", "--run-dir", str(run), "--models-dir", str(models), "--no-tracking",
                       "--republish")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    final = complete_versions(base)
    assert all(final[number] == digest for number, digest in snapshot.items())
    assert not list(base.glob(".partial-*")), "leftovers of killed publishers are cleaned by the next publish"
    assert len(final) > len(snapshot)


# --- concurrent publishers ------------------------------------------------------------------

def test_two_processes_publishing_at_once_get_distinct_versions(pipeline_run, tmp_path):
    models = tmp_path / "models"
    runs = [copy_run(pipeline_run, tmp_path, f"run{i}") for i in range(2)]
    processes = [start_cli("--stage", "publish", "--run-dir", str(run), "--models-dir", str(models), "--no-tracking",
                           "--republish") for run in runs]  # two copies of one run: identical unless told
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-1000:] for _, err in outputs]
    versions = complete_versions(models / "emnist_mlp")
    assert sorted(versions) == [1, 2]
    published = sorted(json.loads((run / "manifest.json").read_text())["facts"]["published"]["version"]
                       for run in runs)
    assert published == [1, 2]


# --- resume ----------------------------------------------------------------------------------

def ran_stages(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.strip().startswith("wall time"))
    return [part.strip().split()[0] for part in line.split("wall time", 1)[1].split("(total")[0].split(",")]


def test_resume_skips_unchanged_stages_and_redoes_what_changed(pipeline_run, tmp_path, capfd):
    run = copy_run(pipeline_run, tmp_path)
    models = str(tmp_path / "models")
    common = ("--stage", "all", "--run-dir", str(run), "--models-dir", models, "--no-tracking")
    resumed = pipeline_here(*common, capsys=capfd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # nothing upstream changed; only publishing (new models dir) and register run
    assert ran_stages(resumed.stdout) == ["publish", "register"]
    assert "up to date     data, train, export, translate, package, tflite, validate" in resumed.stdout

    again = pipeline_here(*common, capsys=capfd)
    assert ran_stages(again.stdout) == ["register"]  # --no-tracking never records a registration

    (run / "model.onnx").write_bytes((run / "model.onnx").read_bytes()[:-1] + b"\0")  # an upstream change
    changed = pipeline_here(*common, capsys=capfd)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert ran_stages(changed.stdout) == ["export", "translate", "package", "tflite", "validate", "publish",
                                          "register"]
    # export rebuilt model.onnx from the same checkpoint, and every stage after it is deterministic: the same bytes
    # again, so publish reports the version it already has instead of adding a copy
    assert "not published  identical to version 1" in changed.stdout
    assert sorted(p.name for p in Path(models, "emnist_mlp").iterdir()) == ["1"]

    forced = pipeline_here(*common, "--force", capsys=capfd)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert ran_stages(forced.stdout)[:3] == ["data", "train", "export"]


def test_a_changed_config_reruns_the_stages_that_read_it(pipeline_run, tmp_path, capfd):
    run = copy_run(pipeline_run, tmp_path)
    result = pipeline_here("--stage", "all", "--run-dir", str(run), "--models-dir", str(tmp_path / "m"),
                           "--no-tracking", "--epochs", "1", capsys=capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ran_stages(result.stdout)[:2] == ["train", "export"]  # data unchanged, training redone


def test_a_new_name_reruns_package_whose_warmup_records_carry_it(pipeline_run, tmp_path, capfd):
    run = copy_run(pipeline_run, tmp_path)
    result = pipeline_here("--stage", "all", "--run-dir", str(run), "--models-dir", str(tmp_path / "m"),
                           "--no-tracking", "--name", "renamed_model", capsys=capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ran_stages(result.stdout)[:2] == ["package", "tflite"]  # and everything after it
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    record = next(iter(tf.data.TFRecordDataset(str(run / "tf_serving_warmup_requests")))).numpy()
    log = prediction_log_pb2.PredictionLog.FromString(record)
    assert log.predict_log.request.model_spec.name == "renamed_model"


def test_publishing_under_another_name_than_packaged_is_refused(pipeline_run, tmp_path, capfd):
    """The warmup records name the model they were packaged for: publishing them as another would serve records
    naming a model that is not there."""
    from tests.helpers import one_line_error

    run = copy_run(pipeline_run, tmp_path)
    result = pipeline_here("--stage", "publish", "--run-dir", str(run), "--models-dir", str(tmp_path / "m"),
                           "--no-tracking", "--name", "other_model", capsys=capfd)
    one_line_error(result, 2, "--name other_model differs from the name this run was packaged as (emnist_mlp)",
                   "Run --stage all --name other_model")
    assert not (tmp_path / "m").exists()


def test_the_contract_checker_compares_each_warmup_records_model_with_the_directory(pipeline_run, tmp_path):
    from export.contract import judge_version
    from export.servable import CROSSPORT_ONLY

    renamed = tmp_path / "other_model" / "1"
    shutil.copytree(pipeline_run.models_dir / "emnist_mlp" / "1", renamed)
    assert (CROSSPORT_ONLY, "warmup record 0 names model 'emnist_mlp'; the version is published as "
                            "'other_model'") in judge_version(renamed)
    assert judge_version(pipeline_run.models_dir / "emnist_mlp" / "1") == []
