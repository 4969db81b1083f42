"""TF Serving's gRPC API from `pipelines.serve --grpc-port`, called with the official client stubs as TF Serving's
clients call them."""

from __future__ import annotations

import numpy as np
import pytest

from crossport.interface import INPUT, SCORES
from tests.helpers import Server, images, predict_request


@pytest.fixture(scope="module", params=["saved_model", "tflite_fp32"])
def served(request, pipeline_run):
    """A real server process per backend with REST and gRPC; the gRPC channel and the stubs."""
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    from pipelines.tools.bench.load import _free_ports

    rest_port, port = _free_ports(2)  # distinct: two ports chosen one after the other may be the same
    server = Server(pipeline_run.models_dir / "emnist_mlp", request.param, "--grpc-port", str(port), port=rest_port)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=60)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel), server, request.param)
    channel.close()
    server.stop()


def rest_scores(server, batch: np.ndarray) -> np.ndarray:
    status, body = server.post("/v1/models/emnist_mlp:predict", {"instances": batch.tolist()})
    assert status == 200
    return np.asarray(body["predictions"], dtype=np.float32)


@pytest.mark.parametrize("encoding", ["content", "float_val"])
def test_predict_answers_as_rest_does_in_either_tensor_encoding(served, encoding):
    import tensorflow as tf

    prediction, _, server, _ = served
    batch = images(5)
    response = prediction.Predict(predict_request(batch, encoding=encoding, signature="serving_default",
                                                  version=1), timeout=60)
    scores = tf.make_ndarray(response.outputs[SCORES])
    assert scores.shape == (5, 10) and response.model_spec.version.value == 1
    np.testing.assert_array_equal(scores, rest_scores(server, batch))  # same backend, same bytes


def pixels(count: int = 3) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, 784), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["content", "int_val"])
def test_predict_uint8_answers_what_serving_default_answers_on_pixels_over_255(served, encoding):
    """A quarter of the bytes: 0-255 pixels as DT_UINT8, scaled inside the SavedModel's graph (or, for another
    backend, in float32 as the graph does): the same scores as the float request, bit for bit."""
    import tensorflow as tf

    prediction, _, server, _ = served
    batch = pixels(4)
    request = predict_request(images(1), signature="predict_uint8")
    tensor = request.inputs[INPUT]
    tensor.CopyFrom(tf.make_tensor_proto(batch, dtype=tf.uint8))
    if encoding == "int_val":
        tensor.ClearField("tensor_content")
        tensor.int_val.extend(batch.ravel().tolist())
    response = prediction.Predict(request, timeout=60)
    assert response.model_spec.signature_name == "predict_uint8"
    expected = rest_scores(server, batch.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs[SCORES]), expected)
    status, body = server.post("/v1/models/emnist_mlp:predict", {"signature_name": "predict_uint8",
                                                                 "instances": batch.tolist()})
    assert status == 200
    np.testing.assert_array_equal(np.asarray(body["predictions"], np.float32), expected)


def test_classify_names_its_signature_and_returns_labels(served):
    from tensorflow_serving.apis import classification_pb2

    prediction, _, server, _ = served
    batch = images(2)
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "emnist_mlp"
    request.model_spec.signature_name = "classify"
    for row in batch:
        request.input.example_list.examples.add().features.feature[INPUT].float_list.value.extend(row.tolist())
    response = prediction.Classify(request, timeout=60)
    status, rest = server.post("/v1/models/emnist_mlp:classify",
                               {"signature_name": "classify", "examples": [{INPUT: row.tolist()} for row in batch]})
    assert status == 200
    got = [[(c.label, pytest.approx(c.score, abs=1e-7)) for c in result.classes]
           for result in response.result.classifications]
    assert got == [[(label, score) for label, score in row] for row in rest["results"]]
    assert [c.label for c in response.result.classifications[0].classes] == [str(d) for d in range(10)]


