"""PyTorch → ONNX: input ``images`` float32 [N, 784], outputs ``scores`` and ``logits``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from crossport import __version__
from crossport.errors import ExportError
from crossport.files import replace_atomic
from crossport.interface import INPUT, INPUT_SIZE, LOGITS, SCORES, image_shape_problem

log = logging.getLogger(__name__)

INPUT_NAME = INPUT
OUTPUT_NAMES = (SCORES, LOGITS)
META_LABELS = "crossport.labels"
META_CHECKPOINT = "crossport.checkpoint_sha256"
META_PRODUCER = "crossport.producer"
# The newest opset at which onnx-tf 1.10 has a handler for every op crossport's models export:
# from opset 19 Reshape is Reshape-19, which onnx-tf lacks (the CNN's reshape and flatten need it).
EXPORT_OPSET = 18


def export_onnx(model, labels: tuple[str, ...], checkpoint_sha256: str, path: Path) -> None:
    """Export ``model`` (logits) with a softmax head to one self-contained, checked ONNX file."""
    import onnx
    import torch

    head = serving_head(model).eval()
    example = torch.zeros(2, model.config.input_size)
    path = Path(path)
    try:
        torch.onnx.export(
            head,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            dynamo=True,
            opset_version=EXPORT_OPSET,
            external_data=False,  # one file: deployers copy model.onnx alone
            verbose=False,
        )
    except Exception as error:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for {path}: {error}.") from error

    proto = onnx.load(str(path), load_external_data=False)
    metadata = {
        META_LABELS: json.dumps(list(labels)),
        META_CHECKPOINT: checkpoint_sha256,
        META_PRODUCER: f"crossport {__version__}",
    }
    del proto.metadata_props[:]
    for node in proto.graph.node:  # the exporter's stack traces: this checkout's paths and line numbers, so the
        del node.metadata_props[:]  # same checkpoint exported from another checkout would give other bytes
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"crossport EMNIST {getattr(model.config, 'arch', 'mlp').upper()}: images float32 [N,784] in "
                        "[0,1] -> scores (softmax), logits")
    with replace_atomic(path) as partial:
        onnx.save(proto, str(partial))
    check_onnx(path)


def onnx_hints(brought: str | Path | None) -> dict[str, str]:
    """What to do about a missing or broken model.onnx on the route that made it: the export stage, or the import
    stage for a file brought with ``--onnx`` (that route has no export stage)."""
    if not brought:
        return {"missing": "Run the export stage first.", "redo": "Re-run the export stage."}
    return {"missing": f"Run the import stage first (--onnx {brought}).",
            "redo": f"Re-run the import stage (--onnx {brought}); if it fails the same way, the file itself does not "
                    "pass onnx.checker.check_model(path, full_check=True)."}


def check_onnx(path: Path, *, missing: str = "Run the export stage first.",
               redo: str = "Re-run the export stage.") -> None:
    """crossport's input/output contract, then the full ``onnx.checker`` check, from the file on disk.

    The contract comes first: for a model that breaks it, "input must be FLOAT[batch, 784]" (or
    [batch, H, W, C], :class:`crossport.interface.ImageContract`)
    says more than the checker's type-inference error about some node downstream. ``missing`` and
    ``redo`` say what to do on the route that made the file (export, or import of a brought file).
    """
    import onnx

    proto = read_onnx(path, ExportError, missing=missing, redo=redo)
    inputs = {value.name: value for value in proto.graph.input}
    if list(inputs) != [INPUT_NAME]:
        raise ExportError(f"ONNX model {path} must have one input {INPUT_NAME!r}, found {list(inputs)}.")
    tensor_type = inputs[INPUT_NAME].type.tensor_type
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
    if (tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) < 2 or dims[0] is not None
            or None in dims[1:] or image_shape_problem(tuple(dims[1:]))):
        found = f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}{dims}"
        raise ExportError(f"ONNX model {path} input {INPUT_NAME!r} must be FLOAT[batch, {INPUT_SIZE}] (or "
                          f"[batch, H, W, C] with C 1 or 3) with a dynamic batch, found {found}.")
    outputs = [value.name for value in proto.graph.output]
    if tuple(outputs) != OUTPUT_NAMES:
        raise ExportError(f"ONNX model {path} must have outputs {list(OUTPUT_NAMES)}, found {outputs}.")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # onnx raises ValidationError, InferenceError, ...
        raise ExportError(f"ONNX model {path} does not pass onnx.checker: {str(error).splitlines()[0]}.",
                          hint=redo) from error


def read_onnx(path: Path, error=ExportError, *, missing: str, redo: str):
    """Parse an ONNX file without its weights' external data; one line (``error``) for a missing, corrupt,
    external-data or future-opset file. ``missing`` and ``redo`` say what to do about the first two."""
    import onnx

    path = Path(path)
    if not path.is_file():
        from crossport.files import not_a_file

        raise error(f"ONNX model {path} {not_a_file(path)}.", hint=missing)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as cause:  # protobuf DecodeError, onnx's own errors
        raise error(f"ONNX model {path} does not pass onnx.checker: it cannot be parsed "
                    f"({str(cause).splitlines()[0] if str(cause) else type(cause).__name__}).", hint=redo) from cause
    external = external_tensors(proto)
    if external:
        # A published model.onnx must stand alone: its data file would not travel with it, and an external
        # location is a path the model chooses (it may point anywhere): refused before any runtime reads the file.
        raise error(
            f"ONNX model {path} keeps {len(external)} tensor(s) in external data files (first: {external[0]}); "
            "crossport takes one self-contained ONNX file and reads no file it names.",
            hint="Save it with onnx.save(model, path, save_as_external_data=False), or export with "
                 "torch.onnx.export(..., external_data=False).")
    known = onnx.defs.onnx_opset_version()
    declared = max((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), default=0)
    if declared > known:
        raise error(f"ONNX model {path} declares opset {declared}; the installed onnx {onnx.__version__} knows "
                    f"opsets up to {known}.", hint="Export it again with an opset at most that.")
    return proto


def external_tensors(proto) -> list[str]:
    """Where ``proto`` keeps a tensor's data outside the file: every tensor it holds is looked at (initializers,
    sparse initializers, node attributes such as ``Constant``'s, subgraphs of ``If``/``Loop``/``Scan``, and
    functions), each named by where it sits."""
    import onnx

    found: list[str] = []

    def tensor(value, where: str) -> None:
        if value.data_location == onnx.TensorProto.EXTERNAL or value.external_data:
            location = next((entry.value for entry in value.external_data if entry.key == "location"), "?")
            found.append(f"{where} at location {location!r}")

    def sparse(value, where: str) -> None:
        tensor(value.values, f"{where} values")
        tensor(value.indices, f"{where} indices")

    def nodes(items, where: str) -> None:
        for node in items:
            named = f"{node.op_type} node {node.name or '(unnamed)'!r}"
            for attribute in node.attribute:
                at = f"{named} attribute {attribute.name!r}{where}"
                if attribute.HasField("t"):
                    tensor(attribute.t, at)
                for value in attribute.tensors:
                    tensor(value, at)
                if attribute.HasField("sparse_tensor"):
                    sparse(attribute.sparse_tensor, at)
                for value in attribute.sparse_tensors:
                    sparse(value, at)
                if attribute.HasField("g"):
                    graph(attribute.g, f" (in {at})")
                for sub in attribute.graphs:
                    graph(sub, f" (in {at})")

    def graph(value, where: str) -> None:
        for init in value.initializer:
            tensor(init, f"initializer {init.name!r}{where}")
        for init in value.sparse_initializer:
            sparse(init, f"sparse initializer {init.values.name!r}{where}")
        nodes(value.node, where)

    graph(proto.graph, "")
    for function in proto.functions:
        nodes(function.node, f" (in function {function.name!r})")
    return found


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


def serving_head(model):
    """What gets exported: the network plus softmax, returning (scores, logits).

    Softmax belongs to the serving graph, not the network, so training sees logits and
    parity can compare logits before the softmax flattens differences.
    """
    import torch
    from torch import nn

    class ServingHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(images)
            return torch.softmax(logits, dim=-1), logits

    return ServingHead()
