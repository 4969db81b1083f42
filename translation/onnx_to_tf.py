"""ONNX → TensorFlow graph with onnx-tf, written as a SavedModel directory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from crossport.errors import TranslationError
from translation.compat import import_onnx_tf, spatial_means_as_pools, traced_without_autograph

log = logging.getLogger(__name__)


def translate(onnx_path: Path, out_dir: Path, *, expose_intermediates: bool = True) -> None:
    """Translate ``onnx_path`` into a TensorFlow SavedModel at ``out_dir`` (replaced if present).

    With ``expose_intermediates`` the graph also returns every node output under its tensor
    name (see :mod:`translation.divergence`), so a drift can be traced to a node.
    """
    import onnx

    import_onnx_tf()
    from onnx_tf.backend import prepare

    model = onnx.load(str(onnx_path), load_external_data=False)
    pooled = spatial_means_as_pools(model)
    if pooled:
        log.info("ReduceMean over the spatial axes written as GlobalAveragePool on %s", ", ".join(pooled))
    refuse_unsupported(model, onnx_path)
    from translation.channels_last import channels_last
    from translation.layout import same_padding

    # layout rewrites that keep the arithmetic and let TFLite cancel onnx-tf's transposes
    padded, moved = same_padding(model), channels_last(model)
    if padded or moved:
        log.info("layout: padding written as auto_pad SAME_UPPER on %d node(s); %d node(s) computed channels last",
                 len(padded), len(moved))
    if expose_intermediates:
        from translation.divergence import instrument

        model, _ = instrument(model)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        try:
            with traced_without_autograph():
                export_graph(prepare(model), out_dir)
        except Exception as error:  # a handler that needs autograph: trace again with it
            log.debug("tracing without autograph failed (%s); tracing with it", error)
            shutil.rmtree(out_dir, ignore_errors=True)
            export_graph(prepare(model), out_dir)
    except Exception as error:  # onnx-tf raises bare Exceptions, TF raises many types
        shutil.rmtree(out_dir, ignore_errors=True)
        raise TranslationError(f"onnx-tf could not translate {onnx_path}: {error}.") from error


def export_graph(rep, out_dir: Path) -> None:
    """onnx-tf's ``TensorflowRep.export_graph``, saving only what its readers use: the ``serving_default`` signature.

    onnx-tf saves its whole module, whose two ``tf.function`` attributes TensorFlow's saver lists again, tracing the
    graph a second time, and which every later load restores: on MobileNetV3-small that save took 0.79-0.90 s and
    a load of the result 0.28-0.31 s, against 0.32-0.33 s and 0.16-0.17 s for the signature alone. The function
    saved is the same trace of the same graph, with the variables some of onnx-tf's handlers make and the function
    captures (its recurrent ops' and NonMaxSuppression's, also inside Loop, If and Scan bodies) tracked beside it."""
    import tensorflow as tf

    module = rep.tf_module
    module.is_export = True  # as onnx-tf's export: an output TensorFlow cannot shape takes the ONNX graph's
    try:
        function = module.__call__.get_concrete_function(**rep.signatures)
    finally:
        module.is_export = False
    kept = tf.Module()
    kept.handler_variables = list(module.handler_variables.values())
    tf.saved_model.save(kept, str(out_dir), signatures=function)


def refuse_unsupported(model, path) -> None:
    """One line naming every op (with its version) onnx-tf cannot translate, and a node using it."""
    unsupported = unsupported_ops(model)
    if unsupported:
        opset = max((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), default=0)
        found = ", ".join(f"{op} (node {node!r})" for op, node in sorted(unsupported.items()))
        raise TranslationError(
            f"{path} uses ONNX op(s) onnx-tf cannot translate: {found}; the model declares opset {opset}.",
            hint="Change the model to avoid them, or export with an opset whose version of the op onnx-tf "
                 "implements (onnx-tf 1.10 covers ONNX opsets up to 15 fully; crossport exports at 18).",
        )


def unsupported_ops(model) -> dict[str, str]:
    """Ops in ``model``'s main graph that onnx-tf cannot translate at the model's opset → the first node using one.

    onnx-tf has a handler class per op with one ``version_<N>`` method per ONNX op version
    it implements; an op whose version at this opset has no method fails mid-translation.
    """
    import onnx

    import_onnx_tf()
    from onnx_tf.common.handler_helper import get_all_backend_handlers

    rewritten = onnx.ModelProto()  # as translate will hand it to onnx-tf
    rewritten.CopyFrom(model)
    spatial_means_as_pools(rewritten)
    model = rewritten
    opset = {entry.domain or "": entry.version for entry in model.opset_import}
    handlers = get_all_backend_handlers(opset)
    missing: dict[str, str] = {}
    # name a node of the model's own before one crossport added (translation.onnx_import's "crossport_" nodes)
    for node in sorted(model.graph.node, key=lambda node: node.name.startswith("crossport_")):
        name = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
        handler = handlers.get(node.domain or "", {}).get(node.op_type)
        if handler is None:
            missing.setdefault(name, node.name or node.output[0])
        elif not hasattr(handler, f"version_{handler.SINCE_VERSION}"):
            missing.setdefault(f"{name} version {handler.SINCE_VERSION}", node.name or node.output[0])
    return missing