def test_metadata_and_status_as_tf_serving_reports_them(served):
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

    prediction, models, _, _ = served
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "emnist_mlp"
    request.metadata_field.append("signature_def")
    response = prediction.GetModelMetadata(request, timeout=60)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) == {"serving_default", "predict_uint8", "classify"}
    assert signatures.signature_def["classify"].method_name == "tensorflow/serving/classify"
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "emnist_mlp"
    (entry,) = models.GetModelStatus(status_request, timeout=60).model_version_status
    assert entry.version == 1 and entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def mistakes():
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2

    wrong_shape = predict_request(images(2))
    wrong_shape.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.zeros((2, 100), np.float32)))
    wrong_dtype = predict_request(images(2))
    wrong_dtype.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.zeros((2, 784), np.float64)))
    wrong_name = predict_request(images(2))
    wrong_name.inputs["pixels"].CopyFrom(wrong_name.inputs.pop(INPUT))
    out_of_range = predict_request(images(2))
    out_of_range.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.full((2, 784), -1e30, np.float32)))
    not_a_number = predict_request(images(2))
    not_a_number.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.full((2, 784), np.nan, np.float32)))
    huge = predict_request(images(1))  # one float_val repeated over 2**40 rows: 3 PiB if allocated
    huge.inputs[INPUT].tensor_shape.dim[0].size = 2**40
    huge.inputs[INPUT].ClearField("tensor_content")
    huge.inputs[INPUT].float_val.append(0.5)
    wrapping = predict_request(images(1))  # 2**62 x 4 elements: numpy's product wraps to 0
    wrapping.inputs[INPUT].ClearField("tensor_content")
    del wrapping.inputs[INPUT].tensor_shape.dim[:]
    wrapping.inputs[INPUT].tensor_shape.dim.add().size = 2**62
    wrapping.inputs[INPUT].tensor_shape.dim.add().size = 4
    uint8_as_float = predict_request(images(1), signature="predict_uint8")
    uint8_wrapping = predict_request(images(1), signature="predict_uint8")
    uint8_wrapping.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.zeros((1, 784), np.uint8), dtype=tf.uint8))
    uint8_wrapping.inputs[INPUT].ClearField("tensor_content")
    uint8_wrapping.inputs[INPUT].int_val.extend([256] * 784)
    classify_default = classification_pb2.ClassificationRequest()
    classify_default.model_spec.name = "emnist_mlp"  # no signature_name: TF Serving's default is a predict one
    classify_default.input.example_list.examples.add().features.feature[INPUT].float_list.value.extend([0.0] * 784)
    return [
        ("Predict", predict_request(images(1), name="other"), "NOT_FOUND", "Servable not found for request: "
                                                                            "Latest(other)"),
        ("Predict", predict_request(images(1), version=7), "NOT_FOUND", "Specific(emnist_mlp, 7)"),
        ("Predict", predict_request(images(1), signature="nope"), "INVALID_ARGUMENT",
         'Serving signature key "nope" not found.'),
        ("Predict", wrong_shape, "INVALID_ARGUMENT", "must be [batch, 784], found [2, 100]"),
        ("Predict", wrong_dtype, "INVALID_ARGUMENT", "to be float but DT_DOUBLE is provided"),
        ("Predict", wrong_name, "INVALID_ARGUMENT", "input tensor alias not found in signature: pixels"),
        ("Predict", out_of_range, "INVALID_ARGUMENT", "input 'images': expected pixel values in [0, 1] (grayscale "
                                                      "/ 255), found -1e+30 at index [0, 0] and 1567 more"),
        ("Predict", not_a_number, "INVALID_ARGUMENT", "found nan at index [0, 0]"),
        ("Predict", huge, "INVALID_ARGUMENT", f"input 'images' of shape [{2**40}, 784] holds {2**40 * 784} values; "
                                              "a request may carry at most 16777216 (67108864 bytes of float32)"),
        ("Predict", wrapping, "INVALID_ARGUMENT", f"of shape [{2**62}, 4] holds {2**64} values"),
        ("Classify", classify_default, "INVALID_ARGUMENT", "Expected classification signature method_name to be "
                                                           "tensorflow/serving/classify"),
        ("Predict", uint8_as_float, "INVALID_ARGUMENT", "Expects arg[0] (images) to be uint8 but DT_FLOAT is provided"),
        ("Predict", uint8_wrapping, "INVALID_ARGUMENT", "int_val holds values outside 0-255 for DT_UINT8"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_mistakes_get_the_status_tf_serving_returns(served, case):
    import grpc

    prediction, _, _, _ = served
    method, request, code, message = mistakes()[case]
    with pytest.raises(grpc.RpcError) as raised:
        getattr(prediction, method)(request, timeout=60)
    assert raised.value.code() == getattr(grpc.StatusCode, code)
    assert message in raised.value.details()


def test_serve_takes_a_version_directory_as_export_serverless_does(pipeline_run):
    from crossport.errors import ConfigError
    from serving.serve import open_repository

    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    repository = open_repository(version, None, "onnx")
    assert (repository.names, repository.served("emnist_mlp")) == (["emnist_mlp"], [1])
    with pytest.raises(ConfigError, match=r"is version 1, but --version 2 was given"):
        open_repository(version, 2, "onnx")


def test_serve_console_shows_only_its_own_lines(pipeline_run, tmp_path):
    """Without --debug, TensorFlow's, LiteRT's and gRPC's own output (native code included) goes to --log-file; the
    console gets crossport's lines: where that log is, what is served, one line per request."""
    import re

    from pipelines.tools.bench.load import _free_ports

    rest_port, port = _free_ports(2)
    log_file = tmp_path / "serve.log"
    server = Server(pipeline_run.models_dir / "emnist_mlp", "tflite_fp32", "--grpc-port", str(port), "--log-file",
                    str(log_file), port=rest_port)
    try:
        status, _ = server.post("/v1/models/emnist_mlp:predict", {"instances": images(2).tolist()})
        assert status == 200
    finally:
        server.stop()
    output = server.output()
    ours = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")
    assert [line for line in output.splitlines() if line.strip() and not ours.match(line)] == []
    assert f"library output in {log_file}" in output and "POST /v1/models/emnist_mlp:predict" in output
    assert re.search(r"oneDNN|XNNPACK|absl|cuda|tensorflow", log_file.read_text(errors="replace"), re.IGNORECASE)
