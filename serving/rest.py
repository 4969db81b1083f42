"""TF Serving's REST API semantics over any crossport backend.

The same JSON a deployer sends to TensorFlow Serving works against ``pipelines.serve``:

- ``POST /v1/models/<name>[/versions/<N>|/labels/<L>]:predict`` with ``{"instances": [...]}`` (row
  format → ``{"predictions": [...]}``) or ``{"inputs": ...}`` (columnar → ``{"outputs": ...}``); with
  ``"signature_name": "predict_uint8"``, pixels as integers 0-255;
- ``POST ...:classify`` with ``{"examples": [{"images": [...]}]}`` → ``{"results": [[[label, score], ...]]}``;
- ``GET /v1/models/<name>[/versions/<N>]`` (every version's state, or one's) and ``.../metadata`` (signature defs).

Which version answers is the repository's business (:mod:`serving.repository`): :func:`handle` routes a request
to it and holds it until the answer is built.

Errors are ``{"error": "..."}`` with a 4xx status, as TF Serving answers them.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossport.interface import (
    ASSETS_EXTRA,
    CLASSES,
    CLASSIFY_KEY,
    EMNIST_IMAGE,
    INPUT,
    PREDICT_KEY,
    PREDICT_UINT8_KEY,
    SCORES,
    ImageContract,
)

ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<verb>predict|classify)|/(?P<metadata>metadata))?$")
HTTP_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400}  # as TF Serving's REST maps them


def handle(repository, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
    """A REST request against the versions ``repository`` (a :class:`serving.repository.Repository`) serves:
    routed by model, version or version label as TF Serving routes it; the version is held while it answers."""
    from serving.repository import ServingError

    match = ROUTE.match(path)
    if not match:
        raise RestError(404, f"unknown path {path!r}: expected /v1/models/<name>[/versions/N|/labels/L]"
                             "[:predict|:classify|/metadata]")
    name, label = match["name"], match["label"]
    version = int(match["version"]) if match["version"] else None
    try:
        if match["verb"]:
            if method != "POST":
                raise RestError(405, f":{match['verb']} expects POST")
            with repository.acquire(name, version, label) as servable:
                request = parse_json(body, max_depth(servable.backend.image))
                return 200, servable.predict(request) if match["verb"] == "predict" else servable.classify(request)
        if method != "GET":
            raise RestError(405, "model status and metadata expect GET")
        if match["metadata"]:
            with repository.acquire(name, version, label) as servable:
                return 200, servable.metadata()
        if label:
            with repository.acquire(name, None, label) as servable:
                version = servable.version
        return 200, {"model_version_status": [status_json(entry) for entry in repository.status(name, version)]}
    except ServingError as error:
        raise RestError(HTTP_STATUS.get(error.code, 500), str(error)) from None


def status_json(entry) -> dict:
    """One version's status as TF Serving's REST API writes it."""
    message = str(entry.error) if entry.error is not None else ""
    return {"version": str(entry.number), "state": entry.state,
            "status": {"error_code": entry.code, "error_message": message}}


def max_depth(image: ImageContract) -> int:
    """The deepest valid request: {"instances": [{"images": <one example>}]} or {"inputs": {"images": [<example>,
    ...]}}, three levels around an example of rank 1 ([784]) or 3 ([H][W][C])."""
    return 3 + len(image.shape)


class RestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Backend:
    """A loaded model: ``predict`` maps float32 [N, *image.shape] to scores [N, C]."""

    kind: str
    predict: object
    classify_examples: object | None  # SavedModel: serialized tf.Examples → (classes, scores)
    image: ImageContract = EMNIST_IMAGE  # what one example is: the version's SavedModel declares it
    predict_uint8: object | None = None  # uint8 [N, *image.shape] → scores, where the version declares predict_uint8


def load_backend(version_dir: Path, kind: str, threads: int | None = None, instances: int = 1) -> Backend:
    """``threads``: intra-op threads of the runtime (TFLite interpreter, ONNX Runtime session, TensorFlow);
    ``instances``: TFLite interpreters answering at once (the other runtimes run concurrent calls themselves)."""
    from crossport.formats import BY_NAME
    from crossport.runtimes import load_format, load_saved_model
    from export.servable import image_contract, read_signature_defs

    if kind not in BY_NAME or not BY_NAME[kind].served:
        raise ValueError(f"unknown backend {kind!r}")
    fmt = BY_NAME[kind]
    run = load_format(fmt, version_dir / fmt.path, threads, instances)
    # only the SavedModel has TF Serving's classify signature
    classify = load_saved_model(version_dir, CLASSIFY_KEY, threads) if fmt.loader == "saved_model" else None
    predict_uint8 = None
    if PREDICT_UINT8_KEY in read_signature_defs(version_dir):  # versions published before it lack it
        if fmt.loader == "saved_model":
            raw = load_saved_model(version_dir, PREDICT_UINT8_KEY, threads)
            predict_uint8 = lambda rows: raw(rows)[SCORES]  # noqa: E731
        else:  # x / 255 in float32, as the signature's graph computes it: the same floats, the same scores
            predict_uint8 = lambda rows: run(rows.astype(np.float32) / np.float32(255))[SCORES]  # noqa: E731
    return Backend(kind, lambda rows: run(rows)[SCORES], classify, image_contract(version_dir), predict_uint8)


def served_labels(version_dir: Path, backend: Backend) -> list[str]:
    """The version's labels, checked against what the loaded model answers: a version edited after publishing (and
    served with --allow-changed) whose labels cannot name its classes is refused at start, not per request."""
    from crossport.errors import PackageError
    from crossport.interface import label_problem

    path = version_dir / ASSETS_EXTRA / "labels.txt"
    labels = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    classes = int(np.asarray(backend.predict(np.zeros((1, *backend.image.shape), np.float32))).shape[-1])
    problem = label_problem(labels, classes)
    if problem:
        raise PackageError(f"{path} {problem}; this version cannot be served.",
                           hint="Serve another --version, or re-publish this one.")
    return labels


class Servable:
    """One published version behind TF Serving's REST semantics."""

    def __init__(self, name: str, version: int, version_dir: Path, backend: Backend) -> None:
        self.name = name
        self.version = version
        self.version_dir = version_dir
        self.backend = backend
        self.labels = served_labels(version_dir, backend)

    # --- verbs -----------------------------------------------------------------------------

    def predict(self, request: dict) -> dict:
        signature = request.get("signature_name", PREDICT_KEY)
        if signature not in (PREDICT_KEY, PREDICT_UINT8_KEY):
            raise RestError(400, f"signature {signature!r} is not a predict signature; use {PREDICT_KEY} or "
                                 f"{PREDICT_UINT8_KEY} (classify has its own :classify endpoint)")
        raw = signature == PREDICT_UINT8_KEY
        if raw and self.backend.predict_uint8 is None:
            raise RestError(400, f"Serving signature key \"{PREDICT_UINT8_KEY}\" not found (this version was "
                                 f"published before it existed; send pixels / 255 to {PREDICT_KEY})")
        if ("instances" in request) == ("inputs" in request):
            raise RestError(400, "expected exactly one of 'instances' (row format) or 'inputs' (columnar format)")
        if "instances" in request:
            instances = request["instances"]
            if isinstance(instances, np.ndarray):  # rows read_batch has read
                return {"predictions": as_json_numbers(self._scores(instances, raw))}
            if not isinstance(instances, list) or not instances:
                raise RestError(400, "'instances' must be a non-empty list")
            rows = []
            for index, item in enumerate(instances):
                if isinstance(item, dict) and set(item) != {INPUT}:
                    raise RestError(400, f"instance {index} is an object with {sorted(item)[:5]}; expected only "
                                         f"{INPUT!r}, or the example's numbers themselves")
                rows.append(item[INPUT] if isinstance(item, dict) else item)
            return {"predictions": as_json_numbers(self._scores(rows, raw))}
        inputs = request["inputs"]
        if isinstance(inputs, dict):
            if set(inputs) != {INPUT}:
                raise RestError(400, f"expected the input {INPUT!r}, found {sorted(inputs)}")
            inputs = inputs[INPUT]
        return {"outputs": as_json_numbers(self._scores(inputs, raw))}

    def classify(self, request: dict) -> dict:
        # TF Serving's default signature is serving_default, a predict one: classify must name its signature
        signature = request.get("signature_name", PREDICT_KEY)
        if signature != CLASSIFY_KEY:
            raise RestError(400, f"signature {signature!r} is not a classify signature: expected classification "
                                 "signature method_name to be tensorflow/serving/classify (TF Serving defaults to "
                                 f"serving_default); send \"signature_name\": \"{CLASSIFY_KEY}\"")
        examples = request.get("examples")
        if not isinstance(examples, list) or not examples:
            raise RestError(400, f"expected 'examples': a non-empty list of {{\"{INPUT}\": "
                                 f"[{self.backend.image.size} floats]}}")
        context = request.get("context", {})
        if not isinstance(context, dict):
            raise RestError(400, f"expected 'context' to be an object of features, found {type(context).__name__}")
        rows = []
        for index, example in enumerate(examples):
            if not isinstance(example, dict):
                raise RestError(400, f"example {index} is not an object with feature {INPUT!r}")
            features = {**context, **example}
            if INPUT not in features:
                raise RestError(400, f"example {index} has no feature {INPUT!r}")
            rows.append(features[INPUT])
        classes, scores = self.classify_array(self._rows(rows, flat=True))
        return {"results": [[[label, float(score)] for label, score in zip(row_classes, row_scores, strict=True)]
                            for row_classes, row_scores in zip(classes, scores, strict=True)]}

    def classify_array(self, array: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
        """Labels and scores per row: the SavedModel's classify signature, or any backend's scores with the labels."""
        if self.backend.classify_examples is not None:
            outputs = self.backend.classify_examples(array)
            return [[label.decode() for label in row] for row in outputs[CLASSES]], outputs[SCORES]
        return [self.labels] * len(array), np.asarray(self.backend.predict(array))

    def metadata(self) -> dict:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        from export.servable import read_signature_defs

        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in read_signature_defs(self.version_dir).items():
            if not key.startswith("__"):
                signature_map.signature_def[key].CopyFrom(signature)
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
            "metadata": {"signature_def": {
                "@type": "type.googleapis.com/tensorflow.serving.SignatureDefMap",
                **json_format.MessageToDict(signature_map, preserving_proto_field_name=True),
            }},
        }

    # --- helpers ---------------------------------------------------------------------------

    def _rows(self, rows, flat: bool = False, raw: bool = False) -> np.ndarray:
        """A batch of examples in [0, 1], each of the image's shape (``flat``: each its values in one list, as a
        tf.Example feature holds them; ``raw``: integers 0-255, as uint8)."""
        from serving.serverless_handler import BadInput, numbers, pixel_problem, raw_pixel_problem

        try:
            array = numbers(rows, f"{INPUT!r} as a batch of {self.image_text()}")
        except BadInput as error:
            raise RestError(400, str(error)) from error
        image = self.backend.image
        if flat and array.ndim == 2 and array.shape[1] == image.size:
            array = array.reshape(len(array), *image.shape)
        if array.shape[1:] != image.shape:
            raise RestError(400, f"expected {INPUT!r} of shape [batch, {self.image_text()}], found {list(array.shape)}")
        problem = (raw_pixel_problem if raw else pixel_problem)(array)
        if problem:
            raise RestError(400, f"{INPUT!r}: {problem}")
        return array.astype(np.uint8) if raw else array

    def image_text(self) -> str:
        return ", ".join(map(str, self.backend.image.shape))

    def _scores(self, rows, raw: bool = False) -> np.ndarray:
        if raw:
            return np.asarray(self.backend.predict_uint8(self._rows(rows, raw=True)))
        return np.asarray(self.backend.predict(self._rows(rows)))


