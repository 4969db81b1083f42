"""A model brought as an ONNX file → crossport's I/O contract, every change recorded.

Models trained elsewhere arrive in every shape ONNX has had since 2017: opset 6 with the
weights also listed as graph inputs, IR version 3, batch fixed at 1, an input named
``0`` of shape [1, 1, 28, 28], a Softmax as the only output. :func:`normalize` turns such a
graph into one that meets the contract crossport's own export meets (input ``images``, its
:class:`crossport.interface.ImageContract`: float32 [N, 784] in EMNIST orientation for a
28×28 grayscale model, [N, H, W, C] upright and channels last for any other image size;
outputs ``scores`` and ``logits``), so the
translate, package, tflite, validate and publish stages take it unchanged. Each step
says what it did in one line; the import stage writes them to the manifest and the report.

The arithmetic of the model is never changed: every step renames, reshapes, transposes
the input image, re-declares shapes or upgrades op versions (ONNX's own version
converter), and validate then proves the result against the normalized graph's exact
float64 evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from crossport.errors import ImportModelError
from crossport.interface import EMNIST_IMAGE, IMAGE_SIDE, INPUT, INPUT_SIZE, LOGITS, SCORES, ImageContract
from translation.channels_last import TO_NCHW

log = logging.getLogger(__name__)

ORIENTATIONS = ("emnist", "upright")  # what the model expects: crossport's transposed images, or as people see them
# 28×28 grayscale inputs crossport maps onto [N, 784] with a reshape inside the graph (N: the batch).
IMAGE_SHAPES = ((INPUT_SIZE,), (1, IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE, 1))
CHANNELS = (1, 3)  # grayscale or RGB
SUPPORTED = (f"[N, {INPUT_SIZE}], [N, 28, 28] or [N, 1, 28, 28] (28x28 grayscale), or any image as [N, C, H, W] "
             "or [N, H, W, C] with C 1 or 3")
BATCH = "batch"
# Ops that pass a tensor through unchanged: a Softmax behind them still ends the network.
PASS_THROUGH = ("Identity", "Dropout")


@dataclass
class Normalized:
    model: object  # onnx.ModelProto meeting crossport's contract
    steps: list[str] = field(default_factory=list)  # what was done, one line each
    logits: str = "exposed"  # "exposed" (the Softmax's input), "output" (the model's own), "computed"
    source_opset: int = 0
    source_ir_version: int = 0
    input_shape: tuple = ()
    image: ImageContract = EMNIST_IMAGE  # the published input (crossport.interface.ImageContract)
    layout: str = "flat"  # the model's own input: "flat" (a 28×28 grayscale shape), "nchw" or "nhwc"
    scaling: str | None = None  # what the graph does to the published [0, 1] values first, for the card
    model_input: str = INPUT  # the tensor the model as brought reads: the published input, or what the mapping makes


def declared_opset(model) -> int:
    return max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=0)


def normalize(model, *, orientation: str, target_opset: int, scaling: tuple | None = None) -> Normalized:
    """Normalize ``model`` (an onnx.ModelProto, changed in place) for an image model in ``orientation`` (which
    applies to 28×28 grayscale models only; every other image is published upright); ``scaling`` (mean, std), each
    one value or one per channel: the model expects ``(x − mean) / std`` of images in [0, 1], computed inside the
    graph."""
    import onnx

    if orientation not in ORIENTATIONS:
        raise ImportModelError(f"orientation must be one of {', '.join(ORIENTATIONS)}, found {orientation!r}.")
    result = Normalized(model, source_opset=declared_opset(model), source_ir_version=model.ir_version)
    known = onnx.defs.onnx_opset_version()
    if result.source_opset > known:
        raise ImportModelError(f"the model declares opset {result.source_opset}; the installed onnx "
                               f"{onnx.__version__} knows opsets up to {known}.",
                               hint="Export it again with an opset at most that.")
    _drop_initializer_inputs(result)
    _upgrade(result, target_opset)
    _clear_value_info(result)
    image = _check_input(result)
    _check_outputs(result)
    _make_batch_dynamic(result, image)
    _map_input(result, image, orientation, scaling)
    _map_outputs(result)
    _fold_computed_shapes(result)
    model = onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    result.model = model
    return result


def _drop_initializer_inputs(result: Normalized) -> None:
    """IR < 4 lists every weight as a graph input too; ONNX Runtime and onnx-tf would treat them as feeds."""
    graph = result.model.graph
    weights = {init.name for init in graph.initializer}
    kept = [value for value in graph.input if value.name not in weights]
    dropped = len(graph.input) - len(kept)
    if dropped:
        del graph.input[:]
        graph.input.extend(kept)
        result.steps.append(f"{dropped} initializer(s) listed as graph inputs removed from the inputs "
                            "(IR version 3 required that; later readers treat them as feeds)")


def _upgrade(result: Normalized, target: int) -> None:
    """The IR version of ``target`` (ONNX Runtime refuses IR < 3; IR < 4 cannot keep weights out of the
    inputs, and the converter resolves names by the IR's rules), then ONNX's version converter."""
    import onnx
    from onnx import helper, version_converter

    model = result.model
    opset = max(result.source_opset, target)
    wanted = min((row[1] for row in helper.VERSION_TABLE if row[2] == opset), default=onnx.IR_VERSION)
    if model.ir_version < wanted:
        result.steps.append(f"IR version {model.ir_version} raised to {wanted} (the IR version of opset {opset})")
        model.ir_version = wanted
    if result.source_opset < target:
        try:
            converted = version_converter.convert_version(model, target)
        except Exception as error:  # the converter raises RuntimeError/ConvertError with C++ text
            raise ImportModelError(
                f"ONNX's version converter could not upgrade the model from opset {result.source_opset} to "
                f"{target}: {str(error).splitlines()[0] if str(error) else type(error).__name__}.",
                hint=f"Re-export the model at a newer opset (up to {target}).") from error
        model.CopyFrom(converted)
        model.ir_version = max(model.ir_version, wanted)
        result.steps.append(f"opset {result.source_opset} upgraded to {target} with onnx.version_converter")


def _clear_value_info(result: Normalized) -> None:
    """Intermediate shapes are re-inferred: the converter (and old exporters) write batch 1 into every one."""
    graph = result.model.graph
    if len(graph.value_info):
        result.steps.append(f"{len(graph.value_info)} intermediate shape annotation(s) (value_info) dropped and "
                            "re-inferred (old exporters and the version converter fix their batch at 1)")
        del graph.value_info[:]


def _dims(value) -> list:
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in value.type.tensor_type.shape.dim]


def _check_input(result: Normalized):
    import onnx

    graph = result.model.graph
    if len(graph.input) != 1:
        raise ImportModelError(
            f"the model has {len(graph.input)} inputs ({', '.join(v.name for v in graph.input)}); crossport "
            f"supports one image input of shape {SUPPORTED}.",
            hint="Export a model that takes only the image, with any other input folded into constants.")
    image = graph.input[0]
    tensor = image.type.tensor_type
    dims = _dims(image)
    rest = tuple(dims[1:])
    sized = len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in rest)
    if tensor.elem_type == onnx.TensorProto.FLOAT and len(dims) >= 2 and rest in IMAGE_SHAPES:
        result.image, result.layout = EMNIST_IMAGE, "flat"
    elif tensor.elem_type == onnx.TensorProto.FLOAT and sized and (rest[0] in CHANNELS or rest[2] in CHANNELS):
        # channels first unless only the last dimension can be channels ([N, 3, 3, 3] is ONNX's NCHW)
        result.layout = "nchw" if rest[0] in CHANNELS else "nhwc"
        height, width, channels = (rest[1], rest[2], rest[0]) if result.layout == "nchw" else rest
        result.image = ImageContract.for_image(height, width, channels)
        if result.image.flat:  # 28×28 grayscale: today's contract, a reshape away
            result.layout = "flat"
    else:
        found = f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}{dims}"
        raise ImportModelError(
            f"input {image.name!r} is {found}; crossport supports one float image input of shape {SUPPORTED}.",
            hint="crossport publishes image classifiers; export the model with one image input of a fixed size.")
    result.input_shape = tuple(dims)
    return image


def _check_outputs(result: Normalized) -> None:
    import onnx

    graph = result.model.graph
    names = [value.name for value in graph.output]
    if names == [SCORES, LOGITS]:
        return
    if len(names) != 1:
        raise ImportModelError(
            f"the model has {len(names)} outputs ({', '.join(names)}); crossport supports one output, the "
            "class scores [N, C] (or logits), or exactly 'scores' and 'logits'.",
            hint="Export the model with its classification output only.")
    output = graph.output[0]
    dims = _dims(output)
    if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or (
            isinstance(dims[1], int) and dims[1] < 2):
        found = f"{onnx.TensorProto.DataType.Name(output.type.tensor_type.elem_type)}{dims}"
        raise ImportModelError(
            f"output {output.name!r} is {found}; crossport supports a class distribution: float [N, C] "
            "scores or logits with C >= 2.", hint="Export the model with its classification output only.")


def _make_batch_dynamic(result: Normalized, image) -> None:
    """A fixed batch (old exporters wrote 1) becomes a symbolic one where the graph allows it."""
    from onnx import numpy_helper

    graph = result.model.graph
    changed = []
    for value in (image, *graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value") or dim.dim_param != BATCH:
            if dim.HasField("dim_value"):
                changed.append(f"{value.name} ({dim.dim_value})")
            dim.Clear()
            dim.dim_param = BATCH
    if changed:
        result.steps.append(f"fixed batch dimension made dynamic on {', '.join(changed)}")
    # A Reshape to a constant shape that starts with the old fixed batch keeps it: copy dim 0 instead.
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        shape = numpy_helper.to_array(constants[node.input[1]])
        if shape.ndim != 1 or len(shape) < 2 or shape[0] != 1 or result.input_shape[0] != 1:
            continue
        users = [other for other in graph.node if node.input[1] in other.input]
        if len(users) > 1:
            raise ImportModelError(
                f"node {node.name or node.output[0]!r} (Reshape) fixes the batch at 1 with a shape constant "
                "shared with other nodes; crossport cannot make its batch dynamic.",
                hint="Re-export the model with a dynamic batch (e.g. x.view(x.size(0), -1) or dynamic_axes).")
        fixed = shape.copy()
        fixed[0] = -1 if -1 not in shape else 0  # 0: copy the input's dimension (allowzero=0)
        constants[node.input[1]].CopyFrom(numpy_helper.from_array(fixed, node.input[1]))
        result.steps.append(f"Reshape {node.name or node.output[0]!r}: constant batch 1 in shape {shape.tolist()} "
                            f"replaced by {int(fixed[0])}")


def _fold_computed_shapes(result: Normalized) -> None:
    """A Reshape whose shape is computed from the input's (the legacy exporter's Unflatten with a dynamic batch:
    Shape, Mod, Slice, Concat) gets it as a constant, the batch −1: shape inference cannot follow that computation,
    and what reads the graph (onnx-tf, the exact reference) needs the shapes. The computation runs, by
    onnx.reference, at batch 1 and 2; a shape with any other dimension that changes with the batch is left alone."""
    import numpy as np
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = result.model.graph
    constant = {init.name for init in graph.initializer} | {node.output[0] for node in graph.node
                                                           if node.op_type == "Constant"}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in constant:
            continue
        try:
            evaluator = ReferenceEvaluator(_computing(result.model, node.input[1]))
            one, two = (evaluator.run(None, {INPUT: np.zeros((batch, *result.image.shape), np.float32)})[0]
                        for batch in (1, 2))
        except Exception:
            continue
        if one.shape != two.shape or one.ndim != 1 or (one[0], two[0]) != (1, 2) or any(one[1:] != two[1:]):
            continue
        fixed = one.copy()
        fixed[0] = -1
        name = _fresh(graph, f"{node.input[1]}_folded")
        graph.initializer.append(numpy_helper.from_array(fixed.astype(np.int64), name))
        node.input[1] = name
        result.steps.append(f"Reshape {node.name or node.output[0]!r}: its shape, computed from the input's, "
                            f"written as the constant {fixed.tolist()}")


def _computing(model, name: str):
    """The part of ``model`` that computes tensor ``name`` from the input, as a model of its own."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    wanted, names = set(), [name]
    while names:
        node = producer.get(names.pop())
        if node is not None and id(node) not in wanted:
            wanted.add(id(node))
            names.extend(node.input)
    nodes = [node for node in graph.node if id(node) in wanted]
    used = {value for node in nodes for value in node.input}
    part = helper.make_graph(nodes, "computing", [value for value in graph.input if value.name == INPUT],
                             [helper.make_tensor_value_info(name, TensorProto.INT64, None)],
                             [init for init in graph.initializer if init.name in used])
    return helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)


