"""Run every artifact crossport makes on the same float32 [N, *shape] inputs: one loader per runtime (:data:`LOADERS`).

Each loader reads the artifact from disk and returns a callable mapping inputs to a dict
of named float32 outputs; heavy runtimes are imported only by the loader that needs them.
Inputs are fed in chunks so whole test splits fit in memory on any runtime: at most
:data:`CHUNK` examples, fewer where one example's activations are large
(:func:`chunk_for`).
``threads`` sets each runtime's intra-op threads (None: the runtime's own default).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossport.interface import CLASSES, CLASSIFY_INPUT, CLASSIFY_KEY, INPUT, PREDICT_KEY, PREDICT_UINT8_KEY, SCORES

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]
CHUNK = 4096  # examples per runtime call at most
CHUNK_BYTES = 64 * 2**20  # and at most this much of one call's activations (chunk_for)


def chunk_for(onnx_path) -> int:
    """Examples per runtime call for the model at ``onnx_path``: :data:`CHUNK`, or fewer, so that every float32
    tensor of one call (the sum over the graph's tensors, as the instrumented TF graph returns them all) stays within
    :data:`CHUNK_BYTES`. It sets the scale, not a limit: TensorFlow's first call of the CNN's translated graph took
    about twice that (0.51 GiB for 256 MiB of tensors, 0.14 GiB for 64 MiB) and kept it for its later calls. A
    ResNet's 28×28 maps take some 4 MB per example, so 4,096 of them would take 16 GB."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
    elements = 0
    for value in (*model.graph.value_info, *model.graph.output):
        dims = value.type.tensor_type.shape.dim[1:]
        if all(dim.HasField("dim_value") for dim in dims):
            elements += int(np.prod([dim.dim_value for dim in dims]))
    return examples_per_call(elements)


def examples_per_call(elements: int) -> int:
    """Examples per call of a model whose float32 tensors hold ``elements`` values per example in all: :data:`CHUNK`,
    or fewer, so that one call's stay within :data:`CHUNK_BYTES` (the same budget for every runtime and for PyTorch,
    :func:`training.train.logits_of`)."""
    return int(max(1, min(CHUNK, CHUNK_BYTES // max(1, 4 * elements))))


def chunked(run: Predict, chunk: int = CHUNK) -> Predict:
    """``run`` called ``chunk`` examples at a time, each output written into one array of all the examples' rows as
    it comes (not gathered and joined: that held every output twice)."""

    def predict(images: np.ndarray) -> dict[str, np.ndarray]:
        total, joined, apart = len(images), {}, {}
        for start in range(0, max(total, 1), chunk):
            # np.asarray: a chunk of crossport.interface.Inputs becomes float32 here, one chunk at a time
            part = run(np.asarray(images[start : start + chunk]))
            rows = min(chunk, total - start)
            for name, value in part.items():
                if not np.ndim(value):  # a scalar (a translated graph's constant, e.g. a Clip's bound): every chunk's
                    joined[name] = value
                elif name in apart or len(value) != rows:  # not one row per example: joined as it came
                    apart.setdefault(name, []).append(value)
                else:
                    if name not in joined:
                        joined[name] = np.empty((total, *value.shape[1:]), value.dtype)
                    joined[name][start : start + rows] = value
        return {**joined, **{name: np.concatenate(values) for name, values in apart.items()}}

    return predict


def onnx_session(model, threads: int | None = None):
    """The one way crossport opens ONNX Runtime: ``model`` a path, or an in-memory ``onnx.ModelProto`` (a graph
    being imported, instrumented or broken on purpose), on the CPU with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, str | Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_onnx(onnx_path, threads: int | None = None, chunk: int = CHUNK) -> Predict:
    """``onnx_path``: a file, or an in-memory ``onnx.ModelProto`` (:func:`onnx_session`)."""
    session = onnx_session(onnx_path, threads)
    names = [output.name for output in session.get_outputs()]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(images, np.float32)})
        return dict(zip(names, values, strict=True))

    return chunked(run, chunk)


# SavedModels kept loaded in a process, latest used last: a stage asks for the same one several times (package: each
# signature, the uint8 check; validate: predict and classify), and loading MobileNetV3-small's took 0.75 s each time.
# A stage's loads are its own: the runner closes them when it ends (close_saved_models), because two resnet18
# SavedModels held 0.63 GB that the next stage's peak stood on.
_OPENED: collections.OrderedDict[tuple, object] = collections.OrderedDict()
_OPENED_LOCK = threading.Lock()
KEEP_OPEN = 2


def open_saved_model(saved_model_dir: Path):
    """``tf.saved_model.load``, with one PackageError line for a directory TensorFlow cannot load (a variables file
    whose checksum fails, a truncated graph, a missing file) instead of TensorFlow's traceback. The last
    :data:`KEEP_OPEN` loaded stay loaded while none of their files changes."""
    import tensorflow as tf

    from crossport.errors import PackageError
    from crossport.files import fingerprint

    directory = Path(saved_model_dir).resolve()
    key = (str(directory), fingerprint(directory))
    with _OPENED_LOCK:
        if key in _OPENED:
            _OPENED.move_to_end(key)
            return _OPENED[key]
    try:
        loaded = tf.saved_model.load(str(saved_model_dir))
    except (tf.errors.OpError, OSError, ValueError) as error:
        first = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
        raise PackageError(f"TensorFlow cannot load the SavedModel {saved_model_dir}: {first}.",
                           hint="Re-run the stage that wrote it (translate for tf_graph, package for saved_model), "
                                "or re-publish the version.") from None
    with _OPENED_LOCK:
        _OPENED[key] = loaded
        while len(_OPENED) > KEEP_OPEN:
            _OPENED.popitem(last=False)
    return loaded


def close_saved_models() -> bool:
    """Drop every SavedModel :func:`open_saved_model` keeps loaded; whether there was any. Its memory goes once
    nothing else holds it and its reference cycles are collected (:func:`crossport.frameworks.give_back_memory`)."""
    with _OPENED_LOCK:
        dropped = bool(_OPENED)
        _OPENED.clear()
    return dropped


def load_saved_model(saved_model_dir: Path, signature: str = PREDICT_KEY, threads: int | None = None,
                     outputs: tuple[str, ...] | None = None, chunk: int = CHUNK) -> Predict:
    """``outputs``: the names kept from each call (None: all; the instrumented translation returns every
    intermediate tensor, which nobody should hold for a whole test split)."""
    import tensorflow as tf

    if threads and tf.config.threading.get_intra_op_parallelism_threads() != threads:
        # TensorFlow that already ran something in this process keeps its threads (RuntimeError)
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(threads)
    function = open_saved_model(saved_model_dir).signatures[signature]

    if signature == CLASSIFY_KEY:
        def run(images: np.ndarray) -> dict[str, np.ndarray]:
            outputs = function(**{CLASSIFY_INPUT: tf.constant(serialize_examples(images), dtype=tf.string)})
            return {SCORES: outputs[SCORES].numpy(), CLASSES: outputs[CLASSES].numpy()}
    else:
        dtype = tf.uint8 if signature == PREDICT_UINT8_KEY else tf.float32

        def run(images: np.ndarray) -> dict[str, np.ndarray]:
            found = function(**{INPUT: tf.constant(images, dtype=dtype)})
            return {name: value.numpy() for name, value in found.items() if outputs is None or name in outputs}

    return chunked(run, chunk)


def serialize_examples(images: np.ndarray) -> list[bytes]:
    """Serialized ``tf.train.Example`` protos with feature ``images`` (each example's values, row-major) per row.

    Every row has the same length, so every serialized Example is one constant header
    followed by the row's packed little-endian floats. The header is taken from a real
    protobuf serialization of the first row (and checked), then reused: about 50× faster
    than building 100,000 protos in Python.
    """
    if len(images) == 0:
        return []
    rows = np.ascontiguousarray(images, dtype="<f4").reshape(len(images), -1)
    first = _example_bytes(rows[0])
    payload = rows[0].tobytes()
    if not first.endswith(payload):  # protobuf changed its layout: build each one
        return [_example_bytes(row) for row in rows]
    header = first[: -len(payload)]
    return [header + row.tobytes() for row in rows]


def _example_bytes(row: np.ndarray) -> bytes:
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    example.features.feature[INPUT].float_list.value.extend(row.tolist())
    return example.SerializeToString()


def load_tflite(tflite_path: Path, threads: int | None = None, instances: int = 1, chunk: int = CHUNK) -> Predict:
    """A TFLite file as a Predict that any number of threads may call at once.

    An interpreter holds its input and output buffers, so two threads in one interpreter
    overwrite each other's batch (LiteRT says it is not thread-safe; crossport measured wrong
    scores and XNNPACK errors under 4 threads). Each call takes one of ``instances``
    interpreters (``threads`` each) from a pool and waits when all are busy.
    """
    import queue

    from ai_edge_litert.interpreter import Interpreter

    from crossport.errors import CrossportError

    if not Path(tflite_path).is_file():
        raise CrossportError(f"TFLite file {tflite_path} does not exist.",
                             hint="A version published with --undecided omit leaves out the lossy variants its "
                                  "test split could not judge; its servable.json lists them. Use another variant.")
    calls = [signature_call(Interpreter(model_path=str(tflite_path), num_threads=threads), PREDICT_KEY)[0]
             for _ in range(max(1, instances))]
    idle: queue.SimpleQueue = queue.SimpleQueue()
    for call in calls:
        idle.put(call)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        call = idle.get()
        try:
            return call(np.ascontiguousarray(images, dtype=np.float32))
        finally:
            idle.put(call)

    return chunked(run, chunk)


def signature_call(interpreter, key: str) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], dict, dict]:
    """A LiteRT interpreter's one-input signature ``key`` as a call (one batch → a copy of every output by name),
    with the input's details and the outputs'.

    LiteRT's SignatureRunner resizes the input and allocates every tensor again on each call; this sizes the
    interpreter only when the batch's shape changes and is otherwise the runner's own sequence (set, invoke, get):
    the same outputs bit for bit, and 17 % of the digits MLP's batch-1 call saved (0.061 → 0.050 ms, docs/stack.md).
    A signature outside the interpreter's first subgraph, which the interpreter's own calls do not reach, keeps the
    runner. No runner of the interpreter may outlive this call otherwise: LiteRT refuses the interpreter's own calls
    while anything else holds it."""
    runner = interpreter.get_signature_runner(key)
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    ((name, feed),) = inputs.items()
    if getattr(runner, "_subgraph_index", None) != 0:  # LiteRT names no public way to ask

        def by_runner(batch: np.ndarray) -> dict[str, np.ndarray]:
            return {output: np.array(value) for output, value in runner(**{name: batch}).items()}

        return by_runner, feed, outputs
    return sized_call(interpreter, feed, outputs), feed, outputs


def sized_call(interpreter, feed: dict, outputs: dict, allocated: tuple[int, ...] | None = None):
    """The interpreter's first subgraph as a call (one batch → a copy of every output in ``outputs``, by name), fed
    through input ``feed`` and resized and allocated only when the batch's shape differs from the last one
    (``allocated``: the shape the interpreter is allocated for already, if it is)."""
    sized = [allocated]

    def call(batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.shape != sized[0]:
            sized[0] = None  # until the new size is allocated
            interpreter.resize_tensor_input(feed["index"], batch.shape)
            interpreter.allocate_tensors()
            sized[0] = batch.shape
        interpreter.set_tensor(feed["index"], batch)
        interpreter.invoke()
        return {output: interpreter.get_tensor(detail["index"]) for output, detail in outputs.items()}

    return call


# One loader per runtime, each returning a Predict any number of threads may call: ``(path, threads, instances,
# chunk)``
# (``instances``: TFLite interpreters answering at once; the other runtimes run concurrent calls themselves). A row of
# crossport.formats.FORMATS names its loader; a new runtime is one entry here. PyTorch, the reference, is loaded from a
# checkpoint by training.checkpoint.load_torch.
LOADERS: dict[str, Callable[..., Predict]] = {
    "saved_model": lambda path, threads, instances, chunk: load_saved_model(path, threads=threads, chunk=chunk),
    "onnx": lambda path, threads, instances, chunk: load_onnx(path, threads, chunk),
    "tflite": load_tflite,
}


def load_format(fmt, path: Path, threads: int | None = None, instances: int = 1, chunk: int = CHUNK) -> Predict:
    """Run the artifact at ``path`` as format ``fmt`` (a row of :data:`crossport.formats.FORMATS`).

    In a published version the artifact is at ``version_dir / fmt.path``. A file its runtime cannot load gets one
    PackageError line naming the format and the file.
    """
    from crossport.errors import CrossportError, PackageError

    try:
        return LOADERS[fmt.loader](path, threads, instances, chunk)
    except CrossportError:
        raise
    except Exception as error:  # each runtime has its own types: "not a valid Flatbuffer", ORT's InvalidProtobuf...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PackageError(f"{fmt.name} cannot load {path}: {first}.",
                           hint="Re-make or re-publish it, or use another format.") from None
