"""Layout-friendly ONNX before onnx-tf: explicit "same" padding written as ``auto_pad``.

onnx-tf computes every Conv and MaxPool in NHWC (TensorFlow's CPU kernels have no NCHW
convolution) and wraps each in a Transpose pair; an explicit ``pads`` attribute becomes a
separate ``Pad`` op in NCHW *between* those transposes. The Pad stops TFLite's converter
from cancelling the Transpose that ends one block against the one that starts the next,
so every convolution keeps two. A stride-1 convolution whose pads are exactly what
``auto_pad="SAME_UPPER"`` gives (``(k-1)·d`` in total per axis, the extra one at the end)
computes the same sums on the same zeros when written with ``auto_pad``, which onnx-tf
translates to TensorFlow's ``padding="SAME"`` inside the convolution: no Pad op, and the
transposes between blocks meet and cancel. Nothing else is changed; parity is checked
on the result like on any translation.
"""

from __future__ import annotations


def same_padding(model) -> list[str]:
    """Rewrite, in place, stride-1 Conv/MaxPool nodes whose explicit pads equal SAME_UPPER; their names."""
    import onnx

    rewritten = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MaxPool", "AveragePool") or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        kernel = attrs.get("kernel_shape")
        pads = attrs.get("pads")
        if not kernel or not pads or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        rank = len(kernel)
        strides = attrs.get("strides", [1] * rank)
        dilations = attrs.get("dilations", [1] * rank)
        if any(s != 1 for s in strides) or attrs.get("ceil_mode", 0):
            continue  # with stride > 1 SAME's padding depends on the input size
        same = [((k - 1) * d) // 2 for k, d in zip(kernel, dilations, strict=True)]
        same += [(k - 1) * d - b for k, d, b in zip(kernel, dilations, same, strict=True)]
        if list(pads) != same or not any(same):
            continue
        kept = [attr for attr in node.attribute if attr.name not in ("pads", "auto_pad")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
        rewritten.append(node.name)
    return rewritten


def flatten_channels_last(model) -> list[str]:
    """Rewrite, in place, ``Reshape([-1, C·H·W]) → Gemm`` (or ``Flatten(axis=1) → Gemm``, as other exporters
    write it) on a 4-D [N, C, H, W] tensor to flatten channels-last.

    onnx-tf hands every pooled or convolved tensor back in NCHW, so flattening it in
    PyTorch's (channel-major) order costs TFLite a Transpose after the last convolution.
    Here the graph first transposes to NHWC, which cancels against onnx-tf's own NHWC→NCHW
    transpose, flattens in (h, w, c) order, and feeds a Gemm whose weight columns are
    permuted to match: the same products and sums, so the same answer. The flattened
    tensor is renamed (``.nhwc``), so the divergence finder never compares it with the
    original's channel-major one. Returns the rewritten Reshape nodes' names.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
              for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = {init.name: init for init in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten = []
    for node in list(model.graph.node):
        source = shapes.get(node.input[0]) if node.input else None  # a Constant has no input
        if not source or len(source) != 4 or None in source[1:]:
            continue
        if node.op_type == "Reshape" and node.input[1] in inits:
            flattens = numpy_helper.to_array(inits[node.input[1]]).tolist() == [-1, int(np.prod(source[1:]))]
        else:
            flattens = node.op_type == "Flatten" and all(a.i == 1 for a in node.attribute if a.name == "axis")
        users = consumers.get(node.output[0], [])
        if (not flattens or len(users) != 1 or users[0].op_type != "Gemm" or users[0].input[0] != node.output[0]
                or users[0].input[1] not in inits or len(consumers.get(users[0].input[1], [])) != 1):
            continue
        gemm = users[0]
        trans_b = next((attr.i for attr in gemm.attribute if attr.name == "transB"), 0)
        _, channels, height, width = source
        weight = numpy_helper.to_array(inits[gemm.input[1]])
        if trans_b:  # [out, C·H·W] → columns in (h, w, c) order
            permuted = weight.reshape(-1, channels, height, width).transpose(0, 2, 3, 1).reshape(weight.shape)
        else:  # [C·H·W, out] → rows in (h, w, c) order
            permuted = weight.reshape(channels, height, width, -1).transpose(1, 2, 0, 3).reshape(weight.shape)
        inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(permuted), gemm.input[1]))
        channels_last = f"{node.input[0]}.nhwc"
        transpose = helper.make_node("Transpose", [node.input[0]], [channels_last], name=f"{node.name}.nhwc",
                                     perm=[0, 2, 3, 1])
        flat = f"{node.output[0]}.nhwc"
        node.input[0] = channels_last
        node.output[0] = flat
        gemm.input[0] = flat
        where = next(i for i, candidate in enumerate(model.graph.node) if candidate is node)
        model.graph.node.insert(where, transpose)
        rewritten.append(node.name)
    return rewritten
