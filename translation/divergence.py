"""Find the first ONNX node whose output differs between ONNX Runtime and the TF translation.

The translate stage converts an *instrumented* copy of the ONNX graph: every node output
is also exposed as an extra graph output under its own tensor name (onnx-tf keeps any
name as a signature key). The TensorFlow graph therefore carries every intermediate
tensor, and so does ONNX Runtime when it runs the same instrumented graph. Comparing
them node by node, in the graph's topological order, names the first node that leaves
tolerance. Works for any graph onnx-tf translates.

It is a locator, not the gate: a tensor is out of tolerance when its difference exceeds
``2·γ·max|reference tensor|``, γ being the accumulated float32 error constant of the whole
network (``crossport.exact``), so two correct float32 evaluations of any prefix of the
graph stay inside it. It compares ONNX Runtime with the TensorFlow translation only: it
says nothing about the PyTorch → ONNX export, packaging or the TFLite conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from crossport.interface import PREDICT_KEY


@dataclass
class NodeDiff:
    index: int
    node: str
    op_type: str
    tensor: str
    max_abs: float
    bound_exceeded: bool
    shape_mismatch: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Divergence:
    nodes: list[NodeDiff]
    gamma: float

    @property
    def first(self) -> NodeDiff | None:
        return next((diff for diff in self.nodes if diff.bound_exceeded), None)

    def describe(self) -> str:
        first = self.first
        if first is None:
            return (f"ONNX Runtime and the TensorFlow translation agree at all {len(self.nodes)} intermediate "
                    "tensors, so the translation is not where it drifts")
        what = "shape differs" if first.shape_mismatch else f"max |Δ| {first.max_abs:.3g}"
        return (f"first divergent node: {first.node!r} (op {first.op_type}, output {first.tensor!r}, {what}, "
                f"tolerance 2·{self.gamma:.3g}·max|ref|)")

    def to_dict(self) -> dict:
        return {"gamma": self.gamma, "summary": self.describe(),
                "first": self.first.to_dict() if self.first else None, "nodes": [n.to_dict() for n in self.nodes]}


def instrument(model):
    """A copy of ``model`` whose every typed node output is also a graph output.

    Returns the copy and ``[(node_index, node_name, op_type, tensor_name)]`` in graph order.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {info.name: info.type for info in (*inferred.graph.value_info, *inferred.graph.output,
                                               *inferred.graph.input)}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    exposed = {output.name for output in model.graph.output}
    taps = []
    for index, node in enumerate(model.graph.node):
        for tensor in node.output:
            if not tensor or tensor not in types or not types[tensor].HasField("tensor_type"):
                continue  # optional outputs left empty, or untyped: nothing to compare
            if tensor not in exposed:
                value = copy.graph.output.add()
                value.name = tensor
                value.type.CopyFrom(types[tensor])
                exposed.add(tensor)
            taps.append((index, node.name or f"node_{index}", node.op_type, tensor))
    return copy, taps


def onnx_intermediates(instrumented, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from crossport.runtimes import onnx_session

    session = onnx_session(instrumented)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, images), strict=True))


def tf_intermediates(tf_graph_dir: Path, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    from crossport.runtimes import open_saved_model

    function = open_saved_model(tf_graph_dir).signatures[PREDICT_KEY]
    outputs = function(**{name: tf.constant(value) for name, value in images.items()})
    return {name: value.numpy() for name, value in outputs.items()}


def find_divergence(onnx_model, tf_graph_dir: Path, images: dict[str, np.ndarray], gamma: float) -> Divergence:
    """Compare every intermediate tensor of ``onnx_model`` (ORT) with the TF graph's.

    ``gamma``: the network's accumulated float32 error constant (Σ γ̃ over its layers).
    """
    instrumented, taps = instrument(onnx_model)
    reference = onnx_intermediates(instrumented, images)
    candidate = tf_intermediates(tf_graph_dir, images)
    diffs = []
    for index, node, op_type, tensor in taps:
        if tensor not in candidate:
            continue  # the TF graph was translated without this tap
        ref, cand = np.asarray(reference[tensor]), np.asarray(candidate[tensor])
        if ref.shape != cand.shape:
            diffs.append(NodeDiff(index, node, op_type, tensor, float("nan"), True, shape_mismatch=True))
            continue
        ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
        delta = np.abs(cand64 - ref64)
        allowed = 2.0 * gamma * float(np.max(np.abs(ref64))) if delta.size else 0.0
        exceeded = bool(np.any(~(delta <= allowed))) if delta.size else False
        diffs.append(NodeDiff(index, node, op_type, tensor, float(np.nanmax(delta)) if delta.size else 0.0, exceeded))
    return Divergence(diffs, gamma)
