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
    order = np.arange(784, dtype=np.int64).reshape(28, 28).T.reshape(-1)
    return _gather_inputs(_copy(model), input_name, order, "transpose")


def _gather_inputs(copy, input_name: str, order: np.ndarray, name: str):
    """Reorder the 784 input pixels by ``order`` with a Gather in front of the graph."""
    moved = f"{input_name}__{name}"
    for node in copy.graph.node:
        for i, value in enumerate(node.input):
            if value == input_name:
                node.input[i] = moved
    copy.graph.initializer.append(numpy_helper.from_array(order, f"{name}_order"))
    gather = helper.make_node("Gather", [input_name, f"{name}_order"], [moved], name=name, axis=1)
    nodes = list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend([gather, *nodes])
    first_consumer = next(node.name for node in nodes if moved in node.input)
    return copy, first_consumer


# --- subtle faults: each changes the numbers by far less than the round-1 thresholds noticed at scale ---


def scale_hidden_unit(model, factor: float = 1 + 1e-3):
    """Scale one first-layer hidden unit's incoming weights and bias by ``factor`` (a Gemm's unit, or a Conv's
    output channel).

    The unit picked is the one with the largest summed incoming weight, so it is active on
    most inked images (a unit that never fires would change nothing).
    """
    copy = _copy(model)
    node = next(node for node in copy.graph.node if node.op_type in ("Gemm", "Conv"))
    return copy, _scale_unit(copy, node, factor)


def depthwise_conv(model):
    """The first depthwise convolution (one group per input channel, more than one), or None."""
    for node in model.graph.node:
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and numpy_helper.to_array(_initializer(model, node.input[1])).shape[
                1] == 1:
            return node
    return None


def residual_conv(model):
    """The first convolution whose output an Add sums with another tensor (a residual block's branch), or None."""
    made_by = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        if node.op_type == "Add":
            branch = next((made_by[name] for name in node.input if made_by.get(name) is not None
                           and made_by[name].op_type == "Conv"), None)
            if branch is not None:
                return branch
    return None


def scale_depthwise_channel(model, factor: float = 1 + 1e-3):
    """Scale one channel of the first depthwise convolution (its 3×3 or 5×5 filter and bias) by ``factor``."""
    copy = _copy(model)
    node = depthwise_conv(copy)
    return copy, _scale_unit(copy, node, factor)


def scale_residual_branch(model, factor: float = 1 + 1e-3):
    """Scale one output channel of the first residual branch's last convolution (the one an Add sums with the
    block's input) by ``factor``."""
    copy = _copy(model)
    node = residual_conv(copy)
    return copy, _scale_unit(copy, node, factor)


def _scale_unit(copy, node, factor: float) -> str:
    """Scale the unit of ``node`` (a Gemm or Conv in ``copy``) with the largest summed incoming weight, its bias
    too; returns the node's name."""
    outputs_first = node.op_type == "Conv" or next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
    weight = numpy_helper.to_array(_initializer(copy, node.input[1])).copy()
    rows = weight if outputs_first else weight.T  # a view: one row per unit
    unit = int(np.argmax(rows.reshape(len(rows), -1).sum(axis=1)))
    rows[unit] *= factor
    _set(copy, node.input[1], weight)
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(_initializer(copy, node.input[2])).copy()
        bias[unit] *= factor
        _set(copy, node.input[2], bias)
    return node.name


def shift_class_bias(model, delta: float = 1e-4, klass: int = 0):
    """Add ``delta`` to one class's output bias (last Gemm)."""
    copy = _copy(model)
    node = gemm_nodes(copy)[-1]
    bias = numpy_helper.to_array(_initializer(copy, node.input[2])).copy()
    bias[klass] += delta
    _set(copy, node.input[2], bias)
    return copy, node.name


def round_weights_to_bfloat16(model):
    """Every float initializer rounded to bfloat16 (round to nearest even) and stored back as float32."""
    copy = _copy(model)
    for init in copy.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype != np.float32:
            continue
        bits = array.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        init.CopyFrom(numpy_helper.from_array(rounded.view(np.float32), init.name))
    return copy, gemm_nodes(copy)[0].name


def shift_inputs_one_pixel(model, input_name: str = "images"):
    """Feed the graph its 28×28 images moved by one pixel (a preprocessing off-by-one)."""
    copy = _copy(model)
    order = np.roll(np.arange(784, dtype=np.int64).reshape(28, 28), 1, axis=1).reshape(-1)
    return _gather_inputs(copy, input_name, order, "shift_one_pixel")
