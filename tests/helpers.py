"""What the tests share: running crossport's commands, waiting for what they do, reading their one-line errors,
and builders for tiny inputs in the real formats crossport reads. No test module imports another."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossport.interface import INPUT

ROOT = Path(__file__).resolve().parents[1]

# The published layout is a contract (docs and README): spelled out here on purpose, so that a change to the formats
# table that would change what deployers receive fails the tests that compare against it.
EXPECTED_FILES = {
    "saved_model.pb", "fingerprint.pb", "variables/variables.data-00000-of-00001", "variables/variables.index",
    "assets.extra/tf_serving_warmup_requests", "assets.extra/model.onnx", "assets.extra/model_fp32.tflite",
    "assets.extra/model_fp16.tflite", "assets.extra/model_int8_dynamic.tflite", "assets.extra/model_int8_full.tflite",
    "assets.extra/labels.txt", "assets.extra/parity.json", "assets.extra/parity.html", "assets.extra/manifest.json",
    "assets.extra/servable.json", "assets.extra/SERVABLE.md", "assets.extra/parity_errors.png",
    "assets.extra/confusion_matrix.png",
}


def tiny_model_config():
    """The smallest MLP the training tests train: 784 → 16 → 3."""
    from training.model import ModelConfig

    return ModelConfig(hidden_sizes=(16,), num_classes=3, dropout=0.1)


def tiny_data(seed: int = 0):
    """60 random images whose class is a function of their pixels (learnable), split 45 / 15."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (60, 784), dtype=np.uint8)
    y = (x[:, :10].sum(axis=1) % 3).astype(np.int64)
    return x[:45], y[:45], x[45:], y[45:]


# --- commands and their errors -------------------------------------------------------------------

