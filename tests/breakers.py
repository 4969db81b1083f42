"""Deliberate breakage of an ONNX graph, translated into a 'TF graph' that drifted.

Each returns a modified copy; the original model.onnx stays the reference, so the
translation of the copy plays a TensorFlow graph that no longer matches its ONNX source.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _initializer(model, name):
    return next(init for init in model.graph.initializer if init.name == name)


def _set(model, name, array):
    init = _initializer(model, name)
    init.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(init).dtype), name))


def gemm_nodes(model):
    return [node for node in model.graph.node if node.op_type == "Gemm"]


CENTRE_PIXEL = 14 * 28 + 14  # inked in most digits and letters; border pixels are always 0


def nudge_weight(model, delta: float = 0.5):
    """Add ``delta`` to the first Gemm's weight from the centre pixel to its first unit.

    Returns (copy, name of that node).
    """
    copy = _copy(model)
    node = gemm_nodes(copy)[0]
    trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
    weight = numpy_helper.to_array(_initializer(copy, node.input[1])).copy()
    weight[(0, CENTRE_PIXEL) if trans_b else (CENTRE_PIXEL, 0)] += delta
    _set(copy, node.input[1], weight)
    return copy, node.name


def swap_classes(model, a: int = 0, b: int = 1):
    """Swap two output classes in the last Gemm (weight rows and biases)."""
    copy = _copy(model)
    node = gemm_nodes(copy)[-1]
    trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
    weight = numpy_helper.to_array(_initializer(copy, node.input[1])).copy()
    bias = numpy_helper.to_array(_initializer(copy, node.input[2])).copy()
    if trans_b:
        weight[[a, b]] = weight[[b, a]]
    else:
        weight[:, [a, b]] = weight[:, [b, a]]
    bias[[a, b]] = bias[[b, a]]
    _set(copy, node.input[1], weight)
    _set(copy, node.input[2], bias)
    return copy, node.name


def transpose_inputs(model, input_name: str = "images"):
    """Feed the graph its 28×28 images transposed (what a wrong orientation does).

    A Gather of the 784 pixels in transposed order (Reshape/Transpose would need op
    versions onnx-tf lacks at opset 20).
    """
    copy = _copy(model)
    moved = f"{input_name}__transposed"
    for node in copy.graph.node:
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = moved
    order = np.arange(784, dtype=np.int64).reshape(28, 28).T.reshape(-1)
    copy.graph.initializer.append(numpy_helper.from_array(order, "transposed_order"))
    gather = helper.make_node("Gather", [input_name, "transposed_order"], [moved], name="transpose", axis=1)
    nodes = list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend([gather, *nodes])
    first_consumer = next(node.name for node in nodes if moved in node.input)
    return copy, first_consumer
