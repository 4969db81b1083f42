"""Where the layout changes are: the Transpose ops in a TensorFlow graph and in a TFLite file.

PyTorch and ONNX compute convolutions channels-first (NCHW), TensorFlow's CPU kernels and
TFLite channels-last (NHWC); onnx-tf bridges the two with Transpose ops around each
convolution and pooling. Every Transpose is pure cost (a copy of the whole activation);
:mod:`translation.channels_last` rewrites the graph so TFLite cancels them all for the
registry's architectures. These functions count what is left so the tflite stage, the card
and the benchmark can report it and a test can hold the placement.
"""

from __future__ import annotations

from pathlib import Path

CONVOLUTIONS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput"})
TRANSPOSES = frozenset({"TRANSPOSE", "Transpose"})


def tflite_ops(path: Path) -> list[str]:
    """The op names of a TFLite file's main subgraph, in execution order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return [detail["op_name"] for detail in sorted(interpreter._get_ops_details(), key=lambda d: d["index"])]


def saved_model_ops(path: Path, signature: str = "serving_default") -> list[str]:
    """The op types a SavedModel signature runs: its graph and every function it calls (in graph order)."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(path)).signatures[signature].graph.as_graph_def()
    ops = [node.op for node in graph.node]
    for function in graph.library.function:
        ops += [node.op for node in function.node_def]
    return ops


def placement(ops: list[str]) -> dict:
    """Transposes in all, before the first convolution, between the first and last, and after the last."""
    convs = [i for i, op in enumerate(ops) if op in CONVOLUTIONS]
    transposes = [i for i, op in enumerate(ops) if op in TRANSPOSES]
    first, last = (convs[0], convs[-1]) if convs else (len(ops), -1)
    return {"transposes": len(transposes), "convolutions": len(convs),
            "before_first_conv": sum(i < first for i in transposes),
            "between_convs": sum(first < i < last for i in transposes),
            "after_last_conv": sum(i > last for i in transposes) if convs else 0}
