"""`--stage all` on the bundled digits, then every published artifact reloaded from disk."""

import json
import os
import platform
import shutil

import numpy as np

from crossport.files import sha256_path
from crossport.formats import FORMATS
from tests.helpers import EXPECTED_FILES, pipeline_here


def version_dir(pipeline_run, version=1):
    return pipeline_run.models_dir / "emnist_mlp" / str(version)


def test_run_prints_a_summary(pipeline_run):
    out = pipeline_run.result.stdout
    assert "published      version 1 at" in out
    assert "test accuracy" in out
    assert "PASS" in out and "pytorch -> tflite_fp32" in out
    assert f"(report: {pipeline_run.models_dir / 'emnist_mlp' / '1' / 'assets.extra' / 'parity.html'})" in out
    page = (pipeline_run.models_dir / "emnist_mlp" / "1" / "assets.extra" / "parity.html").read_text()
    assert "B on this run: the running error bound, layer by layer." in page  # the MLP's bound, named
    assert f"version page   {pipeline_run.tracking_uri}/#/models/emnist_mlp/versions/" in out


def test_the_console_shows_only_crossports_own_lines(pipeline_run):
    """Without --debug, what TensorFlow, LiteRT, absl, ONNX Runtime and MLflow print (native code included) goes to
    run.log; the terminal gets crossport's log lines (no progress bars: the output is not a terminal)."""
    import re

    ours = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")
    foreign = [line for line in pipeline_run.result.stderr.splitlines() if line.strip() and not ours.match(line)]
    assert foreign == []
    assert not any(ours.match(line) for line in pipeline_run.result.stdout.splitlines())  # stdout: the summary
    log = (pipeline_run.run_dir / "run.log").read_text(errors="replace")
    assert "stage validate done" in log  # crossport's lines are kept there too
    assert re.search(r"oneDNN|XNNPACK|absl|cuda|tensorflow", log, re.IGNORECASE), log[-2000:]


