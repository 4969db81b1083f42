"""An RGB 32×32 classifier brought as ONNX with an ImageFolder of PNGs: published [N, H, W, C] and served."""

import json

import numpy as np
import pytest

from tests.helpers import Server, run_cli
from tests.onnx_models import colour_folder, rgb_cnn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("rgb")
    folder = colour_folder(root / "images")
    model, x, y = rgb_cnn(root / "rgb.onnx", folder)
    result = run_cli("--onnx", str(root / "rgb.onnx"), "--eval-data", str(folder), "--run-dir", str(root / "run"),
                     "--models-dir", str(root / "models"), "--name", "colours", "--tracking-uri", mlflow_server)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, model, x, y, result


def torch_scores(model, nchw: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(nchw)), dim=1).numpy()


def test_the_version_declares_channels_last_images_everywhere(rgb_run):
    from export.contract import replay_warmup
    from export.servable import check_signatures, image_contract

    root, _, _, _, result = rgb_run
    version = root / "models" / "colours" / "1"
    assert "parity on 240 test examples: PASS" in result.stdout
    assert image_contract(version).shape == (32, 32, 3)
    check_signatures(version, 4)  # serving_default images DT_FLOAT [-1, 32, 32, 3]; classify's Examples 3072 floats
    assert replay_warmup(version)
    card = json.loads((version / "assets.extra" / "servable.json").read_text())
    assert card["input"]["shape"] == [None, 32, 32, 3] and card["input"]["image"]["channel_order"] == "RGB"
    assert card["labels"] == ["blue", "gray", "green", "red"]
    assert card["signatures"]["serving_default"]["inputs"]["images"] == "DT_FLOAT [-1, 32, 32, 3]"
    assert "resize to 32x32" in " ".join(card["input"]["png_to_input"])
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    assert manifest["facts"]["source"]["layout"] == "nchw"
    assert any("by a transpose inside the graph" in step for step in manifest["facts"]["source"]["normalization"])


def test_every_format_answers_as_the_pytorch_model_on_channels_last_images(rgb_run):
    from crossport.formats import BY_NAME
    from crossport.runtimes import load_format

    root, model, x, _, _ = rgb_run
    version = root / "models" / "colours" / "1"
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    expected = torch_scores(model, x)
    for name in ("saved_model", "onnx", "tflite_fp32"):
        fmt = BY_NAME[name]
        scores = load_format(fmt, version / fmt.path)(nhwc)["scores"]
        assert np.array_equal(np.argmax(scores, axis=1), np.argmax(expected, axis=1)), name


@pytest.mark.parametrize("backend", ["saved_model", "tflite_fp32"])
def test_rest_grpc_and_the_upload_route_serve_32x32_rgb(rgb_run, backend):
    import base64

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from pipelines.tools.bench.load import _free_ports

    root, model, x, _, _ = rgb_run
    folder = root / "images"
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    rest_port, grpc_port = _free_ports(2)
    server = Server(root / "models" / "colours", backend, "--grpc-port", str(grpc_port), port=rest_port)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "colours"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(nhwc[:5]))
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
        scores = tf.make_ndarray(reply.outputs["scores"])
        assert np.array_equal(np.argmax(scores, axis=1), np.argmax(torch_scores(model, x[:5]), axis=1))
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(nhwc[:2, :16]))
        with pytest.raises(grpc.RpcError) as refused:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be [batch, 32, 32, 3], found [2, 16, 32, 3]" in refused.value.details()
        channel.close()
        status, answer = server.post("/v1/models/colours:predict", {"instances": nhwc[:3].tolist()})
        assert status == 200, answer
        assert np.array_equal(np.argmax(answer["predictions"], axis=1), np.argmax(torch_scores(model, x[:3]), axis=1))
        status, answer = server.post("/v1/models/colours:predict", {"instances": [[0.0] * 784]})
        assert status == 400 and "of shape [batch, 32, 32, 3], found [1, 784]" in answer["error"]
        status, answer = server.post("/v1/models/colours:classify", {
            "signature_name": "classify", "examples": [{"images": nhwc[0].reshape(-1).tolist()}]})
        assert status == 200 and len(answer["results"][0]) == 4, answer
        red = next((folder / "red").iterdir()).read_bytes()
        status, answer = server.post("/v1/upload", red, content_type="image/png")
        assert status == 200 and answer["predictions"][0]["label"] == "red", answer
        assert base64.b64decode(answer["model_input_png"].split(",", 1)[1])[:4] == b"\x89PNG"
    finally:
        server.stop()


def test_the_registered_mlflow_model_takes_channels_last_images(rgb_run, mlflow_server, monkeypatch):
    """The registry version's pyfunc declares images [-1, 32, 32, 3] and answers on them as PyTorch does."""
    import mlflow

    _, model, x, _, _ = rgb_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    loaded = mlflow.pyfunc.load_model("models:/colours@validated")
    spec = loaded.metadata.get_input_schema().inputs[0]
    assert spec.name == "images" and tuple(spec.shape) == (-1, 32, 32, 3)
    scores = loaded.predict(np.ascontiguousarray(x[:4].transpose(0, 2, 3, 1)))["scores"]
    assert np.array_equal(np.argmax(scores, axis=1), np.argmax(torch_scores(model, x[:4]), axis=1))
