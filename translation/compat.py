"""Everything onnx-tf 1.10 (its last release, 2022) needs to run on TensorFlow 2.21.

Seven facts, verified on the pinned stack (docs/stack.md):

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

:func:`import_onnx_tf` is the only way the project imports onnx-tf.
"""

from __future__ import annotations

import contextlib
import sys
import types

from crossport.errors import TranslationError

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
