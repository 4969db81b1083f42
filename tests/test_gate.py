"""Proof the parity gate works: deliberately broken hops fail the run, name the hop (and,
for the fp32 TensorFlow graph, the node) and publish nothing."""

import hashlib
import html
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from crossport.errors import ParityError
from pipelines.config import PipelineConfig
from pipelines.manifest import Manifest
from pipelines.runner import run_stages
from pipelines.stages import STAGES, stage_by_name
from pipelines.tracking import NullTracker
from tests import breakers
from tests.helpers import ROOT, call, one_line_error, pipeline_here
from translation.onnx_to_tf import translate


def copy_run(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run)
    manifest = Manifest.load(run)
    config = PipelineConfig.from_dict(manifest.config).override(models_dir=str(tmp_path / "models"))
    manifest.config = config.to_dict()
    return manifest, config


def assert_nothing_published(tmp_path):
    models = tmp_path / "models"
    assert not models.exists() or not any(models.rglob("saved_model.pb"))


def break_tf_graph(manifest, breaker):
    """Replace the run's TF graph with the translation of a broken copy of its ONNX."""
    run = manifest.run_dir
    broken, culprit = breaker(onnx.load(str(run / "model.onnx")))
    onnx.save(broken, str(run / "broken.onnx"))
    translate(run / "broken.onnx", run / "tf_graph")
    manifest.record("tf_graph", run / "tf_graph", "translate", parents=("onnx",))
    return culprit


@pytest.mark.parametrize("breaker", [breakers.nudge_weight, breakers.swap_classes, breakers.transpose_inputs],
                         ids=["weight-nudged", "classes-swapped", "images-transposed"])
def test_broken_tf_graph_stops_the_run_and_names_hop_and_node(pipeline_run, tmp_path, breaker):
    manifest, config = copy_run(pipeline_run, tmp_path)
    culprit = break_tf_graph(manifest, breaker)
    remaining = STAGES[[stage.name for stage in STAGES].index("package"):]
    with pytest.raises(ParityError) as caught:
        run_stages(manifest, config, remaining, NullTracker())
    message = str(caught.value)
    assert "onnxruntime -> saved_model:serving_default" in message
    assert f"first divergent node: {culprit!r}" in message
    assert manifest.stages["package"]["status"] == "failed"
    assert_nothing_published(tmp_path)


def test_validate_catches_a_drifted_saved_model_on_its_own(pipeline_run, tmp_path):
    """Even when packaging's own check is bypassed, validate refuses and locates the node."""
    from export.servable import build_saved_model

    manifest, config = copy_run(pipeline_run, tmp_path)
    culprit = break_tf_graph(manifest, breakers.nudge_weight)
    run = manifest.run_dir
    build_saved_model(run / "tf_graph", tuple((run / "labels.txt").read_text().split()), run / "saved_model")
    manifest.record("saved_model", run / "saved_model", "package", parents=("tf_graph", "labels"))
    run_stages(manifest, config, (stage_by_name("tflite"),), NullTracker())
    with pytest.raises(ParityError, match=r"onnxruntime -> saved_model:serving_default.*pytorch -> tflite_fp32"):
        run_stages(manifest, config, (stage_by_name("validate"), stage_by_name("publish")), NullTracker())
    report = json.loads((run / "parity.json").read_text())
    assert report["verdict"] == "fail"
    assert report["divergence"]["first"]["node"] == culprit
    page = (run / "parity.html").read_text()  # the same, for people: the failing hop and where it drifts first
    first = next(hop["hop"] for hop in report["hops"] if hop["verdict"] == "fail")
    assert f"FAIL at {html.escape(first)}:" in page
    assert "Where the translation first drifts" in page
    assert f"first divergent node: {html.escape(repr(culprit))}" in page
    assert_nothing_published(tmp_path)


def test_validate_chooses_the_bound_once_and_the_probes_walks_take_its_choice(pipeline_run, tmp_path, monkeypatch):
    """The pilot that chooses between the running and the first-order bound walks 64 images: validate runs it on the
    test split alone, and the probe's walks (the model's and its ONNX graph's) take that choice (resnet18: 7 s a
    pilot)."""
    import crossport.exact as exact

    manifest, config = copy_run(pipeline_run, tmp_path)
    chosen, real = [], exact.walks
    monkeypatch.setattr(exact, "walks", lambda *args, **kwargs: (chosen.append(kwargs.get("bound")),
                                                                real(*args, **kwargs))[1])
    run_stages(manifest, config, (stage_by_name("validate"),), NullTracker())
    bound = json.loads((manifest.run_dir / "parity.json").read_text())["error_model"]["bound"]
    assert chosen == [None, bound, bound]


