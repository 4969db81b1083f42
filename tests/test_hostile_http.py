"""Hostile requests to ``pipelines.serve``: each gets a 4xx with a message that says what was
expected, never a 500 or a dropped connection, and the served version stays as published."""

import http.client
import io
import json
import socket

import pytest

from crossport.files import sha256_path
from tests.helpers import Server, burst

MODEL = "/v1/models/emnist_mlp"
PREDICT, CLASSIFY = f"{MODEL}:predict", f"{MODEL}:classify"


def named(request: dict) -> bytes:
    """A classify request naming its signature, as TF Serving requires (its default is a predict one)."""
    return json.dumps({"signature_name": "classify", **request}).encode()
ROW = [0.5] * 784


@pytest.fixture(scope="module")
def server(pipeline_run):
    base = pipeline_run.models_dir / "emnist_mlp"
    before = sha256_path(base)
    running = Server(base, "saved_model")
    yield running
    running.stop()
    assert sha256_path(base) == before, "serving must never change the published version"


def raw(server, request: bytes) -> tuple[int, dict]:
    """Send bytes exactly as given (for headers urllib would fix); the status line and JSON body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def deep(levels: int) -> bytes:
    return b'{"instances": ' + b"[" * levels + b"]" * levels + b"}"


def png_bytes(width: int, height: int, mode: str = "L", fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format=fmt)
    return buffer.getvalue()


# (id, path, body, expected status, fragment of the error message)
BODIES = [
    ("empty-body", PREDICT, b"", 400, "expected a JSON request body"),
    ("not-json", PREDICT, b"{not json", 400, "not valid JSON"),
    ("invalid-utf8", PREDICT, b'{"instances": "\xff\xfe"}', 400, "not valid JSON"),
    ("top-level-list", PREDICT, b"[1, 2]", 400, "expected a JSON object, found list"),
    ("top-level-string", PREDICT, b'"instances"', 400, "expected a JSON object, found str"),
    ("nested-100000", PREDICT, deep(100_000), 400, "nested 100001 levels deep"),
    ("nested-5", PREDICT, deep(4), 400, "nested 5 levels deep; a request here has at most 4"),
    ("string-pixels", PREDICT, json.dumps({"instances": [["0.5"] * 784]}).encode(), 400, "found string values"),
    ("boolean-pixels", PREDICT, json.dumps({"instances": [[True] * 784]}).encode(), 400, "JSON literal true"),
    ("boolean-among-numbers", PREDICT, json.dumps({"instances": [[0.5] * 783 + [False]]}).encode(), 400,
     "JSON literal false"),
    ("null-pixel", PREDICT, json.dumps({"instances": [[None] * 784]}).encode(), 400, "JSON literal null"),
    ("nan-literal", PREDICT, b'{"instances": [[NaN' + b", 0" * 783 + b"]]}", 400, "JSON literal NaN"),
    ("infinity-literal", PREDICT, b'{"instances": [[-Infinity' + b", 0" * 783 + b"]]}", 400, "JSON literal Infinity"),
    ("overflowing-float", PREDICT, b'{"instances": [[1e999' + b", 0" * 783 + b"]]}", 400,
     "'images': expected pixel values in [0, 1] (grayscale / 255), found inf at index [0, 0]"),
    ("far-below-range", PREDICT, json.dumps({"instances": [ROW, [-1e30] * 784]}).encode(), 400,
     "found -1e+30 at index [1, 0] and 783 more"),
    ("pixel-bytes-not-scaled", PREDICT, json.dumps({"instances": [[0.0] * 783 + [255]]}).encode(), 400,
     "found 255 at index [0, 783]"),
    ("classify-out-of-range", CLASSIFY, named({"examples": [{"images": [2.0] * 784}]}), 400,
     "expected pixel values in [0, 1]"),
    ("overflowing-int", PREDICT, b'{"instances": [[' + b"1" * 40 + b", 0" * 783 + b"]]}", 400,
     "found mixed or out-of-range values"),
    ("ragged-rows", PREDICT, json.dumps({"instances": [ROW, ROW[:-1]]}).encode(), 400, "equal length"),
    ("short-row", PREDICT, json.dumps({"instances": [[0.1] * 5]}).encode(), 400, "found [1, 5]"),
    ("image-as-28x28", PREDICT, json.dumps({"instances": [[[0.1] * 28] * 28]}).encode(), 400, "found [1, 28, 28]"),
    ("empty-instances", PREDICT, b'{"instances": []}', 400, "'instances' must be a non-empty list"),
    ("instances-object", PREDICT, b'{"instances": {"images": 1}}', 400, "'instances' must be a non-empty list"),
    ("instances-and-inputs", PREDICT, json.dumps({"instances": [ROW], "inputs": [ROW]}).encode(), 400,
     "exactly one of 'instances'"),
    ("neither", PREDICT, b'{"signature_name": "serving_default"}', 400, "exactly one of 'instances'"),
    ("inputs-wrong-name", PREDICT, json.dumps({"inputs": {"pixels": [ROW]}}).encode(), 400,
     "expected the input 'images', found ['pixels']"),
    ("instance-object-without-images", PREDICT, json.dumps({"instances": [{"pixels": ROW}]}).encode(), 400,
     "instance 0 is an object with ['pixels']; expected only 'images'"),
    ("predict-with-classify-signature", PREDICT,
     json.dumps({"signature_name": "classify", "instances": [ROW]}).encode(), 400, "'classify' is not a predict"),
    ("classify-context-string", CLASSIFY, named({"context": "x", "examples": [{"images": ROW}]}), 400,
     "expected 'context' to be an object of features, found str"),
    ("classify-context-list", CLASSIFY, named({"context": [1], "examples": [{"images": ROW}]}), 400,
     "found list"),
    ("classify-examples-object", CLASSIFY, named({"examples": {"images": 1}}), 400,
     "expected 'examples': a non-empty list"),
    ("classify-example-number", CLASSIFY, named({"examples": [7]}), 400, "example 0 is not an object"),
    ("classify-example-without-images", CLASSIFY, named({"examples": [{"pixels": [1]}]}), 400,
     "example 0 has no feature 'images'"),
    ("classify-without-signature", CLASSIFY, json.dumps({"examples": [{"images": ROW}]}).encode(), 400,
     "expected classification signature method_name to be tensorflow/serving/classify"),
    ("classify-with-predict-signature", CLASSIFY,
     json.dumps({"signature_name": "serving_default", "examples": [{"images": ROW}]}).encode(), 400,
     "is not a classify signature"),
    ("classify-string-pixels", CLASSIFY, named({"examples": [{"images": ["1"] * 784}]}), 400,
     "found string values"),
    ("uint8-fractions", PREDICT, json.dumps({"signature_name": "predict_uint8", "instances": [[0.5] * 784]}).encode(),
     400, "expected integer pixel values from 0 to 255 (signature predict_uint8), found 0.5 at index [0, 0]"),
    ("uint8-over-255", PREDICT, json.dumps({"signature_name": "predict_uint8", "instances": [[256] * 784]}).encode(),
     400, "found 256 at index [0, 0] and 783 more"),
    ("unknown-model", "/v1/models/other:predict", json.dumps({"instances": [ROW]}).encode(), 404,
     "Servable not found for request: Latest(other)"),
    ("unknown-version", f"{MODEL}/versions/9:predict", json.dumps({"instances": [ROW]}).encode(), 404,
     "emnist_mlp version 9"),
    ("unknown-verb", f"{MODEL}:regress", json.dumps({"instances": [ROW]}).encode(), 404, "unknown path"),
    ("status-by-post", MODEL, b"{}", 405, "expect GET"),
    ("upload-empty", "/v1/upload", b"", 400, "could not be decoded as PNG or JPEG"),
    ("upload-not-an-image", "/v1/upload", b"GIF89a not a png", 400, "could not be decoded"),
    ("upload-gif", "/v1/upload", png_bytes(8, 8, "L", "GIF"), 400, "expected a PNG or JPEG image, found GIF"),
    ("upload-huge-dimensions", "/v1/upload", png_bytes(5000, 1), 400, "at most 4096×4096 pixels, found 5000×1"),
    ("upload-truncated-png", "/v1/upload", png_bytes(64, 64)[:40], 400, "could not be decoded"),
]


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [case[1:] for case in BODIES],
                         ids=[case[0] for case in BODIES])
def test_hostile_body(server, path, body, status, fragment):
    found, payload = server.request("POST", path, body)
    assert (found, list(payload)) == (status, ["error"]), payload
    assert fragment in payload["error"], payload["error"]


HEADERS = [
    ("content-length-superscript", b"Content-Length: \xc2\xb2\r\n", 411, "a Content-Length header is required"),
    ("content-length-negative", b"Content-Length: -5\r\n", 411, "a Content-Length header is required"),
    ("content-length-missing", b"", 411, "a Content-Length header is required"),
    ("content-length-over-limit", b"Content-Length: 999999999999\r\n", 413, "over the limit of 8388608 bytes"),
]


@pytest.mark.parametrize(("header", "status", "fragment"), [case[1:] for case in HEADERS],
                         ids=[case[0] for case in HEADERS])
def test_hostile_headers(server, header, status, fragment):
    found, payload = raw(server, b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
    assert found == status and fragment in payload["error"], payload


def test_connections_are_kept_alive_and_closed_when_the_body_length_is_unknown(server):
    """HTTP/1.1 keep-alive, as TF Serving's REST server: requests reuse one connection. A request without a
    Content-Length is answered 411 and the connection closed: its body must never be read as the next request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"instances": [ROW]}).encode()
    sockets = []
    for _ in range(3):
        connection.request("POST", PREDICT, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 1
        sockets.append(connection.sock)
    connection.close()
    assert sockets[0] is not None and all(sock is sockets[0] for sock in sockets)  # one connection throughout
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST " + PREDICT.encode() + b' HTTP/1.1\r\nHost: x\r\n\r\n{"instances": []}')
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 411 and response.getheader("Connection") == "close"
        response.read()
        assert sock.recv(1) == b""  # closed by the server


def test_get_on_a_verb_and_unknown_paths(server):
    assert server.get(PREDICT)[0] == 405
    status, payload = server.get("/v1/models/emnist_mlp/versions/1/labels%00")
    assert status == 404 and "unknown path" in payload["error"]
    status, payload = server.get("/" + "a" * 5000)
    assert status == 404 and "unknown path" in payload["error"]


def test_the_server_still_answers_after_every_hostile_request(server):
    status, payload = server.post(PREDICT, {"instances": [ROW]})
    assert status == 200 and len(payload["predictions"][0]) == 10


# --- images as people make them ----------------------------------------------------------------

def test_upload_reads_alpha_16_bit_palette_and_jpeg_as_the_same_glyph(server):
    from tests.helpers import blank_png, stroke_images

    images = stroke_images()
    answers = {}
    for name, data in images.items():
        status, payload = server.post("/v1/upload", data, "image/png")
        assert status == 200, (name, payload)
        answers[name] = [p["label"] for p in payload["predictions"]], payload["predictions"][0]["probability"]
    blank = server.post("/v1/upload", blank_png(), "image/png")[1]["predictions"]
    reference_labels, reference_top = answers["white"]
    assert (reference_labels[0], reference_top) != (blank[0]["label"], blank[0]["probability"])
    for name, (labels, top) in answers.items():
        assert labels[0] == reference_labels[0], (name, labels, reference_labels)
        if not name.startswith("jpeg"):  # lossless encodings of the same pixels: the same input, the same answer
            assert top == reference_top, (name, top, reference_top)



def test_a_burst_of_new_connections_is_answered_never_reset(server):
    """1,000 clients connect at once: every one is answered, none reset. The listen backlog (socketserver's default
    of 5) was what dropped them."""
    outcomes = burst(server.port, PREDICT, json.dumps({"instances": [ROW]}).encode(), 1000)
    assert outcomes == [200] * 1000, sorted(set(map(repr, outcomes)))[:5]
    assert server.post(PREDICT, {"instances": [ROW]})[0] == 200  # and the server still answers
