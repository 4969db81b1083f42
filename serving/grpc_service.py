"""TF Serving's gRPC API over any crossport backend, built on the ``tensorflow-serving-api`` protos.

Serves ``tensorflow.serving.PredictionService`` (``Predict``, ``Classify``, ``GetModelMetadata``)
and ``tensorflow.serving.ModelService`` (``GetModelStatus``) for every version a ``pipelines.serve``
process serves (by model name, version number or version label), so a client written against TF
Serving — ``prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)`` — works
unchanged. Tensors travel as ``TensorProto`` in either encoding TF Serving accepts
(``tensor_content`` bytes or ``float_val``) and answers come back as ``tensor_content``.
Mistakes get the status TF Serving gives them: an unknown model or version is
``NOT_FOUND``; a wrong signature, input name, dtype or shape is ``INVALID_ARGUMENT``.
Tensors are read and written with NumPy, not ``tf.make_ndarray``: a request costs the
backend's time and the protos' (which do import TensorFlow's package, once, at start).
"""

from __future__ import annotations

import logging
import math
from concurrent import futures

import numpy as np

from crossport.interface import CLASSIFY_KEY, INPUT, PREDICT_KEY, PREDICT_UINT8_KEY, SCORES
from serving.repository import ServingError

log = logging.getLogger("crossport.serve")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # about 20,000 images per Predict as float32 tensor_content
MAX_ELEMENTS = MAX_MESSAGE_BYTES // 4  # the most float32 values a message may carry, however they are encoded
SIGNATURE_DEF = "signature_def"  # the one metadata field TF Serving answers


def held(repository, spec):
    """The version a request's ``model_spec`` names (by number, by label, or the newest), held while it answers."""
    version = spec.version.value if spec.HasField("version") else None
    return repository.acquire(spec.name, version, spec.version_label or None)


# each dtype a Predict signature takes: its numpy type in tensor_content, and the repeated field of the other encoding
ENCODINGS = {"DT_FLOAT": ("<f4", "float_val"), "DT_UINT8": ("u1", "int_val")}


def tensor_to_array(proto, name: str, dtype: str = "DT_FLOAT") -> np.ndarray:
    """A TensorProto of ``dtype`` (DT_FLOAT or DT_UINT8; in ``tensor_content`` or the value field) as that numpy
    type, TF's rules for each encoding."""
    from tensorflow.core.framework import types_pb2

    if proto.dtype != types_pb2.DataType.Value(dtype):
        kind = "float" if dtype == "DT_FLOAT" else "uint8"
        raise ServingError("INVALID_ARGUMENT", f"Expects arg[0] ({name}) to be {kind} but "
                                               f"{types_pb2.DataType.Name(proto.dtype)} is provided")
    numpy_type, field = ENCODINGS[dtype]
    width = np.dtype(numpy_type).itemsize
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in shape):
        raise ServingError("INVALID_ARGUMENT", f"input {name!r} has an unknown dimension in shape {shape}")
    count = math.prod(shape)  # exact: numpy's product of 2**62 and 4 wraps to 0
    if count > MAX_ELEMENTS:  # before anything is allocated: a single float_val may describe any shape
        raise ServingError("INVALID_ARGUMENT", f"input {name!r} of shape {shape} holds {count} values; a request "
                                               f"may carry at most {MAX_ELEMENTS} ({MAX_MESSAGE_BYTES} bytes of "
                                               "float32)")
    if proto.tensor_content:
        if len(proto.tensor_content) != width * count:
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: tensor_content holds {len(proto.tensor_content)} "
                                                   f"bytes; shape {shape} needs {width * count}")
        values = np.frombuffer(proto.tensor_content, dtype=numpy_type)
    else:
        listed = getattr(proto, field)
        if dtype == "DT_UINT8" and any(not 0 <= value <= 255 for value in listed):
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: int_val holds values outside 0-255 for DT_UINT8")
        values = np.asarray(listed, dtype=numpy_type)
        if len(values) == 1 and count > 1:  # TF repeats a single value over the whole shape
            values = np.full(count, values[0], numpy_type)
        elif len(values) != count:
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: {len(values)} {field} values for shape "
                                                   f"{shape} ({count} elements)")
    return values.reshape(shape).astype(numpy_type, copy=False)


