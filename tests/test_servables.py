"""Servables deployers use without our code: TF Serving contract, warmup, REST, card,
serverless package and the web service (real HTTP, real Chromium)."""

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossport.formats import BY_NAME, FORMATS
from tests.helpers import ROOT, Server, headless_chromium

DOCS = ROOT / "docs" / "rest"


@pytest.fixture(scope="module")
def version(pipeline_run) -> Path:
    return pipeline_run.models_dir / "emnist_mlp" / "1"


@pytest.fixture(scope="module")
def test_images(pipeline_run):
    with np.load(pipeline_run.run_dir / "data.npz") as data:
        return data["x_test"][:20].astype(np.float32) / 255.0, data["y_test"][:20]


def digit_png(image_row: np.ndarray, invert: bool = True, scale: int = 4) -> bytes:
    """A dataset image as a person would upload it: upright, dark ink on white, larger."""
    from PIL import Image

    upright = image_row.reshape(28, 28).T
    pixels = ((1.0 - upright) if invert else upright) * 255
    image = Image.fromarray(pixels.astype(np.uint8)).resize((28 * scale, 28 * scale), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- TF Serving contract ----------------------------------------------------------------------

def test_warmup_records_replay_through_the_saved_model(version):
    from export.contract import replay_warmup

    replayed = replay_warmup(version)
    assert {record["kind"] for record in replayed} == {"predict_log", "classify_log"}
    assert {record["signature"] for record in replayed} == {"serving_default", "predict_uint8", "classify"}
    assert 0 < len(replayed) <= 1000
    assert all(shape[0] == record["batch"] for record in replayed for shape in record["shapes"].values())


def test_contract_check_passes_on_published_versions(pipeline_run):
    from export.contract import models_config_problems

    assert models_config_problems(pipeline_run.models_dir) == []
    result = subprocess.run([sys.executable, "-m", "pipelines.contract", str(pipeline_run.models_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "emnist_mlp/1: ok (TF Serving's rules and crossport's contract)" in result.stdout


def test_contract_check_names_each_broken_rule(version, tmp_path):
    from export.contract import models_config_problems, signature_problems
    from export.servable import set_method_name

    copy = tmp_path / "m" / "1"
    shutil.copytree(version, copy)
    set_method_name(copy, "classify", "tensorflow/serving/regress")
    assert signature_problems(copy) == ["classify: method 'tensorflow/serving/regress' is neither predict nor classify"]
    (tmp_path / "models.config").write_text("model_config_list { config { name: 'm' bogus: 1 } }")
    assert "is not a ModelServerConfig" in models_config_problems(tmp_path)[0]


# --- REST examples in docs/serving.md (docs/rest) --------------------------------------------------

def structure(value):
    """The shape of a JSON value: keys, list lengths and strings, numbers as a type."""
    if isinstance(value, dict):
        return {key: structure(item) for key, item in value.items() if key != "name" or not isinstance(item, str)}
    if isinstance(value, list):
        return [structure(item) for item in value]
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else value


@pytest.mark.parametrize("example", ["predict_instances", "predict_inputs", "predict_uint8", "classify", "metadata",
                                     "status"])
def test_documented_rest_examples_run_against_the_saved_model(version, example):
    from crossport.runtimes import load_saved_model
    from serving.rest import handle
    from serving.serve import encode_json, open_repository

    documented = json.loads((DOCS / f"{example}.json").read_text())
    body = (ROOT / documented["request"]).read_bytes() if "request" in documented else None
    status, response = handle(open_repository(version, None, "saved_model"), documented["method"], documented["path"],
                              body)
    response = json.loads(encode_json(response))  # as it goes over the wire
    assert status == documented["status"]
    assert structure(response) == structure(documented["response"])  # same keys, nesting, labels, lengths
    if body is not None:  # and the numbers are this model's, exactly as the signature computes them
        request = json.loads(body)
        rows = np.asarray(request.get("instances") or request.get("inputs", {}).get("images")
                          or [e["images"] for e in request["examples"]], np.float32)
        if request.get("signature_name") == "predict_uint8":  # pixels 0-255: serving_default's scores on pixels / 255
            rows = rows / np.float32(255)
        expected = load_saved_model(version)(rows)["scores"]
        values = response.get("predictions") or response.get("outputs") or [
            [score for _, score in row] for row in response["results"]]
        np.testing.assert_allclose(np.asarray(values), expected, atol=1e-6)


def test_the_serving_document_shows_every_documented_example():
    readme = (ROOT / "docs" / "serving.md").read_text()
    for path in DOCS.glob("*.json"):
        if not path.name.endswith(".request.json"):
            assert f"docs/rest/{path.name}" in readme, path.name


# --- servable card ----------------------------------------------------------------------------

def test_servable_card_describes_contract_formats_and_lineage(version):
    card = json.loads((version / "assets.extra" / "servable.json").read_text())
    assert card["input"]["shape"] == [None, 784] and "transposed" in card["input"]["orientation"]
    assert len(card["input"]["png_to_input"]) >= 4
    assert card["input"]["refused"].startswith("any value outside [0, 1], NaN or infinity")  # every path keeps it
    assert card["labels"] == (version / "assets.extra" / "labels.txt").read_text().splitlines()
    formats = card["formats"]
    assert set(formats) == {fmt.name for fmt in FORMATS if not fmt.optional}  # int8_mixed: only when int8_full fails
    # no cut-off of the test's own: each format's figures and state are the gate's, from its hop against PyTorch
    parity = json.loads((version / "assets.extra" / "parity.json").read_text())
    hops = {hop["hop"]: hop for hop in parity["hops"]}
    for fmt, info in formats.items():
        hop = hops[f"pytorch -> {BY_NAME[fmt].runtime}"]
        assert info["bytes"] == (version / info["path"]).stat().st_size or info["path"] == ".", fmt
        assert info["top1_agreement_with_reference"] == hop["top1_agreement"], fmt
        assert info["test_accuracy"] == hop["candidate_accuracy"], fmt
        assert info["parity"] == {"pass": "verified", "undecided": "unverified"}[hop["verdict"]], (fmt, hop["verdict"])
        assert (fmt in parity["undecided"]) == (info["parity"] == "unverified"), fmt
    assert card["parity"]["verdict"] == "pass" and card["parity"]["tolerances"]
    assert card["lineage"]["dataset"]["digest"] and card["lineage"]["mlflow"]["runs"]["pipeline"]
    assert "rest_classify" in card["example_requests"]
    markdown = (version / "assets.extra" / "SERVABLE.md").read_text()
    for text in ("## Input", "## Formats", "## Tolerances", "## Labels", "tflite_int8_full", "## Lineage"):
        assert text in markdown


# --- serverless package -----------------------------------------------------------------------

HANDLER_SCRIPT = r"""
import base64, json, sys
try:
    import crossport  # noqa: F401
    print(json.dumps({"crossport_importable": True})); sys.exit(0)
except ImportError:
    pass
import handler
events = json.loads(sys.stdin.read())
results = [handler.lambda_handler(event, None) for event in events]
loaded = handler.model()
handler.lambda_handler(events[0], None)
print(json.dumps({"results": results, "loaded_once": handler.model() is loaded}))
"""


def run_handler(package: Path, events: list[dict]) -> dict:
    # -I: isolated mode, so neither the repository nor PYTHONPATH is importable; the
    # package directory is the working directory, as in a Lambda task root.
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.')\n{HANDLER_SCRIPT}"],
                            cwd=package, input=json.dumps(events), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8_full"])
def test_serverless_package_answers_events_without_crossport(version, test_images, tmp_path, variant):
    import zipfile

    from serving.serverless import build_package

    images, _ = test_images
    directory, archive = build_package(version, tmp_path / "lambda", variant)
    assert sorted(p.name for p in directory.iterdir()) == ["handler.py", "labels.txt", "model.tflite",
                                                         "requirements.txt", "servable.json", "template.yaml"]
    assert sorted(zipfile.ZipFile(archive).namelist()) == sorted(p.name for p in directory.iterdir())
    requirements = (directory / "requirements.txt").read_text().splitlines()
    assert [line.split("==")[0] for line in requirements] == ["ai-edge-litert", "numpy", "pillow"]

    png = base64.b64encode(digit_png(images[0])).decode()
    events = [
        {"body": json.dumps({"image": png})},
        {"body": base64.b64encode(json.dumps({"pixels": images[1].tolist()}).encode()).decode(),
         "isBase64Encoded": True},
        {"body": json.dumps({"pixels": images[2].reshape(28, 28).tolist()})},
        {"body": json.dumps({"image": base64.b64encode(b"not a png at all").decode()})},
        {"body": json.dumps({"image": "%%% not base64"})},
        {"body": json.dumps({"pixels": [0.5] * 100})},
        {"body": "{" + " " * 2_000_000 + "}"},
        {"body": "{'malformed': json"},
        {},
    ]
    output = run_handler(directory, events)
    assert "crossport_importable" not in output
    assert output["loaded_once"] is True
    results = output["results"]
    for index in range(3):
        assert results[index]["statusCode"] == 200
        body = json.loads(results[index]["body"])
        assert len(body["predictions"]) == 3
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
    assert json.loads(results[1]["body"])["predictions"][0]["class_id"] == int(
        np.argmax(_scores(version, images[1:2])[0]))
    expected = ["could not be decoded", "not valid base64", "expected 784 pixels or 28×28", "too large",
                "not valid JSON", "expected a request body"]
    for result, message in zip(results[3:], expected, strict=True):
        assert result["statusCode"] == 400
        assert message in json.loads(result["body"])["error"]


def test_serverless_template_deploys_the_handler_behind_api_gateway(version, tmp_path):
    """template.yaml is an AWS SAM template for this package: its handler, the Python it was built with, PNG and
    JPEG as binary media types (so API Gateway passes an image body base64-encoded, as the handler expects)."""
    import yaml

    from serving.serverless import build_package

    directory, _ = build_package(version, tmp_path / "lambda", "int8_full")
    template = yaml.safe_load((directory / "template.yaml").read_text())
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    function = template["Resources"]["PredictFunction"]
    assert function["Type"] == "AWS::Serverless::Function"
    properties = function["Properties"]
    module, name = properties["Handler"].split(".")
    assert (directory / f"{module}.py").is_file() and f"def {name}(" in (directory / f"{module}.py").read_text()
    assert properties["Runtime"] == f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert properties["CodeUri"] == "."
    assert properties["Events"]["Predict"]["Properties"] == {"Path": "/predict", "Method": "post"}
    assert set(template["Globals"]["Api"]["BinaryMediaTypes"]) == {"image~1png", "image~1jpeg"}


def test_serverless_with_deps_runs_with_no_site_packages_at_all(version, test_images, tmp_path):
    """--with-deps vendors the runtime: the handler answers from the package folder alone (-I -S: no
    site-packages, no repository), and the zip holds the same tree."""
    import zipfile

    from serving.serverless import build_package, instructions

    images, _ = test_images
    directory, archive = build_package(version, tmp_path / "lambda", "fp32", with_deps=True)
    card = json.loads((directory / "servable.json").read_text())
    assert {"numpy", "PIL", "ai_edge_litert"} <= set(card["vendored"])
    names = {name.split("/")[0] for name in zipfile.ZipFile(archive).namelist()}
    assert names == {p.name for p in directory.iterdir()}
    png = base64.b64encode(digit_png(images[0])).decode()
    script = ("import sys, json; sys.path.insert(0, '.'); import handler; "
              "print(json.dumps(handler.lambda_handler(json.loads(sys.stdin.read()), None)))")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=directory, capture_output=True,
                            text=True, timeout=300, input=json.dumps({"body": json.dumps({"image": png})}))
    assert result.returncode == 0, result.stderr[-2000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert reply["statusCode"] == 200 and len(json.loads(reply["body"])["predictions"]) == 3
    text = instructions(directory, archive)
    assert "deploys as it is" in text and f"fileb://{archive}" in text and "pip install" not in text
    bare, bare_zip = build_package(version, tmp_path / "bare", "fp32")
    assert "sam build" in instructions(bare, bare_zip) and "pip install" not in instructions(bare, bare_zip)


def _scores(version, rows):
    from crossport.runtimes import load_tflite

    return load_tflite(version / "assets.extra" / "model_fp32.tflite")(rows)["scores"]


def test_serverless_cli_refuses_a_tampered_version(version, tmp_path):
    copy = tmp_path / "v"
    shutil.copytree(version, copy)
    (copy / "assets.extra" / "model_fp32.tflite").write_bytes(b"tampered")
    # the command's earlier name (export.serverless), which deploy scripts may still use, forwards to the same code
    result = subprocess.run([sys.executable, "-m", "export.serverless", str(copy), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "no longer matches its manifest" in result.stderr and "model_fp32.tflite) changed" in result.stderr


# --- the web service --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["saved_model", "onnx", "tflite_int8_full"])
def test_web_service_speaks_tf_serving_rest(version, test_images, backend):
    images, _ = test_images
    server = Server(version.parent, backend)
    try:
        assert server.get("/v1/models/emnist_mlp")[1]["model_version_status"][0]["state"] == "AVAILABLE"
        status, body = server.post("/v1/models/emnist_mlp:predict", {"instances": images[:3].tolist()})
        assert status == 200 and np.asarray(body["predictions"]).shape == (3, 10)
        from serving.rest import load_backend

        reference = load_backend(version, backend).predict(images[:3])  # the chosen runtime, in this process
        np.testing.assert_allclose(body["predictions"], reference, atol=1e-6)
        columnar = {"inputs": {"images": images[:2].tolist()}}
        status, body = server.post("/v1/models/emnist_mlp/versions/1:predict", columnar)
        assert status == 200 and len(body["outputs"]) == 2
        status, body = server.post("/v1/models/emnist_mlp:classify",
                                   {"signature_name": "classify", "examples": [{"images": images[0].tolist()}]})
        assert status == 200 and [label for label, _ in body["results"][0]] == [str(d) for d in range(10)]
        status, body = server.get("/v1/models/emnist_mlp/metadata")
        signature_defs = body["metadata"]["signature_def"]["signature_def"]
        assert status == 200 and signature_defs["classify"]["method_name"] == "tensorflow/serving/classify"
        # clear 4xx answers, never a 500
        assert server.post("/v1/models/emnist_mlp:predict", b"{not json")[0] == 400
        assert server.post("/v1/models/emnist_mlp:predict", {"instances": [[0.1] * 5]})[0] == 400
        assert server.post("/v1/models/other:predict", {"instances": images[:1].tolist()})[0] == 404
        assert server.post("/v1/models/emnist_mlp/versions/9:predict", {"instances": images[:1].tolist()})[0] == 404
        assert server.get("/v1/nothing")[0] == 404
        status, body = server.post("/v1/models/emnist_mlp:predict", b" " * (9 * 1024 * 1024))
        assert status == 413 and "over the limit" in body["error"]
        assert server.post("/v1/upload", b"GIF89a not a png", "image/png")[0] == 400
        upload = digit_png(images[0])
        status, body = server.post("/v1/upload", upload, "image/png")
        assert status == 200 and body["model_input_png"].startswith("data:image/png;base64,")
        # the service prepares an upload with the Lambda handler's own functions: the same model input, the same
        # top-k answer from the chosen runtime
        from PIL import Image

        from serving.serverless_handler import image_to_pixels, to_model_input, top_k

        row = to_model_input(image_to_pixels(upload))
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["model_input_png"].split(",", 1)[1]))))
        np.testing.assert_array_equal(shown[::8, ::8], (np.clip(row.reshape(28, 28), 0, 1) * 255).astype(np.uint8))
        expected = top_k(load_backend(version, backend).predict(row[np.newaxis, :])[0], [str(d) for d in range(10)])
        assert [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
        np.testing.assert_allclose([p["probability"] for p in body["predictions"]],
                                   [p["probability"] for p in expected], atol=1e-6)
    finally:
        server.stop()


def test_server_binds_loopback_by_default():
    from serving.serve import build_parser

    assert build_parser().parse_args(["models/x"]).host == "127.0.0.1"


def test_upload_page_in_headless_chromium(version, test_images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    images, _ = test_images
    png = tmp_path / "digit.png"
    png.write_bytes(digit_png(images[0]))
    expected = str(int(np.argmax(_scores(version, to_rows(png))[0])))
    server = Server(version.parent, "tflite_fp32")
    driver = headless_chromium(tmp_path / "profile", "900,700")
    try:
        driver.get(server.url + "/")
        assert "Handwritten character" in driver.find_element(By.TAG_NAME, "h1").text
        # before the first upload there is no picture to show: no broken-image placeholders
        assert not any(img.is_displayed() for img in driver.find_elements(By.TAG_NAME, "img"))
        driver.find_element(By.ID, "file").send_keys(str(png))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Top label:"))
        status = driver.find_element(By.ID, "status").text
        WebDriverWait(driver, 30).until(
            lambda d: all(img.is_displayed() for img in d.find_elements(By.TAG_NAME, "img")))
        rows = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#top tbody tr")]
        screenshot = tmp_path / "upload.png"
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
        server.stop()
    assert status.startswith(f"Top label: {expected} (")
    assert len(rows) == 3 and rows[0].startswith(expected)
    from PIL import Image

    shot = Image.open(screenshot)
    assert shot.size[0] >= 800
    # the result is painted: the screenshot is not a blank page
    assert len(set(shot.convert("L").getdata())) > 10


def to_rows(png: Path) -> np.ndarray:
    from serving.serverless_handler import image_to_pixels, to_model_input

    return to_model_input(image_to_pixels(png.read_bytes()))[np.newaxis, :]
