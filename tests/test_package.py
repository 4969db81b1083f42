import numpy as np
import pytest

from crossport.errors import PackageError
from crossport.parity import compare
from crossport.runtimes import load_onnx, load_saved_model, serialize_examples
from export.servable import check_signatures, read_signature_defs, set_method_name
from pipelines.gate import ONNX, SM_CLASSIFY, SM_PREDICT, hop_spec


def test_signature_defs_on_disk_follow_the_serving_contract(tiny):
    from tensorflow.core.framework import types_pb2

    defs = read_signature_defs(tiny.saved_model)
    predict, classify = defs["serving_default"], defs["classify"]
    assert predict.method_name == "tensorflow/serving/predict"
    assert classify.method_name == "tensorflow/serving/classify"
    assert list(predict.inputs) == ["images"] and list(predict.outputs) == ["scores"]
    assert predict.inputs["images"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in predict.inputs["images"].tensor_shape.dim] == [-1, 784]
    assert [d.size for d in predict.outputs["scores"].tensor_shape.dim] == [-1, len(tiny.labels)]
    assert list(classify.inputs) == ["inputs"]
    assert classify.inputs["inputs"].dtype == types_pb2.DT_STRING
    assert [d.size for d in classify.inputs["inputs"].tensor_shape.dim] == [-1]
    assert sorted(classify.outputs) == ["classes", "scores"]
    assert classify.outputs["classes"].dtype == types_pb2.DT_STRING
    assert [d.size for d in classify.outputs["classes"].tensor_shape.dim] == [-1, len(tiny.labels)]
    assert classify.outputs["scores"].dtype == types_pb2.DT_FLOAT
    check_signatures(tiny.saved_model, len(tiny.labels))


def test_fingerprint_matches_the_edited_graph(tiny):
    import tensorflow as tf
    from tensorflow.python.saved_model import fingerprinting_utils

    stored = tf.saved_model.experimental.read_fingerprint(str(tiny.saved_model))
    recomputed = fingerprinting_utils.singleprint_from_saved_model_proto(str(tiny.saved_model))
    assert stored.singleprint() == recomputed


def test_both_signatures_run_after_reload_and_match_onnx(tiny, tiny_exact):
    reference = load_onnx(tiny.onnx)(tiny.images)
    predict = load_saved_model(tiny.saved_model, "serving_default")(tiny.images)
    classify = load_saved_model(tiny.saved_model, "classify")(tiny.images)
    assert compare(hop_spec(ONNX, SM_PREDICT), reference, predict, bounds=tiny_exact.bounds).passed
    assert compare(hop_spec(ONNX, SM_CLASSIFY), reference, classify, bounds=tiny_exact.bounds).passed
    assert classify["classes"].shape == (len(tiny.images), len(tiny.labels))
    assert [label.decode() for label in classify["classes"][3]] == list(tiny.labels)


def test_classify_reads_the_images_feature_of_tf_examples(tiny):
    import tensorflow as tf

    model = tf.saved_model.load(str(tiny.saved_model))
    examples = serialize_examples(tiny.images[:2])
    out = model.signatures["classify"](inputs=tf.constant(examples))
    direct = model.signatures["serving_default"](images=tf.constant(tiny.images[:2]))
    np.testing.assert_array_equal(out["scores"].numpy(), direct["scores"].numpy())


def test_contract_check_catches_a_wrong_method_name(tmp_path, tiny):
    import shutil

    copy = tmp_path / "sm"
    shutil.copytree(tiny.saved_model, copy)
    set_method_name(copy, "classify", "tensorflow/serving/predict")
    expected = r"breaks the serving contract: classify: method 'tensorflow/serving/predict', expected '.*/classify'"
    with pytest.raises(PackageError, match=expected):
        check_signatures(copy, len(tiny.labels))
    with pytest.raises(PackageError, match=r"outputs? 'scores' is DT_FLOAT\[None, 5\], expected DT_FLOAT\[None, 7\]"):
        check_signatures(tiny.saved_model, 7)


def test_missing_saved_model_is_explained(tmp_path):
    with pytest.raises(PackageError, match="is not a SavedModel: no saved_model.pb. Re-run the package stage."):
        read_signature_defs(tmp_path)


def test_fast_example_serialization_equals_protobuf():
    from tensorflow.core.example import example_pb2

    images = np.random.default_rng(5).random((6, 784), dtype=np.float32)
    images[2] = 0.0  # zeros still serialize packed, with the same header
    for row, serialized in zip(images, serialize_examples(images), strict=True):
        parsed = example_pb2.Example.FromString(serialized)
        np.testing.assert_array_equal(np.array(parsed.features.feature["images"].float_list.value, np.float32), row)
        expected = example_pb2.Example()
        expected.features.feature["images"].float_list.value.extend(row.tolist())
        assert serialized == expected.SerializeToString()
    assert serialize_examples(images[:0]) == []


