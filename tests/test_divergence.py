"""The divergence finder names the first ONNX node whose TF translation drifted."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from crossport.exact import gamma, lam
from tests import breakers
from translation.divergence import find_divergence, instrument
from translation.onnx_to_tf import translate


def test_translated_graph_exposes_every_intermediate_tensor(tiny):
    import tensorflow as tf

    model = onnx.load(str(tiny.onnx))
    outputs = tf.saved_model.load(str(tiny.tf_graph)).signatures["serving_default"].structured_outputs
    assert {node_output for node in model.graph.node for node_output in node.output} <= set(outputs)


def test_clean_translation_has_no_divergent_node(tiny, tiny_exact):
    divergence = find_divergence(onnx.load(str(tiny.onnx)), tiny.tf_graph, {"images": tiny.images},
                                 tiny_exact.network_gamma)
    assert divergence.first is None
    assert len(divergence.nodes) == len(onnx.load(str(tiny.onnx)).graph.node)
    assert "agree at all" in divergence.describe()


@pytest.mark.parametrize("breaker", [breakers.nudge_weight, breakers.swap_classes, breakers.transpose_inputs])
def test_first_divergent_node_is_named(tiny, tiny_exact, tmp_path, breaker):
    model = onnx.load(str(tiny.onnx))
    broken, culprit = breaker(model)
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    translate(tmp_path / "broken.onnx", tmp_path / "tf")
    divergence = find_divergence(model, tmp_path / "tf", {"images": tiny.images}, tiny_exact.network_gamma)
    assert divergence.first is not None
    assert divergence.first.node == culprit
    assert f"first divergent node: {culprit!r} (op Gemm" in divergence.describe()
    earlier = [diff for diff in divergence.nodes if diff.index < divergence.first.index]
    assert all(not diff.bound_exceeded for diff in earlier)


def conv_graph(bias: np.ndarray):
    """Not an MLP: Conv → Add → Mul → GlobalAveragePool, to show the finder is generic."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(bias.astype(np.float32), "b"),
        numpy_helper.from_array(np.float32(0.5).reshape(()), "half"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv", "b"], ["shifted"], name="add_bias"),
        helper.make_node("Mul", ["shifted", "half"], ["scaled"], name="scale"),
        helper.make_node("GlobalAveragePool", ["scaled"], ["y"], name="pool"),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_finder_works_on_other_graphs(tmp_path):
    bias = np.zeros((1, 4, 1, 1))
    reference = conv_graph(bias)
    drifted = conv_graph(bias + np.array([0, 0, 0.1, 0]).reshape(1, 4, 1, 1))
    onnx.save(drifted, str(tmp_path / "drifted.onnx"))
    translate(tmp_path / "drifted.onnx", tmp_path / "tf")
    x = np.random.default_rng(2).normal(size=(3, 1, 8, 8)).astype(np.float32)
    # the conv accumulates 9 products and a bias per output; 3 examples × 4 channels × 64 pixels
    network_gamma = gamma(10, lam(3 * 4 * 64, 10))
    divergence = find_divergence(reference, tmp_path / "tf", {"x": x}, network_gamma)
    assert [diff.node for diff in divergence.nodes] == ["conv", "add_bias", "scale", "pool"]
    assert divergence.first.node == "add_bias" and divergence.first.op_type == "Add"
    assert divergence.first.max_abs == pytest.approx(0.1, rel=1e-3)


def test_instrument_keeps_the_original_outputs_first(tiny):
    model = onnx.load(str(tiny.onnx))
    instrumented, taps = instrument(model)
    assert [o.name for o in instrumented.graph.output][:2] == ["scores", "logits"]
    assert [tap[3] for tap in taps] == [out for node in model.graph.node for out in node.output]
    onnx.checker.check_model(instrumented)
