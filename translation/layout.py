"""Explicit "same" padding written as ``auto_pad``, before onnx-tf.

A stride-1 convolution whose pads are exactly what ``auto_pad="SAME_UPPER"`` gives
(``(k-1)·d`` in total per axis, the extra one at the end) computes the same sums on the
same zeros when written with ``auto_pad``, which onnx-tf translates to TensorFlow's
``padding="SAME"`` inside the convolution. Any other explicit padding becomes a Pad op of
its own (channels last, :mod:`translation.channels_last`): one more op and one more copy
of the activation per convolution, which this rewrite saves. Nothing else is changed;
parity is checked on the result like on any translation.
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