def test_the_card_describes_the_signatures_the_saved_model_is_checked_against(tiny):
    from tensorflow.core.framework import types_pb2

    from export.card import card_signatures

    card = card_signatures(len(tiny.labels))
    stored = read_signature_defs(tiny.saved_model)
    for key, signature in card.items():
        assert stored[key].method_name == signature["method"]
        for side in ("inputs", "outputs"):
            found = getattr(stored[key], side)
            assert set(found) == set(signature[side])
            for name, text in signature[side].items():
                assert text.startswith(types_pb2.DataType.Name(found[name].dtype) + " [-1")


@pytest.mark.slow
def test_the_same_graph_packages_to_the_same_bytes_whatever_the_process_traced_before(tmp_path, tiny):
    """The same inputs give a byte-identical SavedModel (and so the same published hash): protobuf's map order,
    TensorFlow's random fingerprint uuid and its per-process numbering of traced functions are all fixed. The second
    build comes after the first traced its functions in this process, as a --stage all run's package stage comes
    after translate; TensorFlow numbers them from there, and the names must not show it."""
    import tensorflow as tf
    from tensorflow.core.protobuf import fingerprint_pb2, saved_model_pb2

    from crossport.files import sha256_path
    from export.servable import build_saved_model

    builds = [tmp_path / "a", tmp_path / "b"]
    build_saved_model(tiny.tf_graph, tuple(tiny.labels), builds[0])
    tf.function(lambda x: x + 1).get_concrete_function(tf.TensorSpec([None], tf.float32))  # the counter moves on
    build_saved_model(tiny.tf_graph, tuple(tiny.labels), builds[1])
    assert sha256_path(builds[0]) == sha256_path(builds[1])
    fingerprint = fingerprint_pb2.FingerprintDef.FromString((builds[0] / "fingerprint.pb").read_bytes())
    assert fingerprint.uuid and fingerprint.saved_model_checksum  # still a complete fingerprint
    proto = saved_model_pb2.SavedModel.FromString((builds[1] / "saved_model.pb").read_bytes())
    numbers = sorted(int(f.signature.name.rsplit("_", 1)[1]) for f in proto.meta_graphs[0].graph_def.library.function)
    assert numbers == list(range(len(numbers)))  # numbered by the build: 0, 1, 2, ...
    loaded = tf.saved_model.load(str(builds[1]))  # and every name it calls by is one it has
    images = np.zeros((2, 784), np.float32)
    assert loaded.signatures["serving_default"](images=images)["scores"].shape == (2, len(tiny.labels))


def test_every_signature_calls_the_translated_graph_itself_once(tiny):
    """predict_uint8 and classify call the graph directly, not through predict: every call op makes TensorFlow infer
    shapes through the whole graph it calls, so one nested call more was 26-50 ms of MobileNetV3-small's package
    stage per signature (export/servable.py, ``Servable.scores``)."""
    import re

    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((tiny.saved_model / "saved_model.pb").read_bytes())
    functions = {f.signature.name: f for f in proto.meta_graphs[0].graph_def.library.function}

    def calls(signature: str) -> list[str]:
        (body,) = (f for name, f in functions.items() if re.fullmatch(rf"__inference_{signature}_\d+", name))
        return [node.attr["f"].func.name for node in body.node_def if node.op.endswith("PartitionedCall")]

    called = {signature: calls(signature) for signature in ("predict", "predict_uint8", "classify")}
    assert all(len(callees) == 1 for callees in called.values()), called
    assert len({callees[0] for callees in called.values()}) == 1, called  # one function: the translated graph's
    assert not re.fullmatch(r"__inference_predict_\d+", called["classify"][0])


def test_a_saved_model_is_loaded_once_until_its_files_change(tiny, tmp_path):
    import shutil

    from crossport.runtimes import open_saved_model

    path = tmp_path / "model"
    shutil.copytree(tiny.saved_model, path)
    first = open_saved_model(path)
    assert open_saved_model(path) is first  # asked again (another signature, another stage): the same load
    shutil.rmtree(path)
    shutil.copytree(tiny.tf_graph, path)  # another SavedModel written where it was
    second = open_saved_model(path)
    assert second is not first
    assert "classify" in first.signatures and "classify" not in second.signatures


def test_a_stages_saved_model_loads_end_with_it(tiny, tmp_path):
    import weakref

    from crossport.runtimes import close_saved_models, open_saved_model
    from pipelines.config import PipelineConfig
    from pipelines.manifest import Manifest
    from pipelines.results import StageResult
    from pipelines.runner import run_stages
    from pipelines.stages import Stage
    from pipelines.tracking import NullTracker

    loads = []

    def loading(ctx):
        loads.append(weakref.ref(open_saved_model(tiny.saved_model)))
        return StageResult()

    manifest = Manifest.create(tmp_path, PipelineConfig().to_dict())
    run_stages(manifest, PipelineConfig(), (Stage("loading", (), (), loading),), NullTracker())
    assert loads[0]() is None  # not kept for the next stage, and its reference cycles collected
    assert close_saved_models() is False  # nothing left open
    assert open_saved_model(tiny.saved_model) is not None and close_saved_models() is True