def test_published_layout_is_exactly_the_contract(pipeline_run):
    version = version_dir(pipeline_run)
    files = {p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES
    assert sorted(p.name for p in (pipeline_run.models_dir / "emnist_mlp").iterdir()) == ["1"]
    assert (pipeline_run.models_dir / "models.config").is_file()


def test_published_manifest_hashes_match_the_files(pipeline_run):
    version = version_dir(pipeline_run)
    manifest = json.loads((version / "assets.extra" / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["name"] == "emnist_mlp"
    by_name = {entry["name"]: entry for entry in manifest["artifacts"]}
    for entry in manifest["artifacts"]:
        exclude = ("assets.extra",) if entry["name"] == "saved_model" else ()
        assert sha256_path(version / entry["path"], exclude=exclude) == entry["sha256"], entry["name"]
    assert by_name["onnx"]["parents"] == {"checkpoint": manifest["lineage"]["checkpoint"]["sha256"]}
    assert by_name["tflite_fp32"]["parents"] == {"saved_model": by_name["saved_model"]["sha256"]}
    assert by_name["saved_model"]["sha256"] == manifest["lineage"]["saved_model"]["sha256"]
    run_manifest = json.loads((pipeline_run.run_dir / "manifest.json").read_text())
    assert manifest["dataset"]["digest"] == run_manifest["facts"]["dataset"]["digest"]


def test_every_published_artifact_reloads_and_agrees(pipeline_run):
    from crossport.runtimes import load_onnx, load_saved_model, load_tflite
    from export.servable import check_signatures

    version = version_dir(pipeline_run)
    extra = version / "assets.extra"
    labels = (extra / "labels.txt").read_text().splitlines()
    assert labels == [str(d) for d in range(10)]
    with np.load(pipeline_run.run_dir / "data.npz") as data:
        images = data["x_test"][:50].astype(np.float32) / 255.0
    check_signatures(version, len(labels))
    onnx_scores = load_onnx(extra / "model.onnx")(images)["scores"]
    predict = load_saved_model(version, "serving_default")(images)["scores"]
    classify = load_saved_model(version, "classify")(images)
    tflite = load_tflite(extra / "model_fp32.tflite")(images)["scores"]
    for scores in (predict, classify["scores"], tflite):
        np.testing.assert_allclose(scores, onnx_scores, atol=1e-5)
    for fmt in (fmt for fmt in FORMATS if fmt.lossy and not fmt.optional):
        scores = load_tflite(version_dir(pipeline_run) / fmt.path)(images)["scores"]
        assert scores.shape == onnx_scores.shape and scores.dtype == np.float32  # float in, float out
    assert [c.decode() for c in classify["classes"][0]] == labels


def test_parity_report_and_servable_card(pipeline_run):
    extra = version_dir(pipeline_run) / "assets.extra"
    report = json.loads((extra / "parity.json").read_text())
    assert report["verdict"] == "pass"
    assert report["examples"] == 359  # the whole digits test split
    candidates = ["tf_graph", "saved_model:classify", *(fmt.runtime for fmt in FORMATS if not fmt.optional)]
    hops = {hop["hop"]: hop for hop in report["hops"]}
    assert {f"pytorch -> {candidate}" for candidate in candidates} <= set(hops)  # all against the reference
    assert "saved_model:serving_default -> tflite_int8_full" in hops  # and against the parent
    undecided = set(report["undecided"])
    for hop in report["hops"]:
        assert not hop["failures"]
        assert hop["verdict"] == ("undecided" if hop["undecided"] else "pass")
        assert hop["candidate"] in undecided or hop["verdict"] == "pass"
        for output in hop["outputs"]:
            if output["kind"] == "fp32":  # every fp32 element within its derived bound, and the ratio recorded
                assert 0 <= output["worst_ratio"] <= 1 and output["violations"] == 0
    assert undecided <= {fmt.runtime for fmt in FORMATS if fmt.lossy}  # never an fp32 artifact
    assert hops["pytorch -> tflite_fp32"]["top1_agreement"] == 1.0
    assert [o["name"] for o in hops["onnxruntime -> tf_graph"]["outputs"]] == ["scores", "logits"]
    assert hops["pytorch -> tflite_int8_full"]["accuracy_drop"]["limit"] == 0.01
    exact = {check["artifact"]: check for check in report["against_exact"]}
    assert set(exact) == {"pytorch", *candidates}
    for name in ("onnxruntime", "tf_graph", "saved_model:serving_default", "tflite_fp32"):
        assert exact[name]["judged"] and exact[name]["verdict"] == "pass"
        assert all(o["sign_statistic"] < exact[name]["threshold"] for o in exact[name]["outputs"])
    assert not exact["tflite_int8_full"]["judged"]
    assert report["error_model"]["fan_ins"] == [785, 513, 257]
    sign_test = report["error_model"]["sign_test"]
    assert sign_test["probe_inputs"] == min(report["examples"], 8192) and sign_test["false_alarm"] == 1e-6
    assert exact["onnxruntime"]["threshold"] == sign_test["threshold"] > 5
    # the MLP's graph holds the model's own weights: its exact function is the model's to float64 rounding
    assert report["export_function"]["verdict"] == "pass" and report["export_function"]["worst_ratio"] <= 1
    assert report["export_function"]["allowance"].startswith("float64")
    assert {row["candidate"] for row in report["tolerances"]} >= set(candidates)
    card = json.loads((extra / "servable.json").read_text())
    assert card["version"] == 1 and card["input"]["shape"] == [None, 784]
    assert card["parity"]["verdict"] == "pass" and len(card["labels"]) == 10
    # the int8 files' diagnoses exist exactly when their hops did not pass outright, and the card names their worst
    for key, variant in (("int8_layers", "tflite_int8_full"), ("int8_weights", "tflite_int8_dynamic")):
        plain = all(hop["verdict"] == "pass" for hop in report["hops"] if hop["candidate"] == variant)
        assert (report[key] is None) == plain, (key, report[key])
        if not plain:
            assert report[key]["variant"] == variant and report[key]["layers"]
            assert card["formats"][variant]["worst_int8_layers"][0]["layer"] == report[key]["layers"][0]["layer"]
    assert report["int8_fallback"] is None and not report["replaced"]  # int8_full did not fail: nothing searched


def test_the_command_ran_with_one_heap_and_recorded_it(pipeline_run):
    """``python -m pipelines.run`` runs itself again with glibc's one heap (pipelines.memory.one_heap), unless the user
    set their own; the run's provenance records what the peaks it reports were measured under."""
    from pipelines.manifest import Manifest
    from pipelines.memory import ONE_HEAP

    glibc = platform.libc_ver()[0] == "glibc"
    expected = {name: os.environ.get(name, value if glibc else None) for name, value in ONE_HEAP.items()}
    assert Manifest.load(pipeline_run.run_dir).facts["provenance"]["allocator"] == expected


def test_every_fact_the_run_recorded_is_declared(pipeline_run):
    """manifest.json's facts are typed (pipelines.manifest.Facts): a key, or a field of a typed fact, that no
    declaration names is a fact some stage writes and no reader can look up."""
    from typing import get_type_hints, is_typeddict

    from pipelines.manifest import Facts, Manifest

    facts = Manifest.load(pipeline_run.run_dir).facts
    declared = get_type_hints(Facts)
    assert {"dataset", "model", "accuracy", "published", "registry", "provenance", "mlflow"} <= set(facts)
    assert set(facts) <= set(declared)
    for key, value in facts.items():
        if is_typeddict(declared[key]):
            assert set(value) <= set(get_type_hints(declared[key])), key


def test_warmup_file_holds_prediction_logs(pipeline_run):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = version_dir(pipeline_run) / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    kinds = [log.WhichOneof("log_type") for log in logs]
    assert 0 < len(logs) <= 1000
    assert {"predict_log", "classify_log"} <= set(kinds)


def test_single_stage_reruns_from_the_manifest_and_publishes_a_new_version(pipeline_run, tmp_path, capfd):
    """Publishing the same model files again is reported and skipped (no version churn); --republish publishes."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run)
    models = tmp_path / "models"
    shutil.copytree(pipeline_run.models_dir, models)
    first = models / "emnist_mlp" / "1"
    before = sha256_path(first)
    same = pipeline_here("--stage", "publish", "--run-dir", str(run), "--no-tracking", "--models-dir", str(models),
                         capsys=capfd)
    assert same.returncode == 0, same.stderr[-2000:]
    assert f"not published  identical to version 1 at {first}" in same.stdout
    assert "version 1 already holds exactly these model files" in same.stderr
    assert sorted(p.name for p in (models / "emnist_mlp").iterdir()) == ["1"]
    result = pipeline_here("--stage", "publish", "--run-dir", str(run), "--no-tracking", "--models-dir", str(models),
                           "--republish", capsys=capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "published      version 2" in result.stdout
    assert sha256_path(first) == before  # version 1 untouched
    assert json.loads((models / "emnist_mlp" / "2" / "assets.extra" / "servable.json").read_text())["version"] == 2


def test_changed_input_is_detected_before_a_stage_runs(pipeline_run, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run)
    (run / "model.onnx").write_bytes(b"tampered")
    result = pipeline_here("--stage", "translate", "--run-dir", str(run), "--no-tracking", capsys=capfd)
    assert result.returncode == 1
    assert "artifact 'onnx'" in result.stderr and "changed since stage 'export' recorded it" in result.stderr
