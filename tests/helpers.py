"""Builders for tiny test inputs in the real formats crossport reads."""

from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np


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


class PicklePayload:
    """Unpickling this calls open(marker, "w"): proof a pickle ran if the file appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Server:
    """``python -m pipelines.serve`` in its own process, with a small JSON client."""

    def __init__(self, model_dir: Path, backend: str, *extra: str, port: int | None = None) -> None:
        from tests.conftest import ROOT, free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", str(model_dir), "--backend", backend, "--port", str(self.port),
             *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                self.get("/v1/models/emnist_mlp")
                return
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None:
                    raise RuntimeError(self.process.stdout.read()) from None
                time.sleep(0.3)
        raise RuntimeError("server did not start")

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
