"""ONNX → TensorFlow graph with onnx-tf, written as a SavedModel directory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from crossport.errors import TranslationError
from translation.compat import import_onnx_tf

log = logging.getLogger(__name__)


def translate(onnx_path: Path, out_dir: Path, *, expose_intermediates: bool = True) -> None:
    """Translate ``onnx_path`` into a TensorFlow SavedModel at ``out_dir`` (replaced if present).

    With ``expose_intermediates`` the graph also returns every node output under its tensor
    name (see :mod:`translation.divergence`), so a drift can be traced to a node.
    """
    import onnx

    import_onnx_tf()
    from onnx_tf.backend import prepare

    model = onnx.load(str(onnx_path))
    unsupported = unsupported_ops(model)
    if unsupported:
        raise TranslationError(
            f"{onnx_path} uses ONNX op(s) onnx-tf cannot translate: {', '.join(sorted(unsupported))}.",
            hint="Change the PyTorch model to avoid them, or export with a different opset.",
        )
    from translation.layout import flatten_channels_last, same_padding

    # layout rewrites that keep the arithmetic and let TFLite cancel onnx-tf's transposes
    padded, flattened = same_padding(model), flatten_channels_last(model)
    if padded or flattened:
        log.info("layout: padding written as auto_pad SAME_UPPER on %s; channels-last flatten before %s",
                 ", ".join(padded) or "no node", ", ".join(flattened) or "no node")
    if expose_intermediates:
        from translation.divergence import instrument

        model, _ = instrument(model)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        prepare(model).export_graph(str(out_dir))
    except Exception as error:  # onnx-tf raises bare Exceptions, TF raises many types
        shutil.rmtree(out_dir, ignore_errors=True)
        raise TranslationError(f"onnx-tf could not translate {onnx_path}: {error}.") from error


def unsupported_ops(model) -> set[str]:
    """Ops in ``model``'s main graph that onnx-tf cannot translate at the model's opset.

    onnx-tf has a handler class per op with one ``version_<N>`` method per ONNX op version
    it implements; an op whose version at this opset has no method fails mid-translation.
    """
    import_onnx_tf()
    from onnx_tf.common.handler_helper import get_all_backend_handlers

    opset = {entry.domain or "": entry.version for entry in model.opset_import}
    handlers = get_all_backend_handlers(opset)
    missing = set()
    for node in model.graph.node:
        name = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
        handler = handlers.get(node.domain or "", {}).get(node.op_type)
        if handler is None:
            missing.add(name)
        elif not hasattr(handler, f"version_{handler.SINCE_VERSION}"):
            missing.add(f"{name} (version {handler.SINCE_VERSION})")
    return missing