@pytest.mark.parametrize("variant", ["fp32", "int8_full"])
def test_tflite_from_a_different_model_fails_validation(pipeline_run, tiny, tmp_path, variant, capfd):
    manifest, _ = copy_run(pipeline_run, tmp_path)
    run = manifest.run_dir
    shutil.copy(tiny.tflite, run / f"model_{variant}.tflite")
    manifest.record(f"tflite_{variant}", run / f"model_{variant}.tflite", "tflite", parents=("saved_model",))
    manifest.save()
    result = pipeline_here("--stage", "validate", "--run-dir", str(run), "--no-tracking", capsys=capfd)
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"pytorch -> tflite_{variant}: output 'scores' expected float32[359, 10]" in result.stderr
    if variant == "fp32":  # the failed run's parity.html, as a reviewer opens it: the first failing hop first
        read_failed_report_in_a_browser(run / "parity.html", tmp_path)
    report = json.loads((run / "parity.json").read_text())
    diagnosis = report["int8_layers"]  # present exactly when a hop to int8_full did not pass outright
    assert (diagnosis is None) == all(hop["verdict"] == "pass" for hop in report["hops"]
                                      if hop["candidate"] == "tflite_int8_full")
    if variant == "int8_full":  # LiteRT's debugger on the converter it came from, every quantized layer ranked
        assert diagnosis["variant"] == "tflite_int8_full" and diagnosis["samples"] == 64
        assert {layer["op"] for layer in diagnosis["layers"]} >= {"FULLY_CONNECTED", "SOFTMAX"}
        assert "tflite_int8_full: where int8 loses accuracy, layer by layer" in (run / "parity.html").read_text()
        # another model's file is no quantization loss: the converter's own int8 file of this SavedModel passes, so
        # the int8 fallback searches nothing and replaces nothing
        fallback = report["int8_fallback"]
        assert fallback["requantized"] == "pass" and fallback["candidates"] == [] and not report["replaced"]
        assert not (run / "model_int8_mixed.tflite").exists()
        from export.card import render_markdown, servable_card

        card = servable_card(name="emnist_mlp", version=1, labels=list("0123456789"), report=report, facts={},
                             sizes={"tflite_int8_full": 1}, mlflow_ids=None)
        assert card["formats"]["tflite_int8_full"]["worst_int8_layers"] == [
            {key: layer[key] for key in ("layer", "op", "typical_relative_error", "rmse_over_scale")}
            for layer in diagnosis["layers"][:3]]
        assert "tflite_int8_full did not pass outright" in render_markdown(card)
    result = pipeline_here("--stage", "publish", "--run-dir", str(run), "--no-tracking", capsys=capfd)
    assert result.returncode == 1 and "refusing to publish: parity verdict is 'fail'" in result.stderr
    assert f"tflite_{variant}" in result.stderr
    assert_nothing_published(tmp_path)


def read_failed_report_in_a_browser(page: Path, tmp_path: Path) -> None:
    from tests.helpers import Walk, headless_chromium, keep_screenshots

    driver = headless_chromium(tmp_path / "profile", "1400,1000")
    try:
        walk = Walk(driver, tmp_path / "ui")
        driver.get(page.as_uri())
        verdict = walk.shows("FAIL at ").split("FAIL at ", 1)[1].split("\n", 1)[0]
        assert "tflite_fp32" in verdict and "Nothing was published" in verdict, verdict
        keep_screenshots([walk.shot("6-parity-html-failed.png")])
    finally:
        driver.quit()