def array_to_tensor(array: np.ndarray):
    """A uint8 array as DT_UINT8, any other as DT_FLOAT, in ``tensor_content``."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    raw = np.asarray(array).dtype == np.uint8
    array = np.ascontiguousarray(array, dtype="u1" if raw else "<f4")
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_UINT8 if raw else types_pb2.DT_FLOAT, tensor_content=array.tobytes(),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s)
                                                            for s in array.shape]))


def _batch_of(array: np.ndarray, image) -> np.ndarray:
    if array.ndim < 1 or array.shape[1:] != image.shape:
        raise ServingError("INVALID_ARGUMENT", f"input {INPUT!r} must be [batch, {', '.join(map(str, image.shape))}], "
                                               f"found {list(array.shape)}")
    return array


def images_of(array: np.ndarray, image) -> np.ndarray:
    """``array`` as a batch of the served model's examples (``image``: its crossport.interface.ImageContract)."""
    _batch_of(array, image)
    from serving.serverless_handler import pixel_problem

    problem = pixel_problem(array)
    if problem:
        raise ServingError("INVALID_ARGUMENT", f"input {INPUT!r}: {problem}")
    return array


def predict(repository, request):
    with held(repository, request.model_spec) as servable:
        return _predict(servable, request)


def _predict(servable, request):
    from tensorflow_serving.apis import predict_pb2

    signature = request.model_spec.signature_name or PREDICT_KEY
    if signature == CLASSIFY_KEY:
        raise ServingError("INVALID_ARGUMENT", f"signature {CLASSIFY_KEY!r} is a classify signature: call Classify")
    raw = signature == PREDICT_UINT8_KEY
    if signature != PREDICT_KEY and not (raw and servable.backend.predict_uint8 is not None):
        raise ServingError("INVALID_ARGUMENT", f"Serving signature key \"{signature}\" not found.")
    names = sorted(request.inputs)
    if names != [INPUT]:
        raise ServingError("INVALID_ARGUMENT", f"input tensor alias not found in signature: "
                                               f"{', '.join(n for n in names if n != INPUT) or '(none)'}. Inputs "
                                               f"expected to be in the set {{{INPUT}}}.")
    unknown = [name for name in request.output_filter if name != SCORES]
    if unknown:
        raise ServingError("INVALID_ARGUMENT", f"output tensor alias not found in signature: {unknown[0]} "
                                               f"Outputs expected to be in the set {{{SCORES}}}.")
    if raw:  # every uint8 is a pixel: only the shape is checked
        images = _batch_of(tensor_to_array(request.inputs[INPUT], INPUT, "DT_UINT8"), servable.backend.image)
        scores = np.asarray(servable.backend.predict_uint8(images))
    else:
        images = images_of(tensor_to_array(request.inputs[INPUT], INPUT), servable.backend.image)
        scores = np.asarray(servable.backend.predict(images))
    response = predict_pb2.PredictResponse()
    _answer_spec(response.model_spec, servable, signature)
    response.outputs[SCORES].CopyFrom(array_to_tensor(scores))
    return response


def classify(repository, request):
    with held(repository, request.model_spec) as servable:
        return _classify(servable, request)


