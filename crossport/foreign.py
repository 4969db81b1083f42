"""A servable made by any converter, read as crossport reads its own: its kind from the file itself, never from its
name, and a :data:`crossport.runtimes.Predict` for it whatever its input layout, batch and outputs.

Kinds (:data:`KINDS`) are the TFLite variants of :data:`crossport.formats.FORMATS`, read from the tensor types:
activations held in integers make ``int8_full``; integer weights with float activations ``int8_dynamic``; float16
weights ``fp16``; float32 throughout ``fp32``. A SavedModel is ``fp32`` when every float it holds is float32.

Outputs are named by what they hold, since converters rename them: a ``[N, classes]`` output whose rows are
probabilities (every value in [0, 1], each row summing to about 1) is ``scores``; any other ``[N, classes]`` output
is ``logits``. A Predict reads that from the first batch it runs and keeps it: a file's outputs do not change what
they hold from call to call, and a timed call then costs what the file costs. A file that returns logits alone is
given ``scores`` by :func:`softmax` (float64, rounded once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossport.errors import ConfigError
from crossport.formats import TFLITE_VARIANTS
from crossport.interface import LOGITS, SCORES
from crossport.runtimes import CHUNK, Predict

KINDS = TFLITE_VARIANTS  # fp32, fp16, int8_dynamic, int8_full
INTEGER_TYPES = (np.int8, np.uint8, np.int16)


@dataclass(frozen=True)
class Foreign:
    """What a file is: its ``kind``, and its input's per-example ``shape`` and fixed ``batch`` (None: any)."""

    path: Path
    container: str  # "tflite" or "saved_model"
    kind: str
    shape: tuple[int, ...]
    batch: int | None

    def describe(self) -> str:
        batch = f"batch fixed at {self.batch}" if self.batch else "any batch"
        return f"{self.container} {self.kind}, input [N, {', '.join(map(str, self.shape))}], {batch}"


