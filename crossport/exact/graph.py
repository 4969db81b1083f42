"""The exact reference of a model that arrived as an ONNX file: its graph as a chain of float64 layers.

A model trained elsewhere has no PyTorch original; its ONNX graph is the reference. The
graph (normalized to crossport's contract, :mod:`translation.onnx_import`) is read node by
node from ``images`` to ``logits`` into the same chain of layers :mod:`crossport.exact`
evaluates in float64 with its running float32 error bound, so the gate's derived
tolerances hold unchanged: the weights are the file's float32 initializers, the arithmetic
is the graph's, read by one reader per op (:data:`READERS`; each layer's error rule is in
:mod:`crossport.exact.rules`). Nodes off the chain that only compute shapes (Shape, Gather,
Concat, ...) are read through ONNX's shape inference. Any other op, or a graph that
branches, gets one line naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn  # imported only by the stages that compute exact references

from crossport.errors import CrossportError
from crossport.exact.layers import GlobalAveragePool, Permute, Reshape
from crossport.interface import INPUT, INPUT_SIZE, LOGITS

SHAPE_ONLY = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Constant", "Cast", "Slice", "ConstantOfShape")


@dataclass(frozen=True)
class ChainConfig:
    arch: str = "onnx"
    input_size: int = INPUT_SIZE


def _attrs(node) -> dict:
    from onnx import helper

    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def _refuse(node, why: str) -> CrossportError:
    return CrossportError(
        f"no float32 error model for node {node.name or node.output[0]!r} ({node.op_type}): {why}; the parity gate's "
        f"exact reference covers chains of {', '.join(READERS)}.",
        hint="Add a reader for the op to crossport/exact/graph.py and, for a new kind of layer, its rule to "
             "crossport/exact/rules.py (how it adds and passes on rounding error).")


@dataclass
class Chain:
    """What a reader sees of the graph: its constants, inferred shapes and the layers read so far."""

    constants: dict
    shapes: dict
    layers: list

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


# --- one reader per op: (node, its attributes, the chain so far) -> the layer it adds, or None ------------------

def _gemm(node, attrs, chain):
    w, b = chain.weight(node, 1), chain.weight(node, 2)
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise _refuse(node, "transA, alpha or beta other than the defaults")
    w = w if attrs.get("transB", 0) else w.T
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    layer.weight = param(w)
    if b is not None:
        layer.bias = param(np.broadcast_to(b, (w.shape[0],)))
    return layer


def _matmul(node, attrs, chain):
    w = chain.weight(node, 1)
    layer = nn.Linear(w.shape[0], w.shape[1], bias=False)
    layer.weight = param(w.T)
    return layer


def _add(node, attrs, chain):
    """Only as the bias of the MatMul before it: it completes that layer and adds none."""
    bias = chain.weight(node, 1)
    previous = chain.layers[-1] if chain.layers else None
    if not (isinstance(previous, nn.Linear) and previous.bias is None and bias.size == previous.out_features):
        raise _refuse(node, "an Add that is not the bias of the MatMul before it")
    previous.bias = param(bias.reshape(-1))
    return None


def _conv(node, attrs, chain):
    w, b = chain.weight(node, 1), chain.weight(node, 2)
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


def _batch_normalization(node, attrs, chain):

    scale, shift, mean, var = (chain.weight(node, i) for i in range(1, 5))
    rank = len(chain.shapes.get(node.input[0]) or [None] * 4)
    layer = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(len(scale), eps=attrs.get("epsilon", 1e-5))
    layer.weight, layer.bias = param(scale), param(shift)
    layer.running_mean = torch.from_numpy(mean.astype(np.float32))
    layer.running_var = torch.from_numpy(var.astype(np.float32))
    return layer.eval()


def _max_pool(node, attrs, chain):
    pads = list(attrs.get("pads", [0] * 4))
    if pads[:2] != pads[2:] or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _refuse(node, "auto_pad or asymmetric padding")
    kernel = tuple(attrs["kernel_shape"])
    return nn.MaxPool2d(kernel, stride=tuple(attrs.get("strides", kernel)), padding=tuple(pads[:2]),
                        dilation=tuple(attrs.get("dilations", [1, 1])), ceil_mode=bool(attrs.get("ceil_mode", 0)))


def _global_average_pool(node, attrs, chain):
    shape = chain.shapes.get(node.input[0])
    if not shape or len(shape) != 4 or None in shape[2:]:
        raise _refuse(node, "its input is not a 4-D tensor of known height and width")
    return GlobalAveragePool(shape[2] * shape[3])


def _reduce_mean(node, attrs, chain):
    """Over the spatial axes only (a network's head): a global average pool, flattened unless ``keepdims``."""
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:  # opset 18 takes the axes as an input
        axes = chain.constants.get(node.input[1])
    if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]:
        raise _refuse(node, "a ReduceMean over axes other than the spatial ones (2, 3)")
    pool = _global_average_pool(node, attrs, chain)
    return pool if attrs.get("keepdims", 1) else nn.Sequential(pool, nn.Flatten())


