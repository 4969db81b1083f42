"""AWS-Lambda-style handler for a crossport TFLite servable. Self-contained on purpose.

This file is copied as ``handler.py`` into the package ``python -m export.serverless``
builds, next to ``model.tflite`` and ``labels.txt``; it needs only ai-edge-litert, numpy
and pillow, never crossport. crossport's web service imports the same functions, so a
PNG becomes the same model input everywhere.

Request (API Gateway proxy event, ``body`` JSON, optionally base64-encoded):
    {"image": "<base64 PNG>"}                         any size; resized to 28×28
    {"pixels": [784 floats in [0, 1]]}                 or 28 rows of 28, EMNIST orientation
Response body: {"predictions": [{"label": "7", "probability": 0.98}, ...]} (top 3).
Bad input gets status 400 and {"error": "..."}.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAX_BODY_BYTES = 1_000_000  # API Gateway caps payloads at 10 MB; a 28×28 PNG is < 2 kB
MAX_IMAGE_SIDE = 4096
SIDE = 28
TOP_K = 3


class BadInput(ValueError):
    """The request is not something the model can answer; the message says why."""


# --- input preparation (shared with crossport's web service) ------------------------------

def png_to_pixels(data: bytes) -> np.ndarray:
    """A PNG (any size, any mode) → float32 [28, 28] in [0, 1], upright, white ink on black.

    Grayscale; inverted when the background is light (EMNIST is white ink on black);
    the ink's bounding box is scaled to fit 20×20 and centred in 28×28, as NIST did.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise BadInput(f"expected a PNG image, found {image.format or 'an unknown format'}")
        if not (0 < image.width <= MAX_IMAGE_SIDE and 0 < image.height <= MAX_IMAGE_SIDE):
            raise BadInput(f"expected an image of at most {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} pixels, "
                           f"found {image.width}×{image.height}")
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise BadInput(f"the image could not be decoded as PNG ({error})") from error
    if gray.mean() > 0.5:
        gray = 1.0 - gray
    ink = np.argwhere(gray > 0.1)
    if len(ink) == 0:
        return np.zeros((SIDE, SIDE), dtype=np.float32)
    (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0) + 1
    glyph = gray[top:bottom, left:right]
    scale = 20.0 / max(glyph.shape)
    height, width = max(1, round(glyph.shape[0] * scale)), max(1, round(glyph.shape[1] * scale))
    resized = Image.fromarray((glyph * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    canvas = np.zeros((SIDE, SIDE), dtype=np.float32)
    y, x = (SIDE - height) // 2, (SIDE - width) // 2
    canvas[y : y + height, x : x + width] = np.asarray(resized, dtype=np.float32) / 255.0
    return canvas


def to_model_input(upright: np.ndarray) -> np.ndarray:
    """Upright [28, 28] → the model's input row: transposed (EMNIST orientation), flattened."""
    return np.ascontiguousarray(upright.T.reshape(SIDE * SIDE), dtype=np.float32)


def pixels_to_input(pixels) -> np.ndarray:
    """784 values, or 28 rows of 28, already in EMNIST orientation and in [0, 1]."""
    try:
        array = np.asarray(pixels, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise BadInput("expected 'pixels' to be numbers: 784 values or 28 rows of 28") from error
    if array.shape not in ((SIDE * SIDE,), (SIDE, SIDE)):
        raise BadInput(f"expected 784 pixels or 28×28, found shape {list(array.shape)}")
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
        raise BadInput("expected pixel values in [0, 1] (grayscale / 255)")
    return array.reshape(SIDE * SIDE)


def top_k(scores: np.ndarray, labels: list[str], k: int = TOP_K) -> list[dict]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"label": labels[i], "class_id": int(i), "probability": float(scores[i])} for i in order]


# --- the model, loaded once per process ----------------------------------------------------

class TFLiteModel:
    def __init__(self, model_path: Path, labels_path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(model_path))
        self.runner = self.interpreter.get_signature_runner("serving_default")
        self.input_name = next(iter(self.runner.get_input_details()))
        self.labels = labels_path.read_text().splitlines()

    def scores(self, rows: np.ndarray) -> np.ndarray:
        outputs = self.runner(**{self.input_name: np.ascontiguousarray(rows, dtype=np.float32)})
        return np.asarray(outputs["scores"])


_MODEL: TFLiteModel | None = None


def model() -> TFLiteModel:
    global _MODEL
    if _MODEL is None:
        _MODEL = TFLiteModel(Path(os.environ.get("MODEL_PATH", HERE / "model.tflite")),
                             Path(os.environ.get("LABELS_PATH", HERE / "labels.txt")))
    return _MODEL


# --- the handler ---------------------------------------------------------------------------

def parse_request(body) -> np.ndarray:
    """A decoded JSON body → one model input row; BadInput for anything else."""
    if not isinstance(body, dict):
        raise BadInput("expected a JSON object with 'image' (base64 PNG) or 'pixels'")
    if "image" in body:
        if not isinstance(body["image"], str):
            raise BadInput("expected 'image' to be a base64 string of a PNG")
        try:
            data = base64.b64decode(body["image"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise BadInput("'image' is not valid base64") from error
        return to_model_input(png_to_pixels(data))
    if "pixels" in body:
        return pixels_to_input(body["pixels"])
    raise BadInput(f"expected 'image' or 'pixels', found keys {sorted(body)[:5]}")


def _response(status: int, payload: dict) -> dict:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": json.dumps(payload)}


def lambda_handler(event, context=None) -> dict:
    try:
        raw = (event or {}).get("body")
        if raw is None:
            raise BadInput("expected a request body")
        if len(raw) > MAX_BODY_BYTES * 4 // 3 + 4:
            raise BadInput(f"request body too large: at most {MAX_BODY_BYTES} bytes")
        if event.get("isBase64Encoded"):
            try:
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as error:
                raise BadInput("the body is marked base64 but does not decode") from error
        if len(raw) > MAX_BODY_BYTES:
            raise BadInput(f"request body too large: {len(raw)} bytes, at most {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadInput(f"the body is not valid JSON ({error.__class__.__name__})") from error
        row = parse_request(body)
    except BadInput as error:
        return _response(400, {"error": str(error)})
    loaded = model()
    scores = loaded.scores(row[np.newaxis, :])[0]
    return _response(200, {"predictions": top_k(scores, loaded.labels)})
