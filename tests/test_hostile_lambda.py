"""Hostile events to the serverless handler, loaded from a built package exactly as Lambda loads
it: each gets status 400 with a message, never an uncaught exception, and the package is unchanged."""

import base64
import importlib.util
import json
import sys

import pytest

from crossport.files import sha256_path
from tests.helpers import blank_png, stroke_images


@pytest.fixture(scope="module")
def package(pipeline_run, tmp_path_factory):
    from serving.serverless import build_package

    directory, _ = build_package(pipeline_run.models_dir / "emnist_mlp" / "1", tmp_path_factory.mktemp("pkg") / "fn")
    spec = importlib.util.spec_from_file_location("lambda_package_handler", directory / "handler.py")
    handler = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = handler
    spec.loader.exec_module(handler)
    before = sha256_path(directory)
    yield handler
    assert sha256_path(directory) == before, "answering events must never change the package"
    del sys.modules[spec.name]


def event(body, **extra) -> dict:
    return {"body": body if isinstance(body, str) else json.dumps(body), **extra}


def image_event(data: bytes) -> dict:
    return event({"image": base64.b64encode(data).decode()})


PIXELS = [0.5] * 784
CASES = [
    ("event-none", None, "found NoneType"),
    ("event-string", "hello", "expected an API Gateway proxy event (an object with 'body'), found str"),
    ("event-list", [1, 2], "found list"),
    ("event-int", 7, "found int"),
    ("no-body", {"headers": {}}, "expected a request body"),
    ("body-dict", {"body": {"pixels": PIXELS}}, "expected 'body' as text"),
    ("body-list", {"body": [1]}, "found list"),
    ("body-int", {"body": 5}, "found int"),
    ("body-not-json", event("{pixels"), "not valid JSON"),
    ("body-json-list", event([1, 2]), "expected a JSON object with 'image'"),
    ("body-json-int", event(3), "expected a JSON object"),
    ("body-json-string", event('"pixels"'), "expected a JSON object"),
    ("body-json-null", event("null"), "expected a JSON object with 'image' (base64 PNG or JPEG) or 'pixels', found "
                                      "the JSON literal null"),
    ("body-json-true", event(" true "), "or 'pixels', found the JSON literal true"),
    ("body-json-negative", event("-1"), "or 'pixels', found a number"),
    ("body-empty", event(""), "or 'pixels', found nothing"),
    ("body-words", event("hello"), "the body is not valid JSON"),
    ("nested-100000", event("{\"pixels\": " + "[" * 100_000 + "]" * 100_000 + "}"), "nested 100001 levels deep"),
    ("nested-4", event({"pixels": [[[0.5] * 28] * 28]}), "nested 4 levels deep; a request here has at most 3"),
    ("neither-key", event({"img": "x"}), "expected 'image' or 'pixels', found keys ['img']"),
    ("pixels-strings", event({"pixels": ["0.5"] * 784}), "found string values"),
    ("pixels-booleans", event({"pixels": [True] * 784}), "JSON literal true"),
    ("pixels-null", event({"pixels": None}), "JSON literal null"),
    ("pixels-nan", event('{"pixels": [NaN' + ", 0" * 783 + "]}"), "JSON literal NaN"),
    ("pixels-empty", event({"pixels": []}), "found an empty list"),
    ("pixels-number", event({"pixels": 0.5}), "found shape []"),
    ("pixels-wrong-length", event({"pixels": [0.5] * 783}), "found shape [783]"),
    ("pixels-ragged", event({"pixels": [[0.5] * 28] * 27 + [[0.5] * 27]}), "equal length"),
    ("pixels-out-of-range", event({"pixels": [255] * 784}), "pixel values in [0, 1]"),
    ("pixels-overflow", event('{"pixels": [1e999' + ", 0" * 783 + "]}"), "pixel values in [0, 1]"),
    ("image-number", event({"image": 12}), "expected 'image' to be a base64 string"),
    ("image-bad-base64", event({"image": "not base64!"}), "'image' is not valid base64"),
    ("image-not-an-image", image_event(b"hello world"), "could not be decoded as PNG or JPEG"),
    ("image-gif", None, "expected a PNG or JPEG image, found GIF"),
    ("image-huge-dimensions", None, "at most 4096×4096 pixels"),
    ("base64-body-bad", {"body": "%%%", "isBase64Encoded": True}, "marked base64 but does not decode"),
    ("body-too-large", event("x" * 2_000_000), "request body too large"),
]


