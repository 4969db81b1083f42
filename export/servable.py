"""The SavedModel deployers get: ``serving_default`` (predict), ``predict_uint8`` (predict on 0-255 pixels, scaled
inside the graph) and ``classify`` signatures.

The contract lives in :mod:`crossport.interface`; :func:`signature_problems` is the one
checker of a SavedModel's signatures: that contract, and TF Serving's own rules for predict
and classify SignatureDefs.

TF 2.21's ``tf.saved_model.save`` writes every signature with the predict method, so the
classify signature's ``method_name`` is set in ``saved_model.pb`` after saving, the traced
functions are renumbered by the build rather than by the process (:mod:`export.function_names`),
and ``fingerprint.pb`` is rewritten to match the edited graph.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from crossport.errors import PackageError
from crossport.interface import (
    CLASSES,
    CLASSIFY_INPUT,
    CLASSIFY_KEY,
    CLASSIFY_METHOD,
    INPUT,
    PREDICT_KEY,
    PREDICT_METHOD,
    PREDICT_UINT8_KEY,
    SCORES,
    ImageContract,
    image_shape_problem,
    signature_contracts,
)


def build_saved_model(tf_graph_dir: Path, labels: tuple[str, ...], out_dir: Path) -> None:
    """Wrap the translated graph in the two serving signatures and save it to ``out_dir``."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(tf_graph_dir))
    if PREDICT_KEY not in graph.signatures:
        raise PackageError(f"translated graph {tf_graph_dir} has no serving_default signature.",
                           hint="Re-run the translate stage.")
    image = translated_image(graph, tf_graph_dir)

    # each signature is straight-line TensorFlow (no Python control flow on tensors), so autograph, which would
    # rewrite each one's source first, is left out: 0.2 s of every package stage, the same graph
    class Servable(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph
            self.labels = tf.constant(list(labels), dtype=tf.string)
            # a variable, not a constant: TensorFlow's graph optimizer folds a constant divisor into the first
            # layer's weights, which changes the rounding (1.9e-6 on a CNN); x / 255 itself is what a client computes
            self.pixel_scale = tf.Variable(255.0, trainable=False, name="pixel_scale")

        def scores(self, images):
            """The translated graph's scores: each signature calls it itself rather than through ``predict``, one
            call of the graph each (every call op TensorFlow adds infers shapes through the whole graph it calls:
            26-50 ms on MobileNetV3-small, and a nested call adds one more)."""
            return self.graph.signatures[PREDICT_KEY](**{INPUT: images})[SCORES]

        @tf.function(autograph=False, input_signature=[tf.TensorSpec(image.batch_shape(), tf.float32, name=INPUT)])
        def predict(self, images):
            return {SCORES: self.scores(images)}

        @tf.function(autograph=False, input_signature=[tf.TensorSpec(image.batch_shape(), tf.uint8, name=INPUT)])
        def predict_uint8(self, images):
            # x / 255 in float32, the division numpy does: the same floats serving_default gets from a client
            return {SCORES: self.scores(tf.cast(images, tf.float32) / self.pixel_scale)}

        @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)])
        def classify(self, inputs):
            features = tf.io.parse_example(inputs, {INPUT: tf.io.FixedLenFeature(list(image.shape), tf.float32)})
            scores = self.scores(features[INPUT])
            classes = tf.tile(self.labels[tf.newaxis, :], [tf.shape(scores)[0], 1])
            return {CLASSES: classes, SCORES: scores}

    servable = Servable()
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(
        servable, str(staging),
        signatures={PREDICT_KEY: servable.predict, PREDICT_UINT8_KEY: servable.predict_uint8,
                    CLASSIFY_KEY: servable.classify},
    )
    rewrite_saved_model(staging, _finish)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    check_signatures(out_dir, len(labels))