def test_diagnose_command_on_clean_and_broken_runs(pipeline_run, tmp_path, capfd):
    from pipelines.tools.diagnose import main

    clean = subprocess.run([sys.executable, "-m", "pipelines.diagnose", str(pipeline_run.run_dir), "--examples", "64"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "agree at all 6 intermediate tensors" in clean.stdout
    assert clean.stderr.strip() == ""  # onnx-tf's and TensorFlow's output goes to crossport-diagnose-<pid>.log

    manifest, _ = copy_run(pipeline_run, tmp_path)
    culprit = break_tf_graph(manifest, breakers.swap_classes)
    broken = call(main, str(manifest.run_dir), "--examples", "64", "--json", capsys=capfd)  # in this process
    assert broken.returncode == 3, broken.stderr[-2000:]
    report = json.loads(broken.stdout)
    assert report["first"]["node"] == culprit and report["first"]["op_type"] == "Gemm"
    assert [node["bound_exceeded"] for node in report["nodes"]][:4] == [False, False, False, False]


# --- subtle drift: far below the round-1 fixed thresholds at scale, still refused -------------------------


@pytest.mark.parametrize("breaker", [breakers.scale_hidden_unit, breakers.shift_class_bias,
                                     breakers.round_weights_to_bfloat16, breakers.shift_inputs_one_pixel],
                         ids=["hidden-unit-x1.001", "class-bias+1e-4", "bfloat16-weights", "input-shifted-1px"])
def test_subtle_drift_in_the_tf_graph_is_refused(pipeline_run, tmp_path, breaker):
    manifest, config = copy_run(pipeline_run, tmp_path)
    break_tf_graph(manifest, breaker)
    remaining = STAGES[[stage.name for stage in STAGES].index("package"):]
    with pytest.raises(ParityError) as caught:
        run_stages(manifest, config, remaining, NullTracker())
    message = str(caught.value)
    # whichever check catches it first (packaging's own, or validate's), it names the TF side
    assert "saved_model:serving_default" in message or "tf_graph" in message, message
    assert_nothing_published(tmp_path)


def test_a_class_bias_shift_of_1e_5_is_caught_by_the_sign_test(pipeline_run, tmp_path):
    """Inside every element's bound, yet leaning one way in one class: validate names the class."""
    manifest, config = copy_run(pipeline_run, tmp_path)
    break_tf_graph(manifest, lambda model: breakers.shift_class_bias(model, delta=1e-5, klass=3))
    run_stages(manifest, config, tuple(stage_by_name(name) for name in ("package", "tflite")), NullTracker())
    with pytest.raises(ParityError, match=r"tf_graph: output 'logits' drifts one way in class 3"):
        run_stages(manifest, config, (stage_by_name("validate"), stage_by_name("publish")), NullTracker())
    report = json.loads((manifest.run_dir / "parity.json").read_text())
    assert report["verdict"] == "fail"
    assert report["detail"].startswith("first failing")
    assert_nothing_published(tmp_path)


@pytest.mark.parametrize("impostor", ["fp16", "int8_dynamic"])
def test_a_lossy_file_posing_as_fp32_tflite_is_refused(pipeline_run, tmp_path, impostor, capfd):
    manifest, _ = copy_run(pipeline_run, tmp_path)
    run = manifest.run_dir
    shutil.copy(run / f"model_{impostor}.tflite", run / "model_fp32.tflite")
    manifest.record("tflite_fp32", run / "model_fp32.tflite", "tflite", parents=("saved_model",))
    manifest.save()
    result = pipeline_here("--stage", "validate", "--run-dir", str(run), "--no-tracking", capsys=capfd)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "tflite_fp32: output 'scores'" in result.stderr
    assert "drifts one way" in result.stderr or "float32 error bound away" in result.stderr
    assert_nothing_published(tmp_path)


# --- what publish does with a lossy variant the test split could not decide -----------------------


@pytest.mark.parametrize("policy", ["publish", "omit"])
def test_undecided_variants_are_published_unverified_or_left_out(pipeline_run, tmp_path, policy, capfd):
    manifest, _ = copy_run(pipeline_run, tmp_path)
    run = manifest.run_dir
    report = json.loads((run / "parity.json").read_text())
    report["undecided"] = ["tflite_fp16"]  # as validate reports a variant too few examples could judge
    (run / "parity.json").write_text(json.dumps(report))
    manifest.record("parity", run / "parity.json", "validate", parents=tuple(report["artifacts"]))
    manifest.save()
    models = tmp_path / "models"
    result = pipeline_here("--stage", "publish", "--run-dir", str(run), "--models-dir", str(models), "--no-tracking",
                     "--undecided", policy, capsys=capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    extra = models / "emnist_mlp" / "1" / "assets.extra"
    card = json.loads((extra / "servable.json").read_text())
    published = json.loads((extra / "manifest.json").read_text())
    listed = {entry["name"] for entry in published["artifacts"]}
    assert (extra / "model_fp32.tflite").is_file() and "tflite_fp32" in listed  # fp32 is never held back
    if policy == "omit":
        assert not (extra / "model_fp16.tflite").exists() and "tflite_fp16" not in listed
        assert "tflite_fp16" not in card["formats"] and card["parity"]["omitted"] == ["tflite_fp16"]
    else:
        assert (extra / "model_fp16.tflite").is_file() and "tflite_fp16" in listed
        assert card["formats"]["tflite_fp16"]["parity"] == "unverified"
        assert card["formats"]["tflite_int8_full"]["parity"] == "verified"
        assert "Unverified" in (extra / "SERVABLE.md").read_text()
    lineage = subprocess.run([sys.executable, "-m", "pipelines.lineage", str(models / "emnist_mlp" / "1"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert all(entry["ok"] for entry in json.loads(lineage.stdout)["files"])  # every listed file is there and intact


def test_the_failure_detail_names_the_first_failing_hop_and_what_the_finder_covers():
    from crossport.parity import HopResult
    from pipelines.stages.validate import divergence_detail

    export = HopResult("pytorch -> onnxruntime", "pytorch", "onnxruntime", 10, failures=["drift"])
    later = HopResult("saved_model:serving_default -> tflite_fp32", "saved_model:serving_default", "tflite_fp32", 10,
                      failures=["drift"])
    detail = divergence_detail([export, later], [], {"nodes": [{}] * 6, "summary": "ONNX Runtime and ... agree"})
    assert detail.startswith("first failing hop: pytorch -> onnxruntime")
    assert "PyTorch → ONNX export, which the node-by-node comparison" in detail and "does not cover" in detail
    assert "(not covering export, packaging or TFLite conversion)" in detail
    assert divergence_detail([later], [], None) == "first failing hop: saved_model:serving_default -> tflite_fp32"
    assert divergence_detail([], [], None) is None


def test_the_translate_stage_checks_the_tf_graph_under_its_own_name_on_scores_and_logits(pipeline_run, tmp_path,
                                                                                          monkeypatch):
    import translation.onnx_to_tf

    manifest, config = copy_run(pipeline_run, tmp_path)
    real_translate = translation.onnx_to_tf.translate

    def translate_a_drifted_copy(onnx_path, out):
        broken, _ = breakers.shift_class_bias(onnx.load(str(onnx_path)), delta=0.5)
        onnx.save(broken, str(tmp_path / "broken.onnx"))
        return real_translate(tmp_path / "broken.onnx", out)

    monkeypatch.setattr(translation.onnx_to_tf, "translate", translate_a_drifted_copy)
    with pytest.raises(ParityError) as caught:
        run_stages(manifest, config, (stage_by_name("translate"),), NullTracker())
    message = str(caught.value)
    assert "onnxruntime -> tf_graph: output 'logits'" in message
    assert "saved_model" not in message.split(". first divergent node")[0]
    assert manifest.stages["translate"]["status"] == "failed"


# --- only files the gate checked are published ------------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_manifest_path_leading_out_of_the_run_directory_is_refused(pipeline_run, tmp_path, how, capfd):
    from crossport.files import sha256_path

    manifest, _ = copy_run(pipeline_run, tmp_path)
    run = manifest.run_dir
    target = tmp_path / "outside.txt"
    target.write_text("root:x:0:0\n")
    if how == "symlink":
        (run / "labels_link.txt").symlink_to(target)
    path = {"dotdot": "../" * 8 + str(target).lstrip("/"), "absolute": str(target), "symlink": "labels_link.txt"}[how]
    raw = json.loads((run / "manifest.json").read_text())
    raw["artifacts"]["labels"].update(path=path, sha256=sha256_path(target))
    (run / "manifest.json").write_text(json.dumps(raw))
    result = pipeline_here("--stage", "publish", "--run-dir", str(run), "--models-dir", str(tmp_path / "models"),
                     "--no-tracking", capsys=capfd)
    assert result.returncode == 1
    assert "artifact 'labels' path" in result.stderr and "leads outside the run directory" in result.stderr
    assert_nothing_published(tmp_path)


def test_labels_changed_after_validation_are_not_published(pipeline_run, tmp_path, capfd):
    manifest, _ = copy_run(pipeline_run, tmp_path)
    run = manifest.run_dir
    (run / "labels.txt").write_text("".join(f"{letter}\n" for letter in "ABCDEFGHIJ"))
    manifest.record("labels", run / "labels.txt", "data", parents=("dataset",))  # as if re-made, after validate
    result = pipeline_here("--stage", "publish", "--run-dir", str(run), "--models-dir", str(tmp_path / "models"),
                     "--no-tracking", capsys=capfd)
    assert result.returncode == 1
    assert "refusing to publish: artifact 'labels' changed after it was validated" in result.stderr
    assert_nothing_published(tmp_path)


def test_an_onnx_model_with_external_data_is_refused_with_one_line(tiny, tmp_path):
    from crossport.errors import ExportError
    from translation.onnx_export import check_onnx

    model = onnx.load(str(tiny.onnx))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    with pytest.raises(ExportError,
                       match=r"keeps \d+ tensor\(s\) in external data files \(first: initializer .*self-contained"):
        check_onnx(tmp_path / "model.onnx")


# --- hostile run directories: a re-recorded hash does not make a file readable -------------------------------


def test_a_data_file_with_pickled_objects_is_refused_in_one_line_and_never_unpickled(pipeline_run, tmp_path, capfd):
    manifest, _ = copy_run(pipeline_run, tmp_path)
    run = manifest.run_dir
    marker = tmp_path / "unpickled"
    with np.load(run / "data.npz") as arrays:
        kept = {key: arrays[key] for key in arrays.files}
    kept["x_train"] = np.array([Unpickled(str(marker))], dtype=object)  # would create the marker if unpickled
    np.savez(run / "data.npz", **kept)
    manifest.record("dataset", run / "data.npz", "data")
    manifest.save()
    result = pipeline_here("--stage", "train", "--run-dir", str(run), "--no-tracking", capsys=capfd)
    one_line_error(result, 1, f"{run / 'data.npz'} holds an array of Python objects",
                   "Re-run the data stage; crossport writes plain numeric arrays and never loads pickled objects")
    assert not marker.exists()


def test_training_that_diverged_stops_at_train_and_says_so(pipeline_run, tmp_path, capfd):
    manifest, _ = copy_run(pipeline_run, tmp_path)
    manifest.save()
    run = manifest.run_dir
    kept = (run / "model.pt").read_bytes()
    result = pipeline_here("--stage", "train", "--run-dir", str(run), "--learning-rate", "1e6", "--no-tracking",
                           capsys=capfd)
    one_line_error(result, 1, "training diverged: the kept epoch's mean training loss is",
                   "lower --learning-rate (now 1e+06) and run --stage train again")
    after = Manifest.load(run)
    assert after.stages["train"]["status"] == "failed"
    # the diverged model was never written: the checkpoint recorded before is the one on disk
    assert (run / "model.pt").read_bytes() == kept
    assert after.artifacts["checkpoint"].sha256 == hashlib.sha256(kept).hexdigest()


class Unpickled:
    """An object whose unpickling leaves a file behind: proof that it was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_diagnose_on_a_tf_graph_tensorflow_cannot_load_gets_one_line(pipeline_run, tmp_path, capfd):
    from pipelines.tools.diagnose import main

    manifest, _ = copy_run(pipeline_run, tmp_path)
    variables = next((manifest.run_dir / "tf_graph" / "variables").glob("variables.data-*"))
    data = bytearray(variables.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: TensorFlow's checksum catches it
    variables.write_bytes(bytes(data))
    manifest.record("tf_graph", manifest.run_dir / "tf_graph", "translate", parents=("onnx",))
    manifest.save()
    result = call(main, str(manifest.run_dir), "--examples", "8", capsys=capfd)
    one_line_error(result, 1, f"TensorFlow cannot load the SavedModel {manifest.run_dir / 'tf_graph'}",
                   "Re-run the stage that wrote it (translate for tf_graph")
