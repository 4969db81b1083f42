"""The exact reference of a model that arrived as an ONNX file: its graph as a network of float64 layers.

A model trained elsewhere has no PyTorch original; its ONNX graph is the reference. The
graph (normalized to crossport's contract, :mod:`translation.onnx_import`) is read node by
node into the :class:`crossport.exact.network.Network` that :mod:`crossport.exact` evaluates
in float64 with its running float32 error bound, so the gate's derived tolerances hold
unchanged: the weights are the file's float32 initializers, the arithmetic is the graph's,
read by one reader per op (:data:`READERS`; each layer's error rule is in
:mod:`crossport.exact.rules`). A node is read when it computes on data (``images`` or what is
computed from it); nodes that only compute shapes or constants (Shape, Gather, ...) are
folded through ONNX's shape inference, and nodes the output does not depend on are dropped.
Any other op gets one line naming the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn  # imported only by the stages that compute exact references

from crossport.errors import CrossportError
from crossport.exact.layers import (
    Add,
    Concat,
    GlobalAveragePool,
    HardSigmoid,
    HardSwish,
    Mul,
    Pad,
    Permute,
    Reshape,
    Sub,
    WithConstant,
)
from crossport.exact.network import Network, Step
from crossport.interface import INPUT, INPUT_SIZE, LOGITS

SHAPES = ("Shape", "Size")  # read data but compute metadata: what depends on them is a constant of the graph


@dataclass(frozen=True)
class GraphConfig:
    arch: str = "onnx"
    input_shape: tuple[int, ...] = (INPUT_SIZE,)  # one example's, as the graph's input declares it


def _attrs(node) -> dict:
    from onnx import helper

    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def _refuse(node, why: str) -> CrossportError:
    return CrossportError(
        f"no float32 error model for node {node.name or node.output[0]!r} ({node.op_type}): {why}; the parity gate's "
        f"exact reference covers graphs of {', '.join(READERS)}.",
        hint="Add a reader for the op to crossport/exact/graph.py and, for a new kind of layer, its rule to "
             "crossport/exact/rules.py (how it adds and passes on rounding error).")


@dataclass
class Reading:
    """What a reader sees of the graph: its constants, inferred shapes, the steps read so far and which step wrote
    each tensor."""

    constants: dict
    shapes: dict
    steps: list
    writer: dict
    alias: dict  # a tensor folded into the step that wrote its input (a MatMul's bias Add) -> that step's output
    readers: dict  # tensor -> how many nodes the output depends on read it

    def data(self, name: str) -> str:
        return self.alias.get(name, name)

    def weight(self, node, index: int):
        """Input ``index`` of ``node`` as a float64 array (None if absent); it must be a constant."""

        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.constants:
            raise _refuse(node, f"input {name!r} is computed, not a constant weight")
        return self.constants[name].astype(np.float64)


def param(array) -> nn.Parameter:

    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), requires_grad=False)


# --- one reader per op: (node, its attributes, the reading so far) -> the layer it adds, or None ------------------

def _gemm(node, attrs, reading):
    w, b = reading.weight(node, 1), reading.weight(node, 2)
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise _refuse(node, "transA, alpha or beta other than the defaults")
    w = w if attrs.get("transB", 0) else w.T
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    layer.weight = param(w)
    if b is not None:
        layer.bias = param(np.broadcast_to(b, (w.shape[0],)))
    return layer


def _matmul(node, attrs, reading):
    w = reading.weight(node, 1)
    layer = nn.Linear(w.shape[0], w.shape[1], bias=False)
    layer.weight = param(w.T)
    return layer


def _elementwise(op: str, two: type):
    """Add, Sub, Mul, Div: of two computed tensors, a two-input step (``two``; None: refused); with a constant, a
    :class:`WithConstant` step, except an Add completing the MatMul that wrote its other operand, as that MatMul's
    bias (it adds no step)."""

    def read(node, attrs, reading):
        constant = [name in reading.constants for name in node.input]
        if not any(constant):
            if two is None:
                raise _refuse(node, f"a {node.op_type} of two computed tensors")
            return two()
        index = constant.index(True)
        value = reading.constants[node.input[index]].astype(np.float32)
        if op == "add" and _completes_matmul(node, value, index, reading):
            return None
        if index == 0 and op in ("sub", "div"):
            if op == "div":
                raise _refuse(node, "a constant divided by a computed tensor")
            return WithConstant("rsub", value)
        return WithConstant(op, value)

    return read


def _completes_matmul(node, bias, index, reading) -> bool:
    operand = reading.data(node.input[1 - index])
    step = reading.writer.get(operand)
    previous = step.layer if step else None
    if not (isinstance(previous, nn.Linear) and previous.bias is None and bias.size == previous.out_features
            and reading.readers.get(operand) == 1):  # the product read by anything else stays bias-free
        return False
    previous.bias = param(bias.reshape(-1))
    return True


def _clip(node, attrs, reading):
    """ReLU6 and friends: the bounds are attributes before opset 11, optional constant inputs after."""
    low = reading.weight(node, 1) if len(node.input) > 1 else attrs.get("min")
    high = reading.weight(node, 2) if len(node.input) > 2 else attrs.get("max")
    low = -math.inf if low is None else float(np.asarray(low))
    high = math.inf if high is None else float(np.asarray(high))
    return nn.Hardtanh(low, high)


def _concat(node, attrs, reading):
    if attrs["axis"] == 0:
        raise _refuse(node, "a Concat along the batch dimension")
    return Concat(attrs["axis"])


def _conv(node, attrs, reading):
    w, b = reading.weight(node, 1), reading.weight(node, 2)
    pads = list(attrs.get("pads", [0] * 4))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or w.ndim != 4 or pads[:2] != pads[2:]:
        raise _refuse(node, "auto_pad, asymmetric padding or a kernel that is not 2-D")
    layer = nn.Conv2d(w.shape[1] * attrs.get("group", 1), w.shape[0], tuple(w.shape[2:]),
                      stride=tuple(attrs.get("strides", [1, 1])), padding=tuple(pads[:2]),
                      dilation=tuple(attrs.get("dilations", [1, 1])), groups=attrs.get("group", 1),
                      bias=b is not None)
    layer.weight = param(w)
    if b is not None:
        layer.bias = param(b)
    return layer


def _batch_normalization(node, attrs, reading):

    scale, shift, mean, var = (reading.weight(node, i) for i in range(1, 5))
    rank = len(reading.shapes.get(node.input[0]) or [None] * 4)
    layer = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(len(scale), eps=attrs.get("epsilon", 1e-5))
    layer.weight, layer.bias = param(scale), param(shift)
    layer.running_mean = torch.from_numpy(mean.astype(np.float32))
    layer.running_var = torch.from_numpy(var.astype(np.float32))
    return layer.eval()


def _pool_window(node, attrs) -> dict:
    """A pool's kernel, stride and (symmetric, explicit) padding as PyTorch's pooling layers take them; ONNX's
    strides default to 1."""
    pads = list(attrs.get("pads", [0] * 4))
    if pads[:2] != pads[2:] or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _refuse(node, "auto_pad or asymmetric padding")
    return {"kernel_size": tuple(attrs["kernel_shape"]), "stride": tuple(attrs.get("strides", [1, 1])),
            "padding": tuple(pads[:2]), "ceil_mode": bool(attrs.get("ceil_mode", 0))}


def _max_pool(node, attrs, reading):
    return nn.MaxPool2d(**_pool_window(node, attrs), dilation=tuple(attrs.get("dilations", [1, 1])))


def _average_pool(node, attrs, reading):
    return nn.AvgPool2d(**_pool_window(node, attrs), count_include_pad=bool(attrs.get("count_include_pad", 0)))


def _pad(node, attrs, reading):
    """Constant padding of height and width ([N, C, H, W]), the pads an input from opset 11, an attribute before."""
    mode = attrs.get("mode", b"constant")
    pads = reading.weight(node, 1) if len(node.input) > 1 else attrs.get("pads")
    value = reading.weight(node, 2) if len(node.input) > 2 and node.input[2] else attrs.get("value", 0.0)
    pads = [int(p) for p in np.ravel(pads)]
    if mode not in (b"constant", "constant") or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)):
        raise _refuse(node, "a padding that is not constant, or that pads the batch or channels")
    return Pad((pads[3], pads[7], pads[2], pads[6]), float(np.asarray(value)))


def _global_average_pool(node, attrs, reading):
    shape = reading.shapes.get(node.input[0])
    if not shape or len(shape) != 4 or None in shape[2:]:
        raise _refuse(node, "its input is not a 4-D tensor of known height and width")
    return GlobalAveragePool(shape[2] * shape[3])


def _reduce_mean(node, attrs, reading):
    """Over the spatial axes only (a network's head): a global average pool, flattened unless ``keepdims``."""
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:  # opset 18 takes the axes as an input
        axes = reading.constants.get(node.input[1])
    if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]:
        raise _refuse(node, "a ReduceMean over axes other than the spatial ones (2, 3)")
    pool = _global_average_pool(node, attrs, reading)
    return GlobalAveragePool(pool.size, keepdims=bool(attrs.get("keepdims", 1)))


