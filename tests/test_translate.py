import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from crossport.errors import TranslationError
from crossport.parity import compare
from crossport.runtimes import load_onnx, load_saved_model
from pipelines.gate import ONNX, SM_PREDICT, hop_spec
from translation import compat
from translation.onnx_to_tf import translate, unsupported_ops


def test_translated_graph_matches_onnx_runtime(tiny, tiny_exact):
    reference, candidate = load_onnx(tiny.onnx)(tiny.images), load_saved_model(tiny.tf_graph)(tiny.images)
    result = compare(hop_spec(ONNX, SM_PREDICT), reference, candidate, bounds=tiny_exact.bounds)
    assert result.passed, result.failures


def test_addons_shim_stands_in_for_tensorflow_addons():
    import sys

    compat.import_onnx_tf()
    shim = sys.modules["tensorflow_addons"]
    assert getattr(shim, "__crossport_shim__", False), "the real tensorflow_addons must never be imported"
    assert compat.install_addons_shim() is shim  # idempotent


def test_hardmax_through_onnx_tf_matches_onnx_runtime(tmp_path):
    """The only op onnx-tf takes from tensorflow_addons; the shim must reproduce ONNX Hardmax."""
    node = helper.make_node("Hardmax", ["x"], ["y"], axis=-1)
    graph = helper.make_graph(
        [node], "hardmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "hardmax.onnx"
    onnx.save(model, str(path))

    x = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)
    x[0] = [1, 3, 3, 0, 0, 0]  # ties: ONNX picks the first maximum
    import onnxruntime as ort

    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    translate(path, tmp_path / "tf")
    import tensorflow as tf

    got = tf.saved_model.load(str(tmp_path / "tf")).signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    np.testing.assert_array_equal(got, expected)


def test_unsupported_op_is_named(tmp_path, tiny):
    model = onnx.load(str(tiny.onnx))
    model.graph.node[-1].op_type = "NotARealOp"
    assert unsupported_ops(model) == {"NotARealOp": model.graph.node[-1].name or model.graph.node[-1].output[0]}
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    with pytest.raises(TranslationError, match=r"op\(s\) onnx-tf cannot translate: NotARealOp \(node '.+'\)"):
        translate(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_onnx_without_mapping_is_explained(monkeypatch):
    monkeypatch.delattr(onnx, "mapping", raising=False)
    with pytest.raises(TranslationError, match=r"needs onnx.mapping.*make install \(onnx==1.18.0\)"):
        compat.import_onnx_tf()