def _reshape(node, attrs, chain):
    target = chain.shapes.get(node.output[0])
    if not target or any(d is None for d in target[1:]):
        raise _refuse(node, "its output shape cannot be inferred")
    return Reshape(tuple(target[1:]))


def _transpose(node, attrs, chain):
    perm = tuple(attrs["perm"])
    if perm[0] != 0:
        raise _refuse(node, "a transpose that moves the batch dimension")
    return Permute(perm)


READERS = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _add,
    "Conv": _conv,
    "BatchNormalization": _batch_normalization,
    "Relu": lambda node, attrs, chain: nn.ReLU(),
    "Elu": lambda node, attrs, chain: nn.ELU(alpha=attrs.get("alpha", 1.0)),
    "LeakyRelu": lambda node, attrs, chain: nn.LeakyReLU(negative_slope=attrs.get("alpha", 0.01)),
    "Tanh": lambda node, attrs, chain: nn.Tanh(),
    "Sigmoid": lambda node, attrs, chain: nn.Sigmoid(),
    "MaxPool": _max_pool,
    "GlobalAveragePool": _global_average_pool,
    "ReduceMean": _reduce_mean,
    "Reshape": _reshape,
    "Flatten": _reshape,
    "Transpose": _transpose,
    "Identity": lambda node, attrs, chain: nn.Identity(),
    "Dropout": lambda node, attrs, chain: nn.Identity(),  # inference: the identity
}


def chain_from_onnx(model):
    """``model`` (onnx.ModelProto with input ``images`` and output ``logits``) as a torch ``nn.Sequential``."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
              for value in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chain = Chain(constants, shapes, [])
    current = INPUT
    while current != LOGITS:
        users = [node for node in consumers.get(current, []) if node.op_type not in SHAPE_ONLY]
        if len(users) != 1:
            raise CrossportError(
                f"tensor {current!r} feeds {len(users)} computing nodes; the exact reference covers graphs that are "
                "one chain of layers from 'images' to 'logits'.",
                hint="Branching graphs (residual blocks, several heads) are not supported yet.")
        node = users[0]
        reader = READERS.get(node.op_type)
        if reader is None:
            raise _refuse(node, "op not supported")
        layer = reader(node, _attrs(node), chain)
        if layer is not None:
            chain.layers.append(layer)
        current = node.output[0]
    network = nn.Sequential(*chain.layers).eval()
    network.config = ChainConfig()  # what training.model's counters read from a network
    return network


def exact_from_onnx(path, images):
    """The :class:`crossport.exact.Exact` of the ONNX file at ``path`` on float32 ``images`` [N, 784]."""
    import onnx

    from crossport.exact import exact_outputs

    return exact_outputs(chain_from_onnx(onnx.load(str(path), load_external_data=False)), images)


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


def check_chain(model, images, exact) -> float:
    """Prove the chain read the graph right: ONNX's own reference evaluator, run in float64, must agree.

    Both are float64 evaluations of the same sums, so each is within the float32 bound B
    scaled by float64's unit roundoff over float32's (2⁻²⁹) of the exact value; they may differ
    by twice that. Returns the largest |difference| / allowed; raises when it exceeds 1.
    """
    from onnx.reference import ReferenceEvaluator

    from crossport.exact import FLOAT32_TINY, U32

    (logits,) = ReferenceEvaluator(float64_model(model)).run([LOGITS], {INPUT: images.astype(np.float64)})
    allowed = 2 * (exact.bounds[LOGITS] - FLOAT32_TINY) * (2.0**-53 / U32) + np.finfo(np.float64).tiny
    ratio = float(np.max(np.abs(logits - exact.values[LOGITS]) / allowed))
    if not ratio <= 1.0:
        raise CrossportError(
            f"the exact reference read from the ONNX graph disagrees with onnx.reference in float64: logits differ "
            f"by {ratio:.3g} times the float64 rounding allowance.",
            hint="This is a bug in crossport/exact/graph.py; run with --debug and report the model.")
    return ratio