def _reshape(node, attrs, reading):
    target = reading.shapes.get(node.output[0])
    if not target or any(d is None for d in target[1:]):
        raise _refuse(node, "its output shape cannot be inferred")
    return Reshape(tuple(target[1:]))


def _transpose(node, attrs, reading):
    perm = tuple(attrs["perm"])
    if perm[0] != 0:
        raise _refuse(node, "a transpose that moves the batch dimension")
    return Permute(perm)


READERS = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _elementwise("add", Add),
    "Sub": _elementwise("sub", Sub),
    "Mul": _elementwise("mul", Mul),
    "Div": _elementwise("div", None),
    "Concat": _concat,
    "Clip": _clip,
    "HardSigmoid": lambda node, attrs, reading: HardSigmoid(attrs.get("alpha", 0.2), attrs.get("beta", 0.5)),
    "HardSwish": lambda node, attrs, reading: HardSwish(float(np.float32(1 / 6)), 0.5),  # its function body's
    "Conv": _conv,
    "BatchNormalization": _batch_normalization,
    "Relu": lambda node, attrs, reading: nn.ReLU(),
    "Elu": lambda node, attrs, reading: nn.ELU(alpha=attrs.get("alpha", 1.0)),
    "LeakyRelu": lambda node, attrs, reading: nn.LeakyReLU(negative_slope=attrs.get("alpha", 0.01)),
    "Tanh": lambda node, attrs, reading: nn.Tanh(),
    "Sigmoid": lambda node, attrs, reading: nn.Sigmoid(),
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "Pad": _pad,
    "GlobalAveragePool": _global_average_pool,
    "ReduceMean": _reduce_mean,
    "Reshape": _reshape,
    "Flatten": _reshape,
    "Squeeze": _reshape,
    "Unsqueeze": _reshape,
    "Transpose": _transpose,
    "Identity": lambda node, attrs, reading: nn.Identity(),
    "Dropout": lambda node, attrs, reading: nn.Identity(),  # inference: the identity
}