def check_uint8_signature(saved_model_dir: Path, images: np.ndarray, threads: int | None = None) -> None:
    """``predict_uint8`` on 0-255 pixels answers exactly what ``serving_default`` answers on the same pixels / 255
    (float32 division, as a client computes it): the same scores, bit for bit, or a PackageError."""
    from crossport.runtimes import load_saved_model

    pixels = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    scaled = load_saved_model(saved_model_dir, PREDICT_KEY, threads)(pixels.astype(np.float32) / np.float32(255))
    raw = load_saved_model(saved_model_dir, PREDICT_UINT8_KEY, threads)(pixels)
    if not np.array_equal(scaled[SCORES], raw[SCORES]):
        worst = float(np.max(np.abs(scaled[SCORES].astype(np.float64) - raw[SCORES])))
        raise PackageError(f"SavedModel {saved_model_dir}: {PREDICT_UINT8_KEY} differs from {PREDICT_KEY} on the "
                           f"same pixels / 255 by up to {worst:.3g}; the two must answer the same scores.",
                           hint="Re-run the package stage; report it if it persists.")


def translated_image(graph, where) -> ImageContract:
    """The image contract the translated graph's ``images`` input declares (the ONNX model's, kept by onnx-tf)."""
    spec = graph.signatures[PREDICT_KEY].structured_input_signature[1].get(INPUT)
    try:
        return ImageContract.of(spec.shape[1:])
    except (AttributeError, TypeError, ValueError) as error:
        raise PackageError(f"translated graph {where}: input {INPUT!r} is {spec}, not an image input"
                           f"{': ' + str(error) if isinstance(error, ValueError) else ''}.",
                           hint="Re-run the export (or import) and translate stages.") from None


def image_contract(saved_model_dir: Path) -> ImageContract:
    """The image contract a SavedModel's predict signature declares (read from ``saved_model.pb``, no TensorFlow
    graph loaded): what REST, gRPC, the card and the benchmark feed it."""
    defs = read_signature_defs(saved_model_dir)
    info = defs[PREDICT_KEY].inputs[INPUT] if PREDICT_KEY in defs and INPUT in defs[PREDICT_KEY].inputs else None
    try:
        if info is None or info.tensor_shape.unknown_rank:
            raise ValueError(f"no {PREDICT_KEY} input {INPUT!r} of known rank")
        return ImageContract.of(d.size for d in info.tensor_shape.dim[1:])
    except ValueError as error:
        raise PackageError(f"SavedModel {saved_model_dir} declares no image input: {error}.",
                           hint="Re-run the package stage, or re-publish the version.") from None


def set_method_name(saved_model_dir: Path, signature_key: str, method_name: str) -> None:
    """Set one SignatureDef's method name in ``saved_model.pb`` and refresh ``fingerprint.pb``."""
    rewrite_saved_model(saved_model_dir, lambda proto: _set_method_name(proto, signature_key, method_name))


def _set_method_name(proto, signature_key: str, method_name: str) -> None:
    for meta_graph in proto.meta_graphs:
        meta_graph.signature_def[signature_key].method_name = method_name


def _finish(proto) -> None:
    """What ``build_saved_model`` edits in the SavedModel TensorFlow wrote: classify's method name, and the traced
    functions' names (:mod:`export.function_names`)."""
    from export.function_names import canonical_function_names

    _set_method_name(proto, CLASSIFY_KEY, CLASSIFY_METHOD)
    canonical_function_names(proto)


