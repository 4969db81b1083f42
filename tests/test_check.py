"""``pipelines.check``: the gate on a file any converter made, its kind read from the file itself."""

import json
import shutil

import pytest

from crossport.formats import FORMATS
from tests.helpers import call, one_line_error, run_module, usage_error


def converted(run_dir, path, scale: float = 1.0) -> None:
    """A TFLite file in another converter's conventions: input [1, 1, 28, 28] (batch fixed at 1, channels first),
    one output named ``output_0`` holding the logits alone (times ``scale``: a drift on purpose), made from the
    run's translated graph."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(run_dir / "tf_graph")).signatures["serving_default"]

    class Converted(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 1, 28, 28], tf.float32)])
        def serve(self, x):
            return {"output_0": graph(images=tf.reshape(x, [1, 784]))["logits"] * scale}

    module = Converted()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    path.write_bytes(converter.convert())


@pytest.fixture(scope="module")
def foreign(pipeline_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    files = {"same": folder / "model_float32.tflite", "drift": folder / "drift.tflite",
             "slight": folder / "slight.tflite"}
    for name, scale in (("same", 1.0), ("drift", 1.001), ("slight", 1.0 + 2.0**-14)):
        converted(pipeline_run.run_dir, files[name], scale)
    return files


def test_every_file_crossport_publishes_is_read_as_its_kind_and_passes(pipeline_run):
    from crossport.foreign import inspect
    from pipelines.tools.check import check

    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    for fmt in (fmt for fmt in FORMATS if fmt.loader != "onnx" and not fmt.optional):  # what every run makes
        path = version / fmt.path
        assert inspect(path).kind == (fmt.variant or "fp32"), fmt.name  # the SavedModel is float32
        report = check(path.resolve(), pipeline_run.run_dir)
        assert report["verdict"] == "pass", (fmt.name, report["hops"], report["against_exact"])
        assert [hop["candidate"] for hop in report["hops"]] == [fmt.runtime]
        (exact,) = report["against_exact"]
        assert exact["judged"] == (not fmt.lossy)  # float32 files also against the exact values; lossy recorded


def test_a_file_in_another_converters_conventions_passes(pipeline_run, foreign):
    from pipelines.tools.check import check

    report = check(foreign["same"], pipeline_run.run_dir)
    assert report["verdict"] == "pass", (report["hops"], report["against_exact"])
    assert report["kind"] == "fp32" and "input [N, 1, 28, 28], batch fixed at 1" in report["input"]
    assert report["outputs"] == ["logits"] and report["scores_from_logits"]
    assert {o["name"] for o in report["against_exact"][0]["outputs"]} == {"logits", "scores"}
    assert report["examples"] == len(__import__("numpy").load(pipeline_run.run_dir / "data.npz")["y_test"])


def test_a_drift_within_the_error_bound_is_caught_by_the_sign_test(pipeline_run, foreign):
    """Logits scaled by 1 + 2⁻¹⁴: every element within its bound B, the same sign on every probe input."""
    from pipelines.tools.check import check

    report = check(foreign["slight"], pipeline_run.run_dir)
    (exact,) = report["against_exact"]
    logits = next(o for o in exact["outputs"] if o["name"] == "logits")
    assert logits["worst_ratio"] < 1  # within B everywhere: only the sign test can see it
    assert logits["sign_statistic"] > exact["threshold"] and report["verdict"] == "fail"


def test_a_drifted_file_fails_with_exit_code_3(pipeline_run, foreign):
    result = run_module("pipelines.check", str(foreign["drift"]), "--against", str(pipeline_run.run_dir), "--json")
    assert result.returncode == 3, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail" and report["against_exact"][0]["verdict"] == "fail"


def test_a_lossy_file_posing_as_fp32_is_judged_as_what_it_is(pipeline_run, tmp_path):
    from pipelines.tools.check import check

    posing = tmp_path / "model_fp32.tflite"
    shutil.copy(pipeline_run.models_dir / "emnist_mlp" / "1" / "assets.extra" / "model_fp16.tflite", posing)
    report = check(posing, pipeline_run.run_dir)
    assert report["kind"] == "fp16" and report["hops"][0]["candidate"] == "tflite_fp16"
    expected = check(posing, pipeline_run.run_dir, expect="fp32")
    assert expected["verdict"] == "fail"
    assert expected["failures"] == [f"expected a fp32 file; {posing} is fp16 (read from its tensor types)"]


def test_every_file_checked_against_a_run_is_judged_on_exact_values_computed_once(pipeline_run, monkeypatch):
    import collections
    import os

    import pipelines.stages.validate as validate
    from pipelines.tools import check as checking

    computed, real = [], validate.exact_values
    monkeypatch.setattr(validate, "exact_values", lambda *args, **kwargs: (
        computed.append((kwargs.get("graph", False), kwargs.get("bound"))), real(*args, **kwargs))[1])
    monkeypatch.setattr(checking, "_EXACT", collections.OrderedDict())
    extra = pipeline_run.models_dir / "emnist_mlp" / "1" / "assets.extra"
    reports = [checking.check(extra / name, pipeline_run.run_dir)
               for name in ("model_fp32.tflite", "model_int8_full.tflite", "model_fp32.tflite")]
    # the test split once, the probe (with the graph's) once, with the bound the test split's pilot chose: for three
    assert computed == [(False, None), (True, "running")]  # files
    assert reports[0] == reports[2] and [r["verdict"] for r in reports] == ["pass"] * 3
    checkpoint = pipeline_run.run_dir / "model.pt"
    held = os.stat(checkpoint)
    try:  # a model file written again is never judged on the old values
        os.utime(checkpoint, ns=(held.st_atime_ns, held.st_mtime_ns + 1))
        checking.check(extra / "model_int8_full.tflite", pipeline_run.run_dir)
    finally:
        os.utime(checkpoint, ns=(held.st_atime_ns, held.st_mtime_ns))
    assert [graph for graph, _ in computed] == [False, True, False]


def test_what_is_no_servable_is_refused_in_one_line(tmp_path, capsys):
    from pipelines.tools.check import main

    (tmp_path / "notes.tflite").write_text("not a model")
    one_line_error(call(main, str(tmp_path / "notes.tflite"), "--against", str(tmp_path), capsys=capsys), 1,
                   "LiteRT cannot load", "Pass a .tflite file or a SavedModel directory")
    one_line_error(call(main, str(tmp_path / "missing.tflite"), "--against", str(tmp_path), capsys=capsys), 2,
                   "does not exist")
    one_line_error(call(main, str(tmp_path), "--against", str(tmp_path), capsys=capsys), 2,
                   "is a folder with no saved_model.pb", "e.g. model_float32.tflite or saved_model/")
    # a thread count LiteRT would refuse is the flag's error, not a file LiteRT "cannot load"
    usage_error(call(main, str(tmp_path / "notes.tflite"), "--against", str(tmp_path), "--threads", "0",
                     capsys=capsys), "--threads", "expected an integer from 1")


def own_conversion(model, folder, *, drift: float = 1.0):
    """A user's own conversion of ``model`` with no crossport run involved: onnx-tf on the file as exported, then
    TensorFlow's TFLite converter. The file reads the model's own input ([N, 3, 8, 6], already scaled); ``drift``
    scales the classifier's weights first (a converter that got them wrong)."""
    import onnx
    import tensorflow as tf
    from onnx import numpy_helper

    from translation.onnx_to_tf import translate

    model = onnx.ModelProto.FromString(model.SerializeToString())
    weights = next(init for init in model.graph.initializer if init.name == "fc_w")
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * drift, "fc_w"))
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    translate(folder / "model.onnx", folder / "saved_model", expose_intermediates=False)
    path = folder / "theirs.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(folder / "saved_model")).convert())
    return path