def inspect(path: Path) -> Foreign:
    """Read ``path`` (a .tflite file or a SavedModel directory): its kind, input shape and batch."""
    path = Path(path)
    if path.is_dir() and any((path / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt")):
        return _saved_model(path)
    if path.is_file():
        return _tflite(path)
    found = "is a folder with no saved_model.pb" if path.is_dir() else "does not exist"
    raise ConfigError(f"{path} {found}; expected a TFLite file or a SavedModel directory.",
                      hint="Pass the file another converter made, e.g. model_float32.tflite or saved_model/.")


def _tflite(path: Path) -> Foreign:
    interpreter = _interpreter(path)
    tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    inputs = interpreter.get_input_details()
    if len(inputs) != 1:
        raise ConfigError(f"{path} has {len(inputs)} inputs; expected one: a batch of images.",
                          hint="Judge a single-input image classifier.")
    produced = {index for op in ops for index in op["outputs"]}
    fed = {detail["index"] for detail in inputs}
    constants = {index for op in ops for index in op["inputs"] if index >= 0 and index not in produced | fed}

    def holds(indices, dtypes) -> bool:
        return any(tensors[index]["dtype"] in dtypes for index in indices if index in tensors)

    kind = ("int8_full" if holds(produced | fed, INTEGER_TYPES) else "int8_dynamic" if holds(constants, INTEGER_TYPES)
            else "fp16" if holds(constants, (np.float16,)) else "fp32")
    signature = inputs[0].get("shape_signature", inputs[0]["shape"])
    shape = tuple(int(d) for d in inputs[0]["shape"][1:])
    return Foreign(path, "tflite", kind, shape, None if int(signature[0]) < 0 else int(signature[0]))


def _interpreter(path: Path, threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    from crossport.errors import PackageError

    try:
        return Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PackageError(f"LiteRT cannot load {path}: {first}.",
                           hint="Pass a .tflite file or a SavedModel directory.") from None


def _saved_model(path: Path) -> Foreign:
    import tensorflow as tf

    from crossport.runtimes import open_saved_model

    function = _serving_function(open_saved_model(path), path)
    (spec,) = function.structured_input_signature[1].values()
    graph = function.graph.as_graph_def()
    floats = {node.attr["dtype"].type for nodes in (graph.node, *(f.node_def for f in graph.library.function))
              for node in nodes if node.op == "Const"} & {tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum,
                                                          tf.int8.as_datatype_enum, tf.uint8.as_datatype_enum}
    kind = "fp32" if not floats else "lossy"
    dims = spec.shape.as_list()
    if any(d is None for d in dims[1:]):
        raise ConfigError(f"{path}'s input {spec.name!r} has the shape {dims}; expected a fixed image shape.",
                          hint="Export the model with a fixed image size and a free batch.")
    return Foreign(path, "saved_model", kind, tuple(dims[1:]), dims[0])


def _serving_function(loaded, path: Path):
    signatures = dict(loaded.signatures)
    function = signatures.get("serving_default") or (next(iter(signatures.values())) if len(signatures) == 1 else None)
    inputs = function.structured_input_signature[1] if function is not None else {}
    if function is None or len(inputs) != 1:
        raise ConfigError(f"{path} has no single-input serving_default signature (signatures: {sorted(signatures)}).",
                          hint="Judge a SavedModel whose serving_default takes one batch of images.")
    return function


def load(foreign: Foreign, example_shape: tuple[int, ...], threads: int | None = None, chunk: int = CHUNK) -> Predict:
    """A Predict for ``foreign`` fed examples of ``example_shape`` (the run's contract): reshaped or transposed to the
    file's own layout, in batches of its fixed size (the last one padded) or of ``chunk`` examples
    (:func:`crossport.runtimes.chunk_for`), its outputs named by what they hold (read from the first batch)."""
    adapt = _layout(foreign, example_shape)
    run = _tflite_run(foreign.path, threads) if foreign.container == "tflite" else _saved_model_run(foreign.path)
    step = foreign.batch or chunk
    roles: dict[str, str] = {}  # each output's name in the file: what it holds

    def predict(images: np.ndarray) -> dict[str, np.ndarray]:
        parts = []
        for start in range(0, max(len(images), 1), step):
            batch = adapt(images[start : start + step])
            rows = len(batch)
            if foreign.batch and rows < foreign.batch:  # a fixed batch: pad, then drop the padding's rows
                batch = np.concatenate([batch, np.zeros((foreign.batch - rows, *batch.shape[1:]), batch.dtype)])
            parts.append({name: value[:rows] for name, value in run(batch).items()})
        outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        if not roles:
            roles.update(_roles(outputs, foreign.path))
        return {role: np.asarray(outputs[name], np.float32) for name, role in roles.items()}

    return predict


def _layout(foreign: Foreign, example_shape: tuple[int, ...]):
    """How the examples become the file's: the same values in the same order (any reshape of a flat or one-channel
    image), or an image moved between channels last and channels first."""
    theirs, ours = tuple(foreign.shape), tuple(example_shape)
    if int(np.prod(theirs)) != int(np.prod(ours)):
        raise ConfigError(f"{foreign.path} takes examples of shape {list(theirs)}; the run's are {list(ours)}.",
                          hint="Judge a file converted from this run's model.")
    if len(ours) == 1 or _without_ones(theirs) == _without_ones(ours):
        return lambda images: np.ascontiguousarray(images, np.float32).reshape(len(images), *theirs)
    for perm in ((2, 0, 1), (1, 2, 0)):  # channels last to first, and back
        if len(ours) == 3 and theirs == tuple(ours[axis] for axis in perm):
            order = (0, *(axis + 1 for axis in perm))
            return lambda images, order=order: np.ascontiguousarray(np.asarray(images, np.float32).transpose(order))
    raise ConfigError(f"{foreign.path} takes examples of shape {list(theirs)}; the run's are {list(ours)}, which are "
                      "neither a reshape nor a move of the channels of it.",
                      hint="Judge a file converted from this run's model.")


def _without_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


def _tflite_run(path: Path, threads: int | None):
    """The file's own input type (a float16 or integer input is fed converted, by its quantization parameters) and
    float32 outputs (integer outputs dequantized)."""
    from crossport.runtimes import signature_call, sized_call

    interpreter = _interpreter(path, threads)
    signatures = interpreter.get_signature_list()
    if signatures:
        call, feed, outputs = signature_call(interpreter, next(iter(signatures)))
    else:
        interpreter.allocate_tensors()
        (feed,), details = interpreter.get_input_details(), interpreter.get_output_details()
        outputs = {detail["name"]: detail for detail in details}
        call = sized_call(interpreter, feed, outputs, allocated=tuple(feed["shape"]))

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        from crossport.errors import PackageError

        try:
            found = call(_quantized(batch, feed))
        except (ValueError, RuntimeError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise PackageError(f"LiteRT cannot run {path}: {first}.",
                               hint="Check that the file runs in LiteRT on its own.") from None
        return {key: _dequantized(np.array(value), outputs.get(key, {})) for key, value in found.items()}

    return run


def _quantized(batch: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and scale:
        limits = np.iinfo(dtype)
        return np.clip(np.round(batch / scale) + zero, limits.min, limits.max).astype(dtype)
    return batch.astype(dtype)


def _dequantized(value: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(value.dtype, np.integer) and scale:
        return ((value.astype(np.float64) - zero) * scale).astype(np.float32)
    return value


def _saved_model_run(path: Path):
    import tensorflow as tf

    from crossport.runtimes import open_saved_model

    function = _serving_function(open_saved_model(path), path)
    (name,) = function.structured_input_signature[1]
    return lambda batch: {key: value.numpy() for key, value in function(**{name: tf.constant(batch)}).items()}


def _roles(outputs: dict[str, np.ndarray], path: Path) -> dict[str, str]:
    """Which of a file's outputs are its ``logits`` and its ``scores``, by what they hold (the module's docstring):
    output name → role, the first by name of each role."""
    found: dict[str, str] = {}
    for name, value in sorted(outputs.items()):
        value = np.asarray(value)
        if value.ndim != 2 or not np.issubdtype(value.dtype, np.floating):
            continue
        value = value.astype(np.float32)
        probabilities = bool(np.all((value >= 0) & (value <= 1)) and np.all(np.abs(value.sum(axis=1) - 1) < 0.5))
        role = SCORES if probabilities else LOGITS
        if role not in found.values():
            found[name] = role
    if not found:
        raise ConfigError(f"{path} has no [N, classes] float output (outputs: "
                          f"{ {name: list(np.shape(value)) for name, value in outputs.items()} }).",
                          hint="Judge a classifier whose output is its logits or its class probabilities.")
    return found


def softmax(logits: np.ndarray) -> np.ndarray:
    """The class probabilities of ``logits``, computed in float64 and rounded once to float32."""
    wide = np.asarray(logits, np.float64)
    exponentials = np.exp(wide - wide.max(axis=1, keepdims=True))
    return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)