def as_json_numbers(scores: np.ndarray) -> np.ndarray:
    """Scores as the answer carries them: float64 (each float32 score exactly), C-contiguous, so the encoder writes
    the array itself with no Python float per score, each as the shortest decimal that reads back as that float64
    (the same bytes ``.tolist()`` would give)."""
    return np.ascontiguousarray(scores, dtype=np.float64)


def parse_json(body: bytes | None, depth: int = max_depth(EMNIST_IMAGE)) -> dict:
    """The request object. A batch of number rows under ``instances`` or ``inputs`` (the bulk of a predict body)
    is read by :func:`read_batch` straight into a float64 array; anything else, and every malformed body, takes
    the checked path, which answers each mistake with its own message."""
    from serving.serverless_handler import BadInput
    from serving.serverless_handler import parse_json as parse_checked

    if not body:
        raise RestError(400, "expected a JSON request body")
    request = read_batch(body)
    if request is not None:
        return request
    try:
        request = parse_checked(body, depth)
    except BadInput as error:
        raise RestError(400, str(error)) from error
    if not isinstance(request, dict):
        raise RestError(400, f"expected a JSON object, found {type(request).__name__}")
    return request


# --- the batch fast path -------------------------------------------------------------------

_PARSERS = threading.local()  # a simdjson parser is reused per thread (its documents live in it)
_FAST_KEYS = {"instances", "inputs", "signature_name"}