def _classify(servable, request):
    from tensorflow_serving.apis import classification_pb2

    signature = request.model_spec.signature_name or PREDICT_KEY
    if signature == PREDICT_KEY:
        raise ServingError("INVALID_ARGUMENT", "Expected classification signature method_name to be "
                                               "tensorflow/serving/classify. Was: tensorflow/serving/predict "
                                               f"(name the signature: signature_name {CLASSIFY_KEY!r})")
    if signature != CLASSIFY_KEY:
        raise ServingError("INVALID_ARGUMENT", f"Serving signature key \"{signature}\" not found.")
    kind = request.input.WhichOneof("kind")
    if kind == "example_list":
        examples, context = request.input.example_list.examples, None
    elif kind == "example_list_with_context":
        examples = request.input.example_list_with_context.examples
        context = request.input.example_list_with_context.context
    else:
        raise ServingError("INVALID_ARGUMENT", "Input is empty")
    if not examples:
        raise ServingError("INVALID_ARGUMENT", "Input is empty")
    rows, image = [], servable.backend.image
    for index, example in enumerate(examples):
        feature = example.features.feature.get(INPUT)
        if feature is None and context is not None:
            feature = context.features.feature.get(INPUT)
        if feature is None or feature.WhichOneof("kind") != "float_list":
            raise ServingError("INVALID_ARGUMENT", f"example {index} has no float feature {INPUT!r} "
                                                   f"({image.size} values)")
        if len(feature.float_list.value) != image.size:
            raise ServingError("INVALID_ARGUMENT", f"example {index}: feature {INPUT!r} has "
                                                   f"{len(feature.float_list.value)} values, expected {image.size}")
        rows.append(np.asarray(feature.float_list.value, dtype=np.float32).reshape(image.shape))
    classes, scores = servable.classify_array(images_of(np.stack(rows), image))
    response = classification_pb2.ClassificationResponse()
    _answer_spec(response.model_spec, servable, CLASSIFY_KEY)
    for row_classes, row_scores in zip(classes, scores, strict=True):
        result = response.result.classifications.add()
        for label, score in zip(row_classes, row_scores, strict=True):
            result.classes.add(label=label, score=float(score))
    return response


def metadata(repository, request):
    with held(repository, request.model_spec) as servable:
        return _metadata(servable, request)


def _metadata(servable, request):
    from tensorflow_serving.apis import get_model_metadata_pb2

    from export.servable import read_signature_defs

    fields = list(request.metadata_field)
    if fields != [SIGNATURE_DEF]:
        raise ServingError("INVALID_ARGUMENT", f"Metadata field {(fields or [''])[0]} is not supported" if fields
                           else "GetModelMetadataRequest must specify at least one metadata_field")
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in read_signature_defs(servable.version_dir).items():
        if not key.startswith("__"):
            signature_map.signature_def[key].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    _answer_spec(response.model_spec, servable, "")
    response.metadata[SIGNATURE_DEF].Pack(signature_map)
    return response


def status(repository, request):
    """Every version the server has known (LOADING, AVAILABLE, UNLOADING, END), or the one the request names."""
    from tensorflow_serving.apis import get_model_status_pb2

    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    if spec.version_label:
        with held(repository, spec) as servable:
            version = servable.version
    response = get_model_status_pb2.GetModelStatusResponse()
    for entry in repository.status(spec.name, version):
        answer = response.model_version_status.add(version=entry.number)
        answer.state = get_model_status_pb2.ModelVersionStatus.State.Value(entry.state)
        codes = answer.status.DESCRIPTOR.fields_by_name["error_code"].enum_type  # tensorflow.error.Code
        answer.status.error_code = codes.values_by_name[entry.code].number
        answer.status.error_message = str(entry.error) if entry.error is not None else ""
    return response


def _answer_spec(spec, servable, signature: str) -> None:
    spec.name = servable.name
    spec.version.value = servable.version
    spec.signature_name = signature


def make_grpc_server(repository, host: str, port: int, *, workers: int = 8, reuse_port: bool = False):
    """A started-on-demand ``grpc.Server`` answering for the versions ``repository`` serves; call ``.start()``.
    Port 0 picks a free one (``server.crossport_port`` tells which). ``reuse_port``: share the port with the other
    ``--workers`` (gRPC's Linux default, which would also share it with a stale server: off otherwise)."""
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    def call(handler):
        def method(request, context):
            try:
                return handler(repository, request)
            except ServingError as error:
                context.abort(getattr(grpc.StatusCode, error.code), str(error))
            except Exception:  # a bug answers INTERNAL with a message, never hangs the client
                log.exception("gRPC request failed")
                context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        return method

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        Predict = staticmethod(call(predict))
        Classify = staticmethod(call(classify))
        GetModelMetadata = staticmethod(call(metadata))

    class Models(model_service_pb2_grpc.ModelServiceServicer):
        GetModelStatus = staticmethod(call(status))

    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", int(reuse_port))]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for gRPC")
    server.crossport_port = bound
    return server

