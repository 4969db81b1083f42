"""The int8 fallback (pipelines/stages/int8.py): when int8_full fails the gate, the fewest layers kept in float that
pass it are published as int8_mixed, and nothing the gate did not pass is ever published."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest

from crossport.parity import CONFIDENCE
from pipelines.gate import fallback_confidence
from pipelines.stages.int8 import candidate_sizes
from tests.helpers import one_line_error, pipeline_here


def test_candidates_grow_by_about_root_two_and_end_with_all_layers_but_one():
    assert candidate_sizes(0) == candidate_sizes(1) == [] and candidate_sizes(3) == [1, 2]
    for layers in range(2, 200):  # never every layer: that is the fp32 file
        sizes = candidate_sizes(layers)
        assert sizes[0] == 1 and sizes[-1] == layers - 1 and sizes == sorted(set(sizes))
        assert all(b <= max(a + 1, round(a * 2**0.5)) for a, b in itertools.pairwise(sizes))


@pytest.mark.parametrize("candidates", [1, 3, 12])
def test_each_candidate_is_judged_so_the_search_keeps_the_gates_confidence(candidates):
    # Bonferroni: the chances that each of m candidates passes wrongly add up to at most the gate's own
    assert candidates * (1 - fallback_confidence(candidates)) == pytest.approx(1 - CONFIDENCE)


def judged_int8_full(lost: int, points: float):
    """int8_full's hop against the SavedModel, by the gate's own statistics, on 2,000 examples the reference gets
    right, of which the candidate gets ``lost`` wrong, under --int8-max-drop ``points``."""
    from crossport.parity import compare
    from pipelines.gate import SM_PREDICT, TFLITE, hop_spec, run_policies

    targets = np.random.default_rng(0).integers(0, 10, 2000)
    reference = np.eye(10, dtype=np.float32)[targets]
    candidate = reference.copy()
    candidate[:lost] = np.roll(candidate[:lost], 1, axis=1)
    spec = hop_spec(SM_PREDICT, TFLITE["int8_full"], run_policies(points))
    return compare(spec, {"scores": reference}, {"scores": candidate}, targets)


def test_a_tighter_int8_max_drop_holds_int8_full_and_int8_mixed_to_it_and_nothing_else():
    from pipelines.gate import INT8_MAX_DROP_POINTS, POLICIES, TFLITE, run_policies, tolerance_table

    assert run_policies() is POLICIES and run_policies(INT8_MAX_DROP_POINTS) is POLICIES
    tight = run_policies(0.5)
    int8 = {TFLITE["int8_full"], TFLITE["int8_mixed"]}
    assert all(tight[name].lossy.max_accuracy_drop == 0.005 for name in int8)
    assert all(tight[name].lossy.max_disagreement == POLICIES[name].lossy.max_disagreement for name in int8)
    assert {name: policy for name, policy in tight.items() if name not in int8} == {
        name: policy for name, policy in POLICIES.items() if name not in int8}
    rows = {row["candidate"]: row for row in tolerance_table(tight)}
    assert rows[TFLITE["int8_full"]]["max_accuracy_drop_points"] == pytest.approx(0.5)
    assert "0.5 accuracy points (--int8-max-drop)" in rows[TFLITE["int8_mixed"]]["why"]
    # the same answers judged under each: 3 of 2,000 lost is within 1 point for certain, not within 0.05
    assert judged_int8_full(3, INT8_MAX_DROP_POINTS).accuracy_drop.decision == "pass"
    assert judged_int8_full(3, 0.05).accuracy_drop.decision == "undecided"
    assert judged_int8_full(30, 0.05).accuracy_drop.decision == "fail"


def test_the_fallback_answers_int8_fulls_failure_and_with_undecided_omit_its_undecided_verdict():
    from pipelines.stages.int8 import answers

    other = judged_int8_full(0, 1.0)
    other.candidate = "tflite_fp16"  # another candidate that passed
    undecided, failed, passed = judged_int8_full(3, 0.05), judged_int8_full(30, 0.05), judged_int8_full(0, 0.05)
    assert undecided.passed and undecided.undecided and not failed.passed and passed.passed and not passed.undecided
    assert answers([other, failed], "publish") and answers([other, failed], "omit")
    assert answers([other, undecided], "omit") and not answers([other, undecided], "publish")
    assert not answers([other, passed], "omit")
    broken = judged_int8_full(30, 0.05)
    broken.candidate = "tflite_fp16"  # another failure: nothing would be published, so nothing is searched
    assert not answers([broken, failed], "omit") and not answers([broken, undecided], "omit")


@pytest.mark.slow
def test_a_model_that_breaks_int8_publishes_int8_mixed_with_that_layer_in_float(tmp_path, capfd):
    from ai_edge_litert.interpreter import Interpreter

    from export.contract import judge
    from tests.onnx_models import int8_breaker

    model, (images, labels) = int8_breaker()
    onnx.save(model, str(tmp_path / "breaker.onnx"))
    np.savez(tmp_path / "eval.npz", images=images, labels=labels)
    run, models = tmp_path / "run", tmp_path / "models"
    result = pipeline_here("--onnx", str(tmp_path / "breaker.onnx"), "--eval-data", str(tmp_path / "eval.npz"),
                           "--run-dir", str(run), "--models-dir", str(models), "--no-tracking", capsys=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "parity.json").read_text())
    full = [hop for hop in report["hops"] if hop["candidate"] == "tflite_int8_full"]
    assert full and all(hop["verdict"] == "fail" for hop in full)  # the model does break plain int8
    assert report["verdict"] == "pass" and report["replaced"] == {"tflite_int8_full": "tflite_int8_mixed"}

    # the diagnosis names the first layer, whose output one channel stretches; the fallback keeps exactly that
    # tensor in float: the layer making it and the layer reading it, the first two in graph order
    layers = report["int8_layers"]["layers"]
    in_order = sorted((layer for layer in layers if layer["op"] == "FULLY_CONNECTED"), key=lambda x: x["order"])
    assert layers[0]["layer"] == in_order[0]["layer"]
    fallback = report["int8_fallback"]
    assert fallback["requantized"] == "fail"  # the converter's own int8 of this model fails too: quantization's loss
    chosen = fallback["candidates"][fallback["chosen"]]
    assert chosen["float_layers"] == [in_order[0]["layer"], in_order[1]["layer"]]
    assert fallback["confidence"] == fallback_confidence(len(candidate_sizes(fallback["ranked_layers"])))

    # never published unless the gate passed it, at the corrected confidence
    mixed = [hop for hop in report["hops"] if hop["candidate"] == "tflite_int8_mixed"]
    assert len(mixed) == 2 and all(hop["verdict"] == "pass" for hop in mixed)
    stated = f"one-sided {100 * fallback['confidence']:.4g}%"
    assert all(hop["accuracy_drop"]["test"].endswith(stated) and hop["disagreement"]["test"].endswith(stated)
               for hop in mixed), mixed
    extra = models / "breaker" / "1" / "assets.extra"
    assert (extra / "model_int8_mixed.tflite").read_bytes() == (run / "model_int8_mixed.tflite").read_bytes()
    assert not (extra / "model_int8_full.tflite").exists()  # refused by the gate: not in the version
    assert judge(models) == {"breaker/1": []}
    card = json.loads((extra / "servable.json").read_text())
    assert card["formats"]["tflite_int8_mixed"]["float_layers"] == chosen["float_layers"]
    assert "tflite_int8_full" not in card["formats"] and "keeps 2 layer(s) in float32" in (
        extra / "SERVABLE.md").read_text()

    # the files themselves: the first two fully connected layers of int8_mixed hold float32 weights, the last int8;
    # int8 weights are quantized per channel (one scale per output unit), in int8_full and in int8_mixed alike
    def weights(path):
        interpreter = Interpreter(model_path=str(path))
        tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
        return [(tensors[op["inputs"][1]]["dtype"], len(tensors[op["inputs"][1]]["quantization_parameters"]["scales"]))
                for op in interpreter._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]

    assert weights(extra / "model_int8_mixed.tflite") == [(np.float32, 0), (np.float32, 0), (np.int8, 4)]
    assert weights(run / "model_int8_full.tflite") == [(np.int8, 32), (np.int8, 16), (np.int8, 4)]

    # what deployers take from the version: the web service's backend and the serverless package, by its own name
    from crossport.errors import PackageError
    from serving.rest import load_backend
    from serving.serverless import build_package

    version = models / "breaker" / "1"
    scores = load_backend(version, "tflite_int8_mixed").predict(images[:8].reshape(8, -1).astype(np.float32) / 255)
    assert scores.shape == (8, 4) and list(np.argmax(scores, axis=1)) == list(labels[:8])
    package, _ = build_package(version, tmp_path / "lambda", "int8_mixed")
    assert (package / "model.tflite").read_bytes() == (extra / "model_int8_mixed.tflite").read_bytes()
    with pytest.raises(PackageError, match="no int8_full TFLite file"):
        build_package(version, tmp_path / "lambda_full", "int8_full")

    # tools.int8_search measures every candidate on the run, passing or not, beside fp32 and plain int8_full: the
    # same candidates as validate's search, the same accuracies, and the drop's bound at validate's confidence
    from tests.helpers import call
    from tools.int8_search import main as search

    result = call(search, str(run), "--seconds", "0.05", "--json", str(tmp_path / "search.json"), capsys=capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["file"]: row for row in json.loads((tmp_path / "search.json").read_text())}
    assert rows["fp32"]["accuracy"] == 1.0 and rows["int8_full"]["drop_points"] == pytest.approx(75.0)
    searched = [row for row in rows.values() if row["float_layers"] is not None]
    judged = [len(candidate["float_layers"]) for candidate in fallback["candidates"]]  # validate stops at a pass
    assert [row["float_layers"] for row in searched][: len(judged)] == judged
    first = searched[0]  # the candidate validate published: within int8_full's policy (1 point) at that confidence
    assert first["accuracy"] == 1.0 and first["drop_points"] == 0 and first["drop_upper_points"] <= 1.0
    assert rows["int8_full"]["bytes"] < first["bytes"]  # its two large layers hold float32 weights
    assert f"candidates at the search's {100 * fallback['confidence']:.4g} %" in result.stdout
    assert rows["int8_full"]["confidence"] == CONFIDENCE and first["confidence"] == fallback["confidence"]
    assert (first["lost"], first["gained"]) == (0, 0) and rows["int8_full"]["lost"] > 0
    assert all(row["batch1_p50_ms"] > 0 for row in rows.values())
    assert rows["int8_full"]["verdict"] == "fail" and first["verdict"] == "pass" and rows["fp32"]["verdict"] is None
    assert f"{first['file']}, the first candidate the gate passes" in result.stdout

    # a deployer's tighter --int8-max-drop holds int8_full and every candidate to it: the report's hops and its table
    result = pipeline_here("--run-dir", str(run), "--stage", "validate", "--int8-max-drop", "0.1", capsys=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    tight = json.loads((run / "parity.json").read_text())
    int8 = [hop for hop in tight["hops"] if hop["candidate"] in ("tflite_int8_full", "tflite_int8_mixed")]
    assert {hop["candidate"] for hop in int8} == {"tflite_int8_full", "tflite_int8_mixed"}
    assert all(hop["accuracy_drop"]["limit"] == pytest.approx(0.001) for hop in int8)
    assert all(hop["verdict"] == "pass" for hop in int8 if hop["candidate"] == "tflite_int8_mixed")
    rows = {row["candidate"]: row for row in tight["tolerances"]}
    assert rows["tflite_int8_full"]["max_accuracy_drop_points"] == pytest.approx(0.1)
    assert rows["tflite_int8_dynamic"]["max_accuracy_drop_points"] == pytest.approx(0.5)  # the others as they were

    # without the fallback the same run is refused, the int8_mixed file is no longer the run's, nothing more published
    result = pipeline_here("--run-dir", str(run), "--stage", "validate", "--int8-fallback", "off", capsys=capfd)
    one_line_error(result, 3, "tflite_int8_full")
    assert "tflite_int8_mixed" not in json.loads((run / "manifest.json").read_text())["artifacts"]
    result = pipeline_here("--run-dir", str(run), "--stage", "publish", capsys=capfd)
    one_line_error(result, 1, "refusing to publish")
    assert sorted(path.name for path in (models / "breaker").iterdir() if path.is_dir()) == ["1"]