def _rename(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _taken(graph) -> set[str]:
    names = {init.name for init in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _fresh(graph, base: str) -> str:
    taken, name, n = _taken(graph), base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _map_input(result: Normalized, image, orientation: str, scaling: tuple | None) -> None:
    """The published input ``images`` (``result.image``: [N, 784] in EMNIST orientation, or [N, H, W, C] upright),
    in [0, 1], scaled, then reshaped (and transposed) into the model's own."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = result.model.graph
    published = result.image
    own, rest = image.name, tuple(result.input_shape[1:])
    reshaped = published.flat and (orientation == "upright" or rest != (INPUT_SIZE,))
    channels_first = result.layout == "nchw"
    if own == INPUT and not reshaped and not channels_first and scaling is None:
        return
    if own == INPUT:  # the name is taken by the model's own input, of another shape
        own = _fresh(graph, f"{INPUT}_model")
        _rename(graph, INPUT, own)
    nodes, current = [], INPUT

    def constant(name: str, values) -> str:
        tensor_name = _fresh(graph, name)
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), tensor_name))
        return tensor_name

    if scaling is not None:
        mean, std = (tuple(float(v) for v in np.atleast_1d(values)) for values in scaling)
        if len(mean) not in (1, published.channels) or len(std) != len(mean):
            raise ImportModelError(f"--mean and --std give {len(mean)} and {len(std)} value(s); the model's images "
                                   f"have {published.channels} channel(s).",
                                   hint="Pass one value for all channels, or one per channel (R,G,B).")
        centred, scaled = _fresh(graph, "crossport_centred"), _fresh(graph, "crossport_scaled")
        # one value per channel broadcasts over the last axis: channels last in [N, H, W, C]
        for op, name, value, out in (("Sub", "crossport_mean", mean, centred), ("Div", "crossport_std", std, scaled)):
            tensor_name = _fresh(graph, name)
            array = np.float32(value[0]) if len(value) == 1 else np.asarray(value, np.float32)
            graph.initializer.append(numpy_helper.from_array(array, tensor_name))
            nodes.append(helper.make_node(op, [current, tensor_name], [out], name=name))
            current = out
        result.scaling = f"the model computes (x − {_listed(mean)}) / {_listed(std)} inside the graph"
        result.steps.append(f"the model expects (x − {_listed(mean)}) / {_listed(std)} of images in [0, 1]: computed "
                            "inside the graph, so the published input stays in [0, 1]")
    if published.flat and orientation == "upright":
        square = _fresh(graph, "crossport_square")
        nodes.append(helper.make_node("Reshape", [current, constant("crossport_square_shape", [-1, IMAGE_SIDE,
                                                                                              IMAGE_SIDE])],
                                      [square], name="crossport_to_square"))
        upright = _fresh(graph, "crossport_upright")
        nodes.append(helper.make_node("Transpose", [square], [upright], perm=[0, 2, 1], name="crossport_upright"))
        current = upright
        result.steps.append("the model expects upright images: the published input (EMNIST orientation) is "
                            "transposed inside the graph")
    if reshaped:
        nodes.append(helper.make_node("Reshape", [current, constant("crossport_model_shape", [-1, *rest])], [own],
                                      name="crossport_to_model_input"))
        if rest != (INPUT_SIZE,):
            result.steps.append(f"input {own!r} [N, {', '.join(map(str, rest))}] fed from {INPUT!r} [N, {INPUT_SIZE}] "
                                "by a reshape inside the graph")
    elif channels_first:
        nodes.append(helper.make_node("Transpose", [current], [own], perm=TO_NCHW, name="crossport_to_nchw"))
        result.steps.append(f"input {own!r} [N, {', '.join(map(str, rest))}] (channels first) fed from {INPUT!r} "
                            f"[N, {', '.join(map(str, published.shape))}] (channels last, TensorFlow's layout) by a "
                            "transpose inside the graph")
    elif scaling is not None:
        nodes[-1].output[0] = own  # the scaled images are the model's input
    else:
        _rename(graph, own, INPUT)
    if own != INPUT:
        result.steps.append(f"input {image.name!r} is published as {INPUT!r}")
    result.model_input = own if nodes else INPUT
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, *published.shape]))
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old])


def _listed(values: tuple[float, ...]) -> str:
    return f"{values[0]:g}" if len(values) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _producer(graph, name: str):
    return next((node for node in graph.node if name in node.output), None)


def _map_outputs(result: Normalized) -> None:
    """Outputs ``scores`` (softmax) and ``logits``: taken from the model's own Softmax, or computed."""
    from onnx import TensorProto, helper

    graph = result.model.graph
    if [value.name for value in graph.output] == [SCORES, LOGITS]:
        result.logits = "output"
        return
    output = graph.output[0]
    classes = output.type.tensor_type.shape.dim[1]
    node = _producer(graph, output.name)
    while node is not None and node.op_type in PASS_THROUGH:
        node = _producer(graph, node.input[0])
    is_softmax = node is not None and node.op_type in ("Softmax", "LogSoftmax") and all(
        attr.i in (-1, 1) for attr in node.attribute if attr.name == "axis")
    del graph.output[:]
    if is_softmax and node.op_type == "LogSoftmax":
        # log-probabilities: scores are their exp, the softmax of the same input, which is then the logits
        node.op_type = "Softmax"
        result.steps.append(f"output {output.name!r} is a LogSoftmax: published as {SCORES!r}, the Softmax of the same "
                            "input (exp of the log-probabilities)")
    if is_softmax:
        logits_name = node.input[0]
        if output.name != SCORES:
            if SCORES in _taken(graph):
                _rename(graph, SCORES, _fresh(graph, f"{SCORES}_model"))
            _rename(graph, output.name, SCORES)
            result.steps.append(f"output {output.name!r} (the model's Softmax) is published as {SCORES!r}")
        if logits_name != LOGITS:
            if LOGITS in _taken(graph):
                _rename(graph, LOGITS, _fresh(graph, f"{LOGITS}_model"))
            _rename(graph, logits_name, LOGITS)
        result.logits = "exposed"
        result.steps.append(f"the model outputs no logits: its Softmax's input is exposed as {LOGITS!r}, so parity "
                            "also compares values before the softmax")
    else:
        for name in (SCORES, LOGITS):
            if name in _taken(graph) and name != output.name:
                _rename(graph, name, _fresh(graph, f"{name}_model"))
        _rename(graph, output.name, LOGITS)
        graph.node.append(helper.make_node("Softmax", [LOGITS], [SCORES], axis=-1, name="crossport_softmax"))
        result.logits = "computed"
        result.steps.append(f"output {output.name!r} is not a Softmax: published as {LOGITS!r}, with {SCORES!r} its "
                            "softmax computed inside the graph")
    dims = [BATCH, classes.dim_value if classes.HasField("dim_value") else (classes.dim_param or "classes")]
    graph.output.extend([helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, dims),
                         helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, dims)])