def read_batch(body: bytes) -> dict | None:
    """``{"instances" | "inputs": [[numbers], ...], "signature_name"?: "..."}`` (``inputs`` may also be
    ``{"images": [[...]]}``) with the rows as one float64 [N, K] array, read by simdjson without a Python float
    per number; ``None`` for any other body, valid or not, which :func:`parse_json` then reads the checked way.

    The array holds the same float64 values the checked path's parse would (both parsers round each decimal
    correctly; integers convert as NumPy converts them). Taken only when the body is exactly that shape: one
    object with unique keys, every row a list of the same length whose elements are all numbers (``as_buffer``
    refuses any other element), and no list nested in a row (the body's ``[`` count is the rows' plus the
    batch's own, so a nested list or a ``[`` in a string falls back)."""
    try:
        import simdjson
    except ImportError:
        return None
    parser = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = _PARSERS.parser = simdjson.Parser()
    try:
        return _read_batch(parser.parse(body), body, simdjson)
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError):  # malformed or another shape
        return None


def _read_batch(document, body: bytes, simdjson) -> dict | None:
    if not isinstance(document, simdjson.Object):
        return None
    keys = list(document.keys())
    if len(set(keys)) != len(keys) or not set(keys) <= _FAST_KEYS or ("instances" in keys) == ("inputs" in keys):
        return None
    request: dict = {}
    if "signature_name" in keys:
        signature = document["signature_name"]
        if not isinstance(signature, str):
            return None
        request["signature_name"] = signature
    key = "instances" if "instances" in keys else "inputs"
    batch = document[key]
    if key == "inputs" and isinstance(batch, simdjson.Object):
        if list(batch.keys()) != [INPUT]:
            return None
        batch = batch[INPUT]
    if not isinstance(batch, simdjson.Array) or not len(batch):
        return None
    rows = len(batch)
    width = None
    for row in batch:
        if not isinstance(row, simdjson.Array) or (width is not None and len(row) != width):
            return None
        width = len(row)
    if not width or body.count(b"[") != rows + 1:
        return None
    values = np.frombuffer(batch.as_buffer(of_type="d"), dtype=np.float64)
    if values.size != rows * width:
        return None
    request[key] = values.reshape(rows, width)
    return request