@pytest.mark.slow  # the import stage asks ldconfig where a library is
def test_a_file_converted_from_a_model_crossport_never_saw_is_judged_on_its_own_input(tmp_path, capfd):
    """``--onnx MODEL --eval-data DATA``: the model (RGB 8×6, channels first, scaled by ImageNet's mean and std) is
    imported, and the file is fed what MODEL reads, the mapping of the published input computed by ONNX Runtime.
    The same conversion with the classifier's weights ×1.0001 fails; a flag of the other mode is refused."""
    import numpy as np
    import onnx

    from pipelines.tools.check import main
    from tests.onnx_models import image_cnn

    model = image_cnn()
    onnx.save(model, str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (260, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "eval.npz", x_test=images[:60], y_test=rng.integers(0, 5, 60), x_train=images[60:])
    scaling = ("--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    theirs, drifted = own_conversion(model, tmp_path / "same"), own_conversion(model, tmp_path / "drift", drift=1.0001)

    result = call(main, str(theirs), "--onnx", str(tmp_path / "model.onnx"), "--eval-data", str(tmp_path / "eval.npz"),
                  *scaling, "--run-dir", str(tmp_path / "run"), "--json", capsys=capfd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["converted_from"] == "source" and report["examples"] == 60 and "[N, 3, 8, 6]" in report["input"]
    assert all(check["verdict"] == "pass" for check in report["hops"] + report["against_exact"])
    facts = json.loads((tmp_path / "run" / "manifest.json").read_text())["facts"]["source"]
    assert facts["model_input"] != "images"  # the file was fed the mapped values, not the published input

    result = call(main, str(drifted), "--against", str(tmp_path / "run"), "--converted-from", "source", "--json",
                  capsys=capfd)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-2000:]
    assert json.loads(result.stdout)["verdict"] == "fail"
    one_line_error(call(main, str(theirs), "--against", str(tmp_path / "run"), *scaling, capsys=capfd), 2,
                   "--mean, --std apply to a model brought with --onnx")
    one_line_error(call(main, str(theirs), capsys=capfd), 2, "neither was given", "Pass exactly one")