def rewrite_saved_model(saved_model_dir: Path, edit) -> None:
    """``edit(proto)`` applied to ``saved_model.pb``, written back byte for byte reproducibly, ``fingerprint.pb``
    refreshed."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model import fingerprinting_utils

    pb_path = Path(saved_model_dir) / "saved_model.pb"
    proto = saved_model_pb2.SavedModel.FromString(pb_path.read_bytes())
    edit(proto)
    # deterministic: protobuf writes map fields (signature defs, function attributes) in any order, so the
    # same model would otherwise get other bytes, another hash and another published version each time
    pb_path.write_bytes(proto.SerializeToString(deterministic=True))
    # The fingerprint hashes saved_model.pb; TF Serving and tf.saved_model tooling read it.
    fingerprinting_utils.write_fingerprint(str(saved_model_dir))
    _derive_fingerprint_uuid(Path(saved_model_dir) / "fingerprint.pb")


def _derive_fingerprint_uuid(path: Path) -> None:
    """TensorFlow stamps each fingerprint with a random ``uuid``; here it is derived from the fingerprint's own
    hashes (the same model, the same uuid), so an identical build is byte-identical."""
    import hashlib

    from tensorflow.core.protobuf import fingerprint_pb2

    fingerprint = fingerprint_pb2.FingerprintDef.FromString(path.read_bytes())
    if not fingerprint.uuid:
        return
    fingerprint.uuid = ""
    digest = hashlib.sha256(fingerprint.SerializeToString(deterministic=True)).digest()
    fingerprint.uuid = str(int.from_bytes(digest[:16], "big"))  # TF writes a 128-bit integer in decimal
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def read_signature_defs(saved_model_dir: Path) -> dict:
    """The SignatureDefs stored in ``saved_model.pb`` (serving meta graph)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    pb_path = Path(saved_model_dir) / "saved_model.pb"
    if not pb_path.is_file():
        raise PackageError(f"{saved_model_dir} is not a SavedModel: no saved_model.pb.",
                           hint="Re-run the package stage.")
    try:
        proto = saved_model_pb2.SavedModel.FromString(pb_path.read_bytes())
    except DecodeError as error:
        raise PackageError(f"{pb_path} is corrupt: {error}.", hint="Re-run the package stage.") from error
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise PackageError(f"{pb_path} has no meta graph tagged 'serve'.", hint="Re-run the package stage.")


def check_signatures(saved_model_dir: Path, num_classes: int) -> None:
    """Raise one error listing every way the SignatureDefs break the contract or TF Serving's rules."""
    problems = signature_problems(saved_model_dir, num_classes)
    if problems:
        raise PackageError(f"SavedModel {saved_model_dir} breaks the serving contract: " + "; ".join(problems) + ".",
                           hint="Re-run the package stage.")


def signature_problems(saved_model_dir: Path, num_classes: int | None = None) -> list[str]:
    """Every problem with the stored SignatureDefs: crossport's contract (for ``num_classes``
    classes; skipped when None, as for any SavedModel TF Serving may load) and TF Serving's rules."""
    return [text for _, text in signature_findings(saved_model_dir, num_classes)]


TF_SERVING_REFUSES = "TF Serving would refuse"  # to load the version, or to answer its requests
CROSSPORT_ONLY = "crossport's contract only"  # TF Serving serves it; crossport's stricter contract objects


def signature_findings(saved_model_dir: Path, num_classes: int | None = None) -> list[tuple[str, str]]:
    """:func:`signature_problems`, each with who objects: TF Serving itself, or only crossport's contract."""
    defs = {key: value for key, value in read_signature_defs(saved_model_dir).items() if not key.startswith("__")}
    contract = [] if num_classes is None else _contract_problems(defs, num_classes)
    return ([(CROSSPORT_ONLY, text) for text in contract]
            + [(TF_SERVING_REFUSES, text) for text in _serving_rule_problems(defs)]
            + [(CROSSPORT_ONLY, text) for text in _batching_problems(defs)])


