"""Everything onnx-tf 1.10 (its last release, 2022) needs to run on TensorFlow 2.21.

Eight facts, verified on the pinned stack (docs/stack.md):

1. onnx-tf imports ``onnx.mapping``, which onnx 1.19 removed: onnx stays pinned to 1.18.
2. onnx-tf imports ``tensorflow_probability`` at import time without declaring it; TFP 0.25
   in turn needs Keras 2, i.e. ``tf-keras``. Both are pinned in requirements.txt. onnx-tf uses it only in its
   Bernoulli handler (a random op no classifier serves), and importing it costs about a second of every
   translation, so it is imported only when a Bernoulli node is translated (:func:`deferred_probability`).
3. onnx-tf imports ``tensorflow_addons``, whose last release cannot be imported under Keras 3
   (``No module named 'keras.src.engine'``). onnx-tf uses it only for
   ``tfa.seq2seq.hardmax`` (the ONNX Hardmax op), so a stand-in module providing that one
   function is registered under that name before ``onnx_tf`` is imported.
4. ONNX raised some ops' versions only to admit bfloat16 (:data:`TYPE_ONLY_VERSIONS`); onnx-tf implements the
   versions before, which compute the same on float32, so each new version is registered as the one before it.
5. Every exporter writes a network's global average pool at opset 18 as a ReduceMean over the spatial axes (2, 3):
   :func:`spatial_means_as_pools` writes those as GlobalAveragePool, the op the channels-last rewrite
   (translation/channels_last.py) carries over to the channels-last twin.
6. Pad version 18 only added an optional ``axes`` input, and ReduceMean version 18 took its ``axes`` from an
   attribute to an input: :func:`register_opset_18` runs each with constant axes as TensorFlow's ``tf.pad`` and
   ``tf.reduce_mean``, as onnx-tf's earlier versions do (anything else stops with one line). The channels-last
   rewrite (translation/channels_last.py) writes both at the model's opset.
7. onnx-tf writes HardSwish as ``x · max(0, min(1, x/6 + 1/2))``, which the TFLite converter keeps as four ops (a
   multiply, an add, a clip, a multiply). It recognises TensorFlow's own form, ``x · relu6(x + 3) · 1/6``, as its
   one HARD_SWISH kernel: :func:`register_hard_swish` translates it so. The same function, rounded within the gate's
   HardSwish rule (crossport.exact.rules: three roundings, and 1/6 as a float32 number); on a MobileNetV3-small
   the float32 file ran 0.344 ms at batch 1 instead of 0.380, its full int8 file 0.492 ms instead of 0.713 with half
   the largest error (docs/benchmark.md).
8. onnx-tf's Conv lays its weights out for TensorFlow in the graph (a Transpose, a Split into groups, a
   concatenation after) and wraps the convolution in a Transpose pair; the channels-last rewrite
   (translation/channels_last.py) wraps it in a second, inverse pair, which TFLite's converter cancels. With
   constant weights, :func:`register_layout` lays them out once before the trace, and a Transpose that undoes the
   one its input came from is that one's input: MobileNetV3-small's translated function went from 1,198 nodes
   (262 Transposes) to 626, of which 2 Transposes are still read. The same convolutions on the same values: the
   TFLite files are the same bytes. TensorFlow's own graph optimizer now fuses what the Transposes kept apart,
   which rounds differently (up to 1.7e-6 on its scores, within the gate's bound) and runs its SavedModel 16 %
   faster. Its depthwise test reads the weights: onnx-tf's took a grouped Conv whose input channels the trace
   did not know for a depthwise one, and failed on its shape. onnx-tf's Gemm transposed constant weights on every
   call, multiplied by alpha and beta of 1 and flattened a 2-D input again; crossport's does each once, before the
   trace, or not at all (the MLP's SavedModel: 1.3 instead of 1.7 ms a batch of 128, the same outputs).

:func:`import_onnx_tf` is the only way the project imports onnx-tf.
"""

from __future__ import annotations

import contextlib
import sys
import types

from crossport.errors import TranslationError
from translation.channels_last import TO_NCHW, TO_NHWC

SHIM_MODULE = "tensorflow_addons"
# op → (the version that only added bfloat16, the version before it, which onnx-tf implements)
TYPE_ONLY_VERSIONS = {"LeakyRelu": (16, 6), "PRelu": (16, 9)}


def hardmax(logits, name=None):
    """ONNX Hardmax along the last axis: one-hot of the first maximum, same dtype as the input."""
    import tensorflow as tf

    with tf.name_scope(name or "hardmax"):
        depth = tf.shape(logits)[-1]
        return tf.one_hot(tf.argmax(logits, axis=-1), depth, dtype=logits.dtype)


