"""Everything onnx-tf 1.10 (its last release, 2022) needs to run on TensorFlow 2.21.

Three facts, verified on the pinned stack (docs/stack.md):

1. onnx-tf imports ``onnx.mapping``, which onnx 1.19 removed: onnx stays pinned to 1.18.
2. onnx-tf imports ``tensorflow_probability`` at import time without declaring it; TFP 0.25
   in turn needs Keras 2, i.e. ``tf-keras``. Both are pinned in requirements.txt.
3. onnx-tf imports ``tensorflow_addons``, whose last release cannot be imported under Keras 3
   (``No module named 'keras.src.engine'``). onnx-tf uses it only for
   ``tfa.seq2seq.hardmax`` (the ONNX Hardmax op), so a stand-in module providing that one
   function is registered under that name before ``onnx_tf`` is imported.

:func:`import_onnx_tf` is the only way the project imports onnx-tf.
"""

from __future__ import annotations

import sys
import types

from crossport.errors import TranslationError

SHIM_MODULE = "tensorflow_addons"


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
    try:
        import tensorflow_probability  # noqa: F401  (onnx-tf imports it undeclared)
    except ImportError as error:
        raise TranslationError(
            f"onnx-tf imports tensorflow_probability, which failed to import: {error}.",
            hint="Install the pinned stack: make install (tensorflow-probability==0.25.0, tf-keras).",
        ) from error
    install_addons_shim()
    import onnx_tf
    import onnx_tf.backend

    return onnx_tf