def _contract_problems(defs: dict, num_classes: int) -> list[str]:
    from tensorflow.core.framework import types_pb2

    problems = []
    image = None
    if PREDICT_KEY in defs and INPUT in defs[PREDICT_KEY].inputs:
        shape = tuple(d.size for d in defs[PREDICT_KEY].inputs[INPUT].tensor_shape.dim[1:])
        image = ImageContract(shape) if image_shape_problem(shape) is None else None
    for key, contract in signature_contracts(num_classes, image).items():
        if key not in defs:
            if not contract.optional:
                problems.append(f"missing signature {key!r}")
            continue
        sig = defs[key]
        if sig.method_name != contract.method:
            problems.append(f"{key}: method {sig.method_name!r}, expected {contract.method!r}")
        for side, wanted, found in (("input", contract.inputs, sig.inputs), ("output", contract.outputs, sig.outputs)):
            if set(found) != set(wanted):
                problems.append(f"{key}: {side}s {sorted(found)}, expected {sorted(wanted)}")
                continue
            for name, tensor in wanted.items():
                info = found[name]
                dtype = types_pb2.DataType.Name(info.dtype)
                shape = tuple(None if d.size == -1 else d.size for d in info.tensor_shape.dim)
                if info.tensor_shape.unknown_rank:
                    shape = ("unknown rank",)
                if dtype != tensor.dtype or shape != tensor.shape:
                    problems.append(f"{key}: {side} {name!r} is {dtype}{list(shape)}, "
                                    f"expected {tensor.dtype}{list(tensor.shape)}")
    return problems


def _serving_rule_problems(defs: dict) -> list[str]:
    """TF Serving's rules for predict and classify SignatureDefs (servables/tensorflow/classifier.cc)."""
    from tensorflow.core.framework import types_pb2

    problems = []
    if PREDICT_KEY not in defs:
        problems.append(f"no {PREDICT_KEY!r} signature: TF Serving's default for requests without a signature_name")
    for key, signature in defs.items():
        if signature.method_name == PREDICT_METHOD:
            if not signature.inputs or not signature.outputs:
                problems.append(f"{key}: a predict signature needs inputs and outputs")
        elif signature.method_name == CLASSIFY_METHOD:
            # one DT_STRING input (serialized tf.Examples), outputs 'classes' (DT_STRING) and/or 'scores' (DT_FLOAT)
            inputs = signature.inputs
            if list(inputs) != [CLASSIFY_INPUT] or inputs[CLASSIFY_INPUT].dtype != types_pb2.DT_STRING:
                problems.append(f"{key}: classify needs exactly one DT_STRING input {CLASSIFY_INPUT!r}, found "
                                f"{ {k: types_pb2.DataType.Name(v.dtype) for k, v in signature.inputs.items()} }")
            outputs = set(signature.outputs)
            if not outputs or outputs - {CLASSES, SCORES}:
                problems.append(f"{key}: classify outputs must be {CLASSES!r} and/or {SCORES!r}, "
                                f"found {sorted(outputs)}")
            if CLASSES in outputs and signature.outputs[CLASSES].dtype != types_pb2.DT_STRING:
                problems.append(f"{key}: classify output {CLASSES!r} must be DT_STRING")
            if SCORES in outputs and signature.outputs[SCORES].dtype != types_pb2.DT_FLOAT:
                problems.append(f"{key}: classify output {SCORES!r} must be DT_FLOAT")
            for name in outputs & {CLASSES, SCORES}:
                if len(signature.outputs[name].tensor_shape.dim) != 2:
                    problems.append(f"{key}: classify output {name!r} must be [batch, classes]")
        else:
            problems.append(f"{key}: method {signature.method_name!r} is neither predict nor classify")
        problems += [f"{key}: {side} {name!r} has no dtype" for side, infos in (("input", signature.inputs),
                                                                                ("output", signature.outputs))
                     for name, info in infos.items() if info.dtype == types_pb2.DT_INVALID]
    return problems


def _batching_problems(defs: dict) -> list[str]:
    """Tensors TF Serving serves but cannot batch: crossport publishes every tensor with a dynamic dimension 0."""
    problems = []
    for key, signature in defs.items():
        for side, infos in (("input", signature.inputs), ("output", signature.outputs)):
            for name, info in infos.items():
                dims = [d.size for d in info.tensor_shape.dim]
                if info.tensor_shape.unknown_rank or not dims:
                    problems.append(f"{key}: {side} {name!r} has no known rank (batches are stacked on dimension 0)")
                elif dims[0] != -1:
                    problems.append(f"{key}: {side} {name!r} has a fixed batch dimension {dims[0]}, expected -1")
    return problems