def install_addons_shim() -> types.ModuleType:
    """Register the ``tensorflow_addons`` stand-in (idempotent) and return it."""
    existing = sys.modules.get(SHIM_MODULE)
    if existing is not None and getattr(existing, "__crossport_shim__", False):
        return existing
    shim = types.ModuleType(SHIM_MODULE, "crossport stand-in for tensorflow_addons (seq2seq.hardmax only)")
    shim.__crossport_shim__ = True
    shim.seq2seq = types.SimpleNamespace(hardmax=hardmax)
    sys.modules[SHIM_MODULE] = shim
    return shim


def import_onnx_tf():
    """Import ``onnx_tf`` with the shim in place, turning each known failure into one clear line."""
    import onnx

    if not hasattr(onnx, "mapping"):
        raise TranslationError(
            f"onnx-tf needs onnx.mapping, which onnx {onnx.__version__} no longer has (removed in 1.19).",
            hint="Install the pinned stack: make install (onnx==1.18.0).",
        )
    install_addons_shim()
    with deferred_probability():
        import onnx_tf
        import onnx_tf.backend

    register_type_only_versions()
    register_opset_18()
    register_hard_swish()
    register_layout()
    return onnx_tf


class _Distributions(types.ModuleType):
    """``tensorflow_probability.distributions`` as onnx-tf's Bernoulli handler holds it: the real module is imported
    when the handler first reads from it."""

    def __getattr__(self, name):
        if name.startswith("__"):  # what introspection asks of any module: not a reason to import the real one
            raise AttributeError(name)
        try:
            from tensorflow_probability import distributions
        except ImportError as error:
            raise TranslationError(
                f"onnx-tf translates Bernoulli with tensorflow_probability, which failed to import: {error}.",
                hint="Install the pinned stack: make install (tensorflow-probability==0.25.0, tf-keras).",
            ) from error
        return getattr(distributions, name)


PROBABILITY = "tensorflow_probability"


@contextlib.contextmanager
def deferred_probability():
    """While inside (onnx-tf's import), ``tensorflow_probability`` is a stand-in whose ``distributions`` imports the
    real one on first use; afterwards the name is the real package again for anyone who imports it."""
    if PROBABILITY in sys.modules:  # already imported: onnx-tf may as well take the real one
        yield
        return
    stand_in = types.ModuleType(PROBABILITY, "crossport: tensorflow_probability, imported on first use")
    stand_in.distributions = _Distributions(f"{PROBABILITY}.distributions")
    sys.modules[PROBABILITY] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(PROBABILITY) is stand_in:
            del sys.modules[PROBABILITY]


@contextlib.contextmanager
def traced_without_autograph():
    """While inside, onnx-tf traces its module without autograph.

    onnx-tf's module is a ``tf.function``, so tracing it first has autograph rewrite the
    source of every handler it calls: 2.3 s of a small CNN's 2.5 s translation, 3.9 s of a
    MobileNetV3's 4.8. The handlers build TensorFlow ops from attributes and static shapes,
    with no Python control flow on tensor values, so the traced graph is the same without it
    (bit-identical outputs, tests/test_translate.py); :func:`translation.onnx_to_tf.translate`
    traces again with autograph should a handler ever need it.
    """
    import tensorflow as tf
    from onnx_tf.backend_tf_module import BackendTFModule

    traced = BackendTFModule.__dict__["__call__"]
    BackendTFModule.__call__ = tf.function(traced.python_function, autograph=False)
    try:
        yield
    finally:
        BackendTFModule.__call__ = traced


def register_type_only_versions() -> None:
    """onnx-tf's handler for each op of :data:`TYPE_ONLY_VERSIONS` runs the version before for the new one."""
    from onnx_tf.common.handler_helper import get_all_backend_handlers

    handlers = get_all_backend_handlers({"": max(new for new, _ in TYPE_ONLY_VERSIONS.values())})[""]
    for op, (new, before) in TYPE_ONLY_VERSIONS.items():
        handler = handlers[op]
        if not hasattr(handler, f"version_{new}"):
            setattr(handler, f"version_{new}", getattr(handler, f"version_{before}"))