def network_from_onnx(model) -> Network:
    """``model`` (onnx.ModelProto with input ``images`` and output ``logits``) as a :class:`Network`."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
              for value in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        elif node.op_type == "Identity" and node.input[0] in constants:  # a weight shared under a second name
            constants[node.output[0]] = constants[node.input[0]]
    needed = _needed(model.graph.node, LOGITS)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        if node.output[0] in needed:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
    reading = Reading(constants, shapes, [], {}, {}, readers)
    data = {INPUT}
    for node in model.graph.node:
        if node.op_type in SHAPES or not any(name in data for name in node.input) or node.output[0] not in needed:
            continue  # a shape or constant computation, or a branch the output does not depend on
        reader = READERS.get(node.op_type)
        if reader is None:
            raise _refuse(node, "op not supported")
        layer = reader(node, _attrs(node), reading)
        data.add(node.output[0])
        if layer is None:  # folded into the step that wrote its input
            reading.alias[node.output[0]] = next(reading.data(name) for name in node.input if name in data)
            continue
        step = Step(layer, tuple(reading.data(name) for name in node.input if name in data), node.output[0])
        reading.steps.append(step)
        reading.writer[step.output] = step
    target = reading.data(LOGITS)
    if target not in data:
        raise CrossportError(f"'{LOGITS}' is not computed from '{INPUT}' in this graph.",
                             hint="The graph must compute its output from its image input.")
    declared = next((value for value in model.graph.input if value.name == INPUT), None)
    dims = [dim.dim_value for dim in declared.type.tensor_type.shape.dim[1:]] if declared is not None else []
    shape = tuple(dims) if dims and all(dims) else (INPUT_SIZE,)
    return Network(reading.steps, INPUT, target, GraphConfig(input_shape=shape))


def _needed(nodes, output: str) -> set[str]:
    """The tensors ``output`` depends on (itself included)."""
    writers = {name: node for node in nodes for name in node.output}
    needed, pending = set(), [output]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in writers:
            pending.extend(writers[name].input)
    return needed


def exact_from_onnx(path, images, bound: str | None = None):
    """The :class:`crossport.exact.Exact` of the ONNX file at ``path`` on float32 ``images`` [N, *shape] (``bound``:
    as :func:`crossport.exact.walks`)."""
    import onnx

    from crossport.exact import exact_outputs

    return exact_outputs(network_from_onnx(onnx.load(str(path), load_external_data=False)), images, bound=bound)


def float64_model(model):
    """A copy of ``model`` computing in float64: float initializers, constants, casts and I/O widened."""
    import onnx
    from onnx import TensorProto, numpy_helper

    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float64)))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.DOUBLE
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    return wide


READER_EXAMPLES = 8  # images check_network runs onnx.reference on


def check_network(model, images, exact) -> float:
    """Prove the network read the graph right: ONNX's own reference evaluator, run in float64, must agree.

    Both are float64 evaluations of the same sums, so each is within the float32 bound B
    scaled by float64's unit roundoff over float32's (2⁻²⁹) of the exact value; they may differ
    by twice that. Returns the largest |difference| / allowed; raises when it exceeds 1.

    It runs on the first :data:`READER_EXAMPLES` images: a graph read wrong computes another
    function, which shows on any image, and onnx.reference runs convolutions in Python (64
    images of a MobileNetV3 took 8 s of a 15 s import).
    """
    from onnx.reference import ReferenceEvaluator

    from crossport.exact import FLOAT32_TINY, U32

    first = slice(0, READER_EXAMPLES)
    (logits,) = ReferenceEvaluator(float64_model(model)).run([LOGITS], {INPUT: images[first].astype(np.float64)})
    allowed = 2 * (exact.bounds[LOGITS][first] - FLOAT32_TINY) * (2.0**-53 / U32) + np.finfo(np.float64).tiny
    ratio = float(np.max(np.abs(logits - exact.values[LOGITS][first]) / allowed))
    if not ratio <= 1.0:
        raise CrossportError(
            f"the exact reference read from the ONNX graph disagrees with onnx.reference in float64: logits differ "
            f"by {ratio:.3g} times the float64 rounding allowance.",
            hint="This is a bug in crossport/exact/graph.py; run with --debug and report the model.")
    return ratio