def build(name: str, given):
    import io

    from PIL import Image

    if name in ("image-gif", "image-huge-dimensions"):
        buffer = io.BytesIO()
        if name == "image-gif":
            Image.new("L", (8, 8)).save(buffer, format="GIF")
        else:
            Image.new("L", (6000, 2)).save(buffer, format="PNG")
        return image_event(buffer.getvalue())
    return given


@pytest.mark.parametrize(("name", "given", "fragment"), CASES, ids=[case[0] for case in CASES])
def test_hostile_event(package, name, given, fragment):
    response = package.lambda_handler(build(name, given), None)
    assert response["statusCode"] == 400, response
    assert response["headers"]["Content-Type"] == "application/json"
    error = json.loads(response["body"])["error"]
    assert fragment in error, error


def test_every_hostile_event_leaves_the_handler_answering(package):
    response = package.lambda_handler(event({"pixels": PIXELS}), None)
    assert response["statusCode"] == 200 and len(json.loads(response["body"])["predictions"]) == 3


def test_handler_reads_alpha_16_bit_palette_and_jpeg_as_the_same_glyph(package):
    answers = {}
    for name, data in stroke_images().items():
        response = package.lambda_handler(image_event(data), None)
        assert response["statusCode"] == 200, (name, response)
        answers[name] = json.loads(response["body"])["predictions"]
    blank = json.loads(package.lambda_handler(image_event(blank_png()), None)["body"])["predictions"]
    reference = answers["white"]
    assert reference[0] != blank[0], "the reference glyph must not read as a blank image"
    for name, predictions in answers.items():
        assert predictions[0]["label"] == reference[0]["label"], (name, predictions, reference)
        if not name.startswith("jpeg"):  # lossless encodings of the same pixels: the same input, the same answer
            assert predictions == reference, name


def test_a_raw_png_body_as_api_gateway_sends_a_binary_media_type(package):
    """isBase64Encoded with Content-Type image/png: the body is the PNG itself, answered as the JSON form is."""
    data = stroke_images()["white"]
    expected = package.lambda_handler(image_event(data), None)
    for header in ("Content-Type", "content-type"):  # REST API keeps the case, HTTP API lower-cases it
        raw = {"body": base64.b64encode(data).decode(), "isBase64Encoded": True, "headers": {header: "image/png"}}
        response = package.lambda_handler(raw, None)
        assert response["statusCode"] == 200 and response["body"] == expected["body"]
    broken = {"body": base64.b64encode(b"not a png").decode(), "isBase64Encoded": True,
              "headers": {"Content-Type": "image/png"}}
    response = package.lambda_handler(broken, None)
    assert response["statusCode"] == 400 and "error" in json.loads(response["body"])


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "2 cores"])
def test_a_bad_thread_count_in_the_environment_names_the_variable(package, monkeypatch, value):
    monkeypatch.setenv("TFLITE_THREADS", value)
    with pytest.raises(ValueError, match=f"TFLITE_THREADS must be a whole number .*found {value!r}"):
        package.TFLiteModel(package.HERE / "model.tflite", package.HERE / "labels.txt")


@pytest.mark.parametrize(("value", "threads"), [("", None), ("  ", None), ("1", 1), ("3", 3)])
def test_the_thread_count_is_every_core_unless_the_environment_sets_one(package, monkeypatch, value, threads):
    import os

    monkeypatch.setenv("TFLITE_THREADS", value)
    assert package.interpreter_threads() == (threads or len(os.sched_getaffinity(0)))