def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pipelines.run`` in a fresh process, as a user would."""
    return run_module("pipelines.run", *args, cwd=cwd, env=env, timeout=timeout)


def run_module(name: str, *args: str, cwd: Path = ROOT, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m <name>`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", name, *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result, code: int, *fragments: str) -> str:
    """A crossport command's failure as the README promises it: exactly one ``crossport: error:`` line holding every
    fragment, exit code ``code``, no traceback. ``result`` is a CompletedProcess or a :func:`call` result."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("crossport: error:")]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def usage_error(result, *fragments: str) -> str:
    """argparse's refusal: exit 2, no traceback, an ``error:`` line holding every fragment."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = next((line for line in result.stderr.splitlines() if "error:" in line), "")
    for fragment in fragments:
        assert fragment in line, result.stderr[-2000:]
    return line


def call(main: Callable[[list[str]], int], *argv: str, capsys) -> subprocess.CompletedProcess:
    """A command's ``main(argv)`` in this process, ending as the process would (argparse's exit included), with what
    it wrote to stdout and stderr: for checks that end before any framework is loaded."""
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), code, out, err)


def pipeline_here(*argv: str, capsys, env: dict | None = None, monkeypatch=None) -> subprocess.CompletedProcess:
    """``python -m pipelines.run ARGV`` run in this process (its frameworks loaded once for every case of a test
    session), ending as the process would: the one-line errors and exit codes are :func:`pipelines.run.main`'s.
    Pass pytest's ``capfd`` as ``capsys`` where stages run: they write the summary to the terminal's descriptor, as
    the process does. ``env`` is set for the call through ``monkeypatch``."""
    from pipelines.run import main

    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return call(main, *argv, capsys=capsys)


# --- waiting for what a process does ---------------------------------------------------------------

def wait_until(condition: Callable[[], object], what: str, *, timeout: float = 120.0,
               process: subprocess.Popen | None = None, interval: float = 0.02):
    """Poll ``condition`` until it returns something true, and return that. Fails naming ``what`` was awaited
    when ``timeout`` passes or ``process`` ends first: every wait in the tests is for an observable event."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def around_kinks(kinks: tuple[float, ...], width: int, seed: int = 0) -> np.ndarray:
    """float32 [rows, width], exact inputs for an elementwise op's rule: the 121 float32 numbers around each kink
    (60 ulps either side; subnormal steps around 0), then 6,000 uniform in [−8, 8], 2,000 in [−30, 30] and 1,000
    near 0 (σ 1e-3), cut to whole rows."""
    steps = np.arange(-60, 61)
    near = [np.float32(k) * (1 + steps * 2.0**-23) if k else steps * 2.0**-140 for k in kinks]
    rng = np.random.default_rng(seed)
    x = np.concatenate([*near, rng.uniform(-8, 8, 6000), rng.uniform(-30, 30, 2000), rng.normal(0, 1e-3, 1000)])
    return x[: len(x) // width * width].astype(np.float32).reshape(-1, width)


def idx_images(images: np.ndarray) -> bytes:
    """IDX3 (NIST/MNIST format): magic 0x0803, count, rows, cols, then uint8 pixels."""
    count, rows, cols = images.shape
    return struct.pack(">IIII", 0x0803, count, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()


def make_emnist_archive(path: Path, split: str = "byclass", n_train: int = 40, n_test: int = 20,
                        num_classes: int = 62, seed: int = 0, first_label: int = 0) -> dict[str, np.ndarray]:
    """Write a zip laid out like NIST's gzip.zip (``gzip/emnist-<split>-*.gz``) with random images."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(first_label, first_label + num_classes, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(first_label, first_label + num_classes, n_test).astype(np.uint8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as bundle:
        for part in ("train", "test"):
            for kind, payload in (("images-idx3-ubyte", idx_images(arrays[f"{part}_images"])),
                                  ("labels-idx1-ubyte", idx_labels(arrays[f"{part}_labels"]))):
                buffer = io.BytesIO()
                with gzip.GzipFile(fileobj=buffer, mode="wb") as packed:
                    packed.write(payload)
                bundle.writestr(f"gzip/emnist-{split}-{part}-{kind}.gz", buffer.getvalue())
    return arrays


def users_folder(path: Path) -> Path:
    """A folder holding a file of the user's own (``thesis.tex``): what crossport must never write over."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("mine")
    return path


class PicklePayload:
    """Unpickling this calls open(marker, "w"): proof a pickle ran if the file appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Server:
    """``python -m pipelines.serve`` in its own process, with a small JSON client. Its output goes to a file (a pipe
    nobody reads fills after some 800 request log lines and stalls the server): :meth:`output` reads it."""

    def __init__(self, model_dir: Path | None, backend: str, *extra: str, port: int | None = None) -> None:
        """``model_dir`` None: the models come from a ``--model-config-file`` among ``extra``."""
        import tempfile

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read by output(), closed with the object
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", *([str(model_dir)] if model_dir else []), "--backend", backend,
             "--port", str(self.port), *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, text=True)

        def answers() -> bool:
            try:
                self.get("/v1/models/emnist_mlp")
                return True
            except (urllib.error.URLError, ConnectionError):
                return False

        try:
            wait_until(answers, f"the server to answer on port {self.port}", process=self.process, interval=0.1)
        except AssertionError as error:
            if self.process.poll() is None:
                self.process.kill()
            raise RuntimeError(f"{error}: {self.output()}") from None

    def request(self, method: str, path: str, body: bytes | None = None, content_type="application/json"):
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, payload, content_type="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, content_type)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read()


def burst(port: int, path: str, body: bytes, count: int) -> list:
    """``count`` clients at once, each on a new connection with one POST: each one's HTTP status, or the exception
    its connection ended with (a reset, a refusal, a timeout). Bounded: every client waits at most 120 s."""
    import http.client
    import socket
    import threading

    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    start, outcomes = threading.Barrier(count), [None] * count

    def client(index: int) -> None:
        start.wait()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                sock.sendall(request)
                response = http.client.HTTPResponse(sock)
                response.begin()
                response.read()
                outcomes[index] = response.status
        except OSError as error:
            outcomes[index] = error

    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def stroke_images() -> dict[str, bytes]:
    """One handwritten-looking '1' encoded the ways people save images; all mean the same glyph.

    ``white`` is the reference: black ink on an opaque white background, 8-bit grayscale PNG.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    def draw(mode, background, ink):
        image = Image.new(mode, (112, 112), background)
        pen = ImageDraw.Draw(image)
        pen.line((56, 15, 56, 95), fill=ink, width=9)
        pen.line((38, 32, 56, 15), fill=ink, width=7)
        return image

    def encode(image, fmt="PNG", **options):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    white = draw("L", 255, 0)
    return {
        "white": encode(white),
        "transparent-rgba": encode(draw("RGBA", (0, 0, 0, 0), (0, 0, 0, 255))),
        "transparent-gray-alpha": encode(draw("LA", (0, 0), (0, 255))),
        "white-ink-on-transparent": encode(draw("RGBA", (255, 255, 255, 0), (255, 255, 255, 255))),
        "16-bit": encode(Image.fromarray(np.asarray(white, dtype=np.uint16) * 257)),
        "palette": encode(white.convert("P")),
        "palette-transparent": encode(draw("RGBA", (0, 0, 0, 0), (0, 0, 0, 255)).convert("P")),
        "jpeg": encode(white, "JPEG", quality=92),
        "jpeg-rgb": encode(draw("RGB", (255, 255, 255), (0, 0, 0)), "JPEG", quality=92),
    }


def blank_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (112, 112), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def headless_chromium(profile: Path, window: str):
    """Debian's chromium through its chromedriver, headless, offline, with a throwaway profile."""
    import pytest
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not Path("/usr/bin/chromium").exists() or not Path("/usr/bin/chromedriver").exists():
        pytest.fail("Debian's chromium and chromium-driver are not installed: run `make browser` (CI does)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={window}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


# --- gRPC requests ---------------------------------------------------------------------------------

def images(count: int = 3) -> np.ndarray:
    return np.random.default_rng(count).random((count, 784), dtype=np.float32)


def predict_request(batch: np.ndarray, *, encoding: str = "content", signature: str = "", version: int | None = None,
                    name: str = "emnist_mlp"):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if encoding == "content":  # tf.make_tensor_proto writes tensor_content bytes
        request.inputs[INPUT].CopyFrom(tf.make_tensor_proto(batch))
    else:  # float_val, as clients that build the proto by hand do
        tensor = request.inputs[INPUT]
        tensor.dtype = tf.float32.as_datatype_enum
        tensor.tensor_shape.dim.add(size=batch.shape[0])
        tensor.tensor_shape.dim.add(size=batch.shape[1])
        tensor.float_val.extend(batch.ravel().tolist())
    return request


# --- a person in a browser -------------------------------------------------------------------------

class Walk:
    """Waits for what a person waits for: text on the page, an element to press."""

    def __init__(self, driver, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def until(self, condition, timeout: float = 60):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda _: condition())

    def shows(self, *texts: str) -> str:
        self.until(lambda: all(text in self.text() for text in texts))
        return self.text()

    def press(self, xpath: str) -> None:
        from selenium.webdriver.common.by import By

        def attempt() -> bool:
            found = self.driver.find_elements(By.XPATH, xpath)
            if not found:
                return False
            try:
                found[0].click()  # a real click: Radix tabs listen for pointer events
            except Exception:  # covered by one of the UI's announcement dialogs: the DOM click
                self.driver.execute_script("arguments[0].click()", found[0])
            return True

        self.until(attempt)

    def shot(self, name: str) -> Path:
        """A screenshot once the page has settled: loaded, and the same page in two successive animation frames."""
        self.until(lambda: self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const html = () => document.body.innerHTML;"
            "const first = html();"
            "requestAnimationFrame(() => requestAnimationFrame(() => "
            "done(document.readyState === 'complete' && html() === first)));"))
        path = self.shots / name
        self.driver.save_screenshot(str(path))
        return path


def keep_screenshots(shots: list[Path]) -> None:
    """Copied to $CROSSPORT_UI_SCREENSHOTS when set (docs/ui/ was made that way)."""
    keep = os.environ.get("CROSSPORT_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy2(shot, Path(keep) / shot.name)