def spatial_means_as_pools(model) -> list[str]:
    """Rewrite, in place, each ReduceMean over a 4-D tensor's spatial axes (2, 3) with constant axes as
    GlobalAveragePool (then Flatten when it drops them): the same mean, in an op onnx-tf translates at any opset.
    Returns the rewritten nodes' names."""
    import numpy as np
    from onnx import helper, numpy_helper, shape_inference

    if not any(node.op_type == "ReduceMean" for node in model.graph.node):
        return []  # the common case: no shape inference to pay for
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    constants.update({node.output[0]: numpy_helper.to_array(attr.t) for node in model.graph.node
                      if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"})
    ranks = {value.name: len(value.type.tensor_type.shape.dim)
             for value in (*shape_inference.infer_shapes(model).graph.value_info, *model.graph.input)}
    rewritten, nodes = [], []
    for node in model.graph.node:
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        axes = attrs.get("axes", constants.get(node.input[1]) if len(node.input) > 1 else None)
        if (node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or axes is None
                or ranks.get(node.input[0]) != 4 or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]):
            nodes.append(node)
            continue
        name = node.name or node.output[0]
        if attrs.get("keepdims", 1):
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], [node.output[0]], name=name))
        else:
            pooled = f"{node.output[0]}.pooled"
            nodes += [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=name),
                      helper.make_node("Flatten", [pooled], [node.output[0]], name=f"{name}.flatten", axis=1)]
        rewritten.append(name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def register_opset_18() -> None:
    """onnx-tf handlers for Pad and ReduceMean version 18, each with constant axes (item 6 of the module's list)."""
    from onnx_tf.common.handler_helper import get_all_backend_handlers

    handlers = get_all_backend_handlers({"": 18})[""]
    for op, version_18 in (("Pad", _pad_18), ("ReduceMean", _reduce_mean_18)):
        if not hasattr(handlers[op], "version_18"):
            handlers[op].version_18 = classmethod(version_18)


def _pad_18(cls, node, **kwargs):
    import tensorflow as tf

    if len(node.inputs) > 3 and node.inputs[3]:
        raise TranslationError(f"Pad node {node.name!r} pads only the axes {node.inputs[3]!r}; onnx-tf translates "
                               "a Pad of every axis.", hint="Export the model with a Pad of every axis.")
    tensors = kwargs["tensor_dict"]
    pads = tf.get_static_value(tensors[node.inputs[1]])
    if pads is None or (pads < 0).any() or node.attrs.get("mode", "constant") != "constant":
        return cls.version_13(node, **kwargs)
    # constant, non-negative zero padding: tf.pad itself (version 13 traces a tf.cond with a slice for negative
    # pads, which fails on a small static map)
    value = tensors[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else 0
    return [tf.pad(tensors[node.inputs[0]], pads.reshape(2, -1).T, constant_values=value)]


def _reduce_mean_18(cls, node, **kwargs):
    import tensorflow as tf

    tensors = kwargs["tensor_dict"]
    x = tensors[node.inputs[0]]
    axes = tf.get_static_value(tensors[node.inputs[1]]) if len(node.inputs) > 1 and node.inputs[1] else None
    if len(node.inputs) > 1 and node.inputs[1] and axes is None:
        raise TranslationError(f"ReduceMean node {node.name!r} computes its axes; onnx-tf translates constant axes.",
                               hint="Export the model with constant reduction axes.")
    if axes is None and node.attrs.get("noop_with_empty_axes", 0):
        return [tf.identity(x)]
    axis = None if axes is None else [int(a) for a in axes.ravel()]
    return [tf.reduce_mean(x, axis=axis, keepdims=bool(node.attrs.get("keepdims", 1)))]


def register_hard_swish() -> None:
    """onnx-tf's HardSwish (version 14, the only one) as TensorFlow's own form (item 7 of the module's list)."""
    from onnx_tf.common.handler_helper import get_all_backend_handlers

    get_all_backend_handlers({"": 14})[""]["HardSwish"].version_14 = classmethod(_hard_swish_14)


def _hard_swish_14(cls, node, **kwargs):
    import tensorflow as tf

    x = kwargs["tensor_dict"][node.inputs[0]]
    return [x * tf.nn.relu6(x + 3) * (1 / 6)]


def register_layout() -> None:
    """onnx-tf's Conv, Gemm and Transpose with the layout work done once (item 8 of the module's list)."""
    from onnx_tf.common.handler_helper import get_all_backend_handlers

    handlers = get_all_backend_handlers({"": 13})[""]
    for op, versions, handler in (("Conv", (1, 11), _conv), ("Transpose", (1, 13), _transpose),
                                  ("Gemm", (1, 6, 7, 9, 11, 13), _gemm)):
        for version in versions:
            setattr(handlers[op], f"version_{version}", classmethod(handler))


def _undone(tensor, perm):
    """The tensor that ``tensor`` was made from by a Transpose by ``perm`` in this trace, else None: a Transpose by
    perm's inverse gives it back, value for value."""
    import tensorflow as tf

    op = getattr(tensor, "op", None)  # an eager tensor (a constant) has none
    if op is None or op.type != "Transpose":
        return None
    made_by = tf.get_static_value(op.inputs[1])
    return op.inputs[0] if made_by is not None and [int(i) for i in made_by] == list(perm) else None


def _transpose(cls, node, **kwargs):
    """A Transpose that undoes the one its input came from is that one's input (the channels-last rewrite's pairs
    around each convolution, translation/channels_last.py); any other, onnx-tf's."""
    import numpy as np

    perm = node.attrs.get("perm")
    if perm is not None:
        source = _undone(kwargs["tensor_dict"][node.inputs[0]], [int(i) for i in np.argsort(perm)])
        if source is not None:
            return [source]
    return [cls.make_tensor_from_onnx_node(node, **kwargs)]


def _conv(cls, node, **kwargs):
    """A 2-D Conv with weights known before the trace: onnx-tf's convolution (one group, depthwise, or one
    convolution per group joined), its weights laid out for TensorFlow once ([KH, KW, C/group, M], depthwise
    [KH, KW, C, M/C]) rather than by a Transpose, Split and concatenation in the graph, and its input taken
    channels last where it was transposed from channels last. Depthwise is read from the weights (one input channel
    a group): onnx-tf reads it from the input's channels and, where the trace does not know them, takes any grouped
    Conv for a depthwise one (a wrong shape). Any other Conv, onnx-tf's own."""
    import tensorflow as tf
    from onnx_tf.handlers.backend.pad_mixin import PadMixin
    from tensorflow.python.framework.ops import EagerTensor

    tensors = kwargs["tensor_dict"]
    x, weights = tensors[node.inputs[0]], tensors[node.inputs[1]]
    pad = node.attrs.get("auto_pad", "NOTSET")
    group = node.attrs.get("group", 1)
    shape = weights.shape.as_list() if isinstance(weights, EagerTensor) else None
    if x.shape.rank != 4 or shape is None or len(shape) != 4 or pad not in ("NOTSET", "SAME_UPPER", "VALID"):
        return cls.conv(node, tensors)
    depthwise = group != 1 and shape[1] == 1
    with tf.init_scope():  # computed now, captured by the trace as the weights are
        kernel = tf.transpose(weights, [2, 3, 1, 0])
        kernels = ([tf.reshape(kernel, [shape[2], shape[3], group, shape[0] // group])] if depthwise
                   else tf.split(kernel, group, axis=-1))
    pads = node.attrs.get("pads", [0, 0, 0, 0])
    explicit = pad == "NOTSET" and any(pads)
    channels_last = _undone(x, TO_NCHW)
    if channels_last is None:  # as onnx-tf: padded channels first, then transposed
        channels_last = tf.transpose(PadMixin.get_padding_as_op(x, pads) if explicit else x, TO_NHWC)
    elif explicit:  # ONNX's [top, left, bottom, right] on the channels-last twin: the same zeros
        channels_last = tf.pad(channels_last, [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]])
    padding = {"NOTSET": "VALID", "SAME_UPPER": "SAME", "VALID": "VALID"}[pad]
    strides, dilations = node.attrs.get("strides", [1, 1]), node.attrs.get("dilations", [1, 1])
    if depthwise:
        y = tf.nn.depthwise_conv2d(channels_last, kernels[0], padding=padding, strides=[1, *strides, 1],
                                   dilations=dilations, data_format="NHWC")
    else:
        parts = [channels_last] if group == 1 else tf.split(channels_last, group, axis=-1)
        convolved = [tf.nn.convolution(part, part_kernel, padding=padding, strides=strides, dilations=dilations,
                                       data_format="NHWC") for part, part_kernel in zip(parts, kernels, strict=True)]
        y = convolved[0] if group == 1 else tf.concat(convolved, axis=-1)
    if len(node.inputs) > 2 and node.inputs[2]:
        y = tf.add(y, tensors[node.inputs[2]])
    return [tf.transpose(y, TO_NCHW)]


def _gemm(cls, node, **kwargs):
    """A float32 Gemm of a 2-D input by constant weights: onnx-tf's ``alpha·(A·B) + beta·C``, with B transposed (for
    ``transB``) and beta·C computed once before the trace, and the multiplications by an alpha or beta of 1 left
    out (each exact); any other Gemm, onnx-tf's own."""
    import tensorflow as tf
    from tensorflow.python.framework.ops import EagerTensor

    tensors = kwargs["tensor_dict"]
    x, weights = tensors[node.inputs[0]], tensors[node.inputs[1]]
    bias = tensors[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else None
    if (x.dtype != tf.float32 or x.shape.rank != 2 or node.attrs.get("transA", 0)
            or not isinstance(weights, EagerTensor) or weights.dtype != tf.float32
            or not (bias is None or (isinstance(bias, EagerTensor) and bias.dtype == tf.float32))):
        return cls._common(node, **kwargs)
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    with tf.init_scope():  # computed now, captured by the trace as the weights are
        kernel = tf.transpose(weights) if node.attrs.get("transB", 0) else weights
        if bias is not None and beta != 1.0:
            bias = beta * bias
    y = tf.matmul(x, kernel)
    if alpha != 1.0:
        y = alpha * y
    return [y if bias is None else y + bias]
