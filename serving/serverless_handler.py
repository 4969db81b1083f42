"""AWS-Lambda-style handler for a crossport TFLite servable. Self-contained on purpose.

This file is copied as ``handler.py`` into the package ``python -m pipelines.serverless``
builds, next to ``model.tflite`` and ``labels.txt``; it needs only ai-edge-litert, numpy
and pillow, never crossport. crossport's web service imports the same functions, so a
PNG or JPEG becomes the same model input everywhere.

The model's input shape says what a request becomes (crossport.interface.ImageContract):
[N, 784] is a 28×28 grayscale digit or letter in EMNIST orientation, prepared as NIST did
(inverted to white ink on black, the ink centred in 20×20); [N, H, W, C] is any other
image, decoded to RGB (C = 3) or grayscale (C = 1) and resized to H×W, upright.

Request (API Gateway proxy event, ``body`` JSON, optionally base64-encoded):
    {"image": "<base64 PNG or JPEG>"}                 any size or mode; fitted to the model
    {"pixels": [floats in [0, 1]]}                     one example: 784 values or 28 rows of 28
                                                       (EMNIST orientation), or [H][W][C] / H·W·C values
Response body: {"predictions": [{"label": "7", "probability": 0.98}, ...]} (top 3).
Bad input gets status 400 and {"error": "..."}.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAX_BODY_BYTES = 1_000_000  # API Gateway caps payloads at 10 MB; a 28×28 PNG is < 2 kB
MAX_IMAGE_SIDE = 4096
IMAGE_FORMATS = ("PNG", "JPEG")
SIDE = 28
TOP_K = 3


class BadInput(ValueError):
    """The request is not something the model can answer; the message says why."""


# --- input preparation (shared with crossport's web service) ------------------------------

def image_to_pixels(data: bytes) -> np.ndarray:
    """A PNG or JPEG (any size, any mode) → float32 [28, 28] in [0, 1], upright, white ink on black.

    Gray levels come from the full bit depth (16-bit PNGs too) and the palette; EXIF
    orientation is applied. Transparent pixels are composited onto the background
    (:func:`composite`), then the image is inverted when the background is light (EMNIST
    is white ink on black) and the ink's bounding box is scaled to fit 20×20 and centred in
    28×28, as NIST did.
    """
    from PIL import Image

    gray = composite(*decode_gray_alpha(data))
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


def _decoded(data: bytes, read):
    """``read(image)`` of ``data`` opened as a PNG or JPEG of at most MAX_IMAGE_SIDE a side, EXIF orientation applied;
    BadInput when it is not one (decoding errors surface in ``read``, where the pixels are first read)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise BadInput(f"expected a PNG or JPEG image, found {image.format or 'an unknown format'}")
        if not (0 < image.width <= MAX_IMAGE_SIDE and 0 < image.height <= MAX_IMAGE_SIDE):
            raise BadInput(f"expected an image of at most {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} pixels, "
                           f"found {image.width}×{image.height}")
        return read(ImageOps.exif_transpose(image))
    except BadInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadInput(f"the image could not be decoded as PNG or JPEG ({error})") from error


WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # PIL's 16-bit (or wider) grayscale modes


def _gray(image) -> np.ndarray:
    """Gray levels as float32 [H, W] in [0, 1]: 16-bit levels kept; any other mode through RGBA then RGB (palette
    with its transparency, LA, CMYK)."""
    if image.mode not in WIDE_MODES:
        return _gray_of_rgba(image.convert("RGBA"))
    values = np.asarray(image, dtype=np.float32)
    wide = image.mode.startswith("I;16") or values.max() > 255
    top = 1.0 if image.mode == "F" else 65535.0 if wide else 255.0
    return np.clip(values / top, 0.0, 1.0)


def _gray_of_rgba(rgba) -> np.ndarray:
    return np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float32) / 255.0


def decode_gray_alpha(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``data``; gray and alpha as float32 [H, W] arrays in [0, 1]; BadInput when it is not an image."""

    def read(image):
        if image.mode in WIDE_MODES:
            gray = _gray(image)
            return gray, np.ones(gray.shape, dtype=np.float32)
        rgba = image.convert("RGBA")
        return _gray_of_rgba(rgba), np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0

    return _decoded(data, read)


def composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Transparent pixels take the background's shade: the opposite of the ink's.

    The ink is what is opaque; its mean gray (weighted by alpha) says whether it is dark
    ink (composited onto white, like paper) or light ink (onto black). A fully opaque
    image is unchanged.
    """
    if alpha.min() >= 1.0:
        return gray
    weight = float(alpha.sum())
    ink = float((gray * alpha).sum()) / weight if weight > 0 else 0.0
    background = 1.0 if ink < 0.5 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def to_model_input(upright: np.ndarray) -> np.ndarray:
    """Upright [28, 28] → the model's input row: transposed (EMNIST orientation), flattened."""
    return np.ascontiguousarray(upright.T.reshape(SIDE * SIDE), dtype=np.float32)


def image_to_input(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A PNG or JPEG → one example of the model's input ``shape``: (784,) by :func:`image_to_pixels` (EMNIST
    orientation); (H, W, C) by :func:`resized_image`."""
    if len(shape) == 1:
        return to_model_input(image_to_pixels(data))
    return resized_image(data, *shape)


def resized_image(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """A PNG or JPEG (any size, any mode) → float32 [height, width, channels] in [0, 1], upright: converted to RGB
    (channels 3) or grayscale (channels 1) as torchvision's image loader converts it (transparency dropped), EXIF
    orientation applied, resized with bilinear interpolation (PIL's, antialiased when it shrinks)."""

    def read(image):
        from PIL import Image

        if channels == 1 or image.mode in WIDE_MODES:  # 16-bit grayscale keeps every level through the resize
            levels = Image.fromarray(_gray(image), mode="F").resize((width, height), Image.BILINEAR)
            plane = np.clip(np.asarray(levels, dtype=np.float32), 0.0, 1.0)
            return np.repeat(plane[:, :, np.newaxis], channels, axis=2)
        rgb = image.convert("RGB").resize((width, height), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.float32) / np.float32(255.0)

    return _decoded(data, read)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_LITERAL = re.compile(rb"\b(true|false|null)\b|NaN|Infinity")
_NUMERIC_JSON = b'0123456789+-.eE,:[]{}" \t\r\n'  # every byte of a skeleton holding only numbers


def _json_loads():
    """orjson parses a batch of floats 6x faster than json (crossport's service installs it); the Lambda
    package ships without it and uses the standard library."""
    try:
        import orjson
    except ImportError:
        return json.loads
    return orjson.loads


_loads = _json_loads()


def parse_json(raw: bytes | str, max_depth: int, expected: str | None = None) -> object:
    """JSON whose values are numbers, strings, lists and objects, nested at most ``max_depth`` deep, and (given
    ``expected``, what the caller wants, e.g. "a JSON object with 'image'") an object at the top.

    Checked on the bytes before parsing, so a hostile body costs no recursion: the
    skeleton (strings blanked) is scanned for nesting and for literals (true, false, null,
    NaN, Infinity) that are never a valid value here.
    """
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    skeleton = _STRING.sub(b'""', data)
    depth = _max_depth(np.frombuffer(skeleton, np.uint8))
    if depth > max_depth:
        raise BadInput(f"the JSON is nested {depth} levels deep; a request here has at most {max_depth}")
    top, literal = skeleton.strip()[:1], _LITERAL.match(skeleton.strip())
    found = ({b"[": "a list", b'"': "a string", b"": "nothing"}.get(top)
             or (f"the JSON literal {literal.group().decode()}" if literal else None)
             or ("a number" if top in b"-0123456789" else None))
    if expected and found:  # the whole body is one other value: say what was wanted, not what is wrong inside it
        raise BadInput(f"expected {expected}, found {found}")
    if skeleton.translate(None, _NUMERIC_JSON):  # something besides numbers and punctuation: look for literals
        literal = _LITERAL.search(skeleton)
        if literal:
            raise BadInput(f"expected numbers, found the JSON literal {literal.group().decode()}")
    if _loads is not json.loads and _DIGIT_RUN not in skeleton.translate(_DIGITS_AS_ZERO):
        # orjson reads an integer past 64 bits as a float and refuses 1e999; json keeps both, and the number
        # checks after parsing refuse them with their own message: so orjson only where the two agree
        with contextlib.suppress(ValueError):
            return _loads(data)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise BadInput(f"the body is not valid JSON ({error})") from error


def _max_depth(codes: np.ndarray) -> int:
    """The deepest nesting of brackets and braces in a skeleton (its strings blanked), counted over the brackets
    alone: one comparison pass over the bytes, then a running sum over the few hundred brackets."""
    opens = (codes == ord("[")) | (codes == ord("{"))
    marks = np.flatnonzero(opens | (codes == ord("]")) | (codes == ord("}")))
    return int(np.cumsum(np.where(opens[marks], 1, -1)).max()) if len(marks) else 0


# a run of 20 digits: more than a float64 prints in a row (17), and an integer past 64 bits
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_DIGIT_RUN = b"0" * 20


def numbers(value, what: str) -> np.ndarray:
    """``value`` as a float32 array, refused unless every element is a JSON number."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # ragged lists
        raise BadInput(f"expected {what}: lists of numbers of equal length") from error
    if array.dtype.kind not in "iuf" or array.size == 0:
        found = "an empty list" if array.size == 0 else f"{_kind(array.dtype.kind)} values"
        raise BadInput(f"expected {what}: numbers, found {found}")
    return array.astype(np.float32)


def _kind(code: str) -> str:
    return {"U": "string", "S": "string", "b": "boolean", "O": "mixed or out-of-range"}.get(code, code)


def pixel_problem(array: np.ndarray) -> str | None:
    """The one rule every serving path keeps (REST, gRPC, this handler, the upload page): each value a pixel in
    [0, 1] (grayscale / 255), as the model was trained and checked; NaN, infinity or any value outside is refused."""
    bad = ~(np.isfinite(array) & (array >= 0.0) & (array <= 1.0))
    if not bad.any():
        return None
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"expected pixel values in [0, 1] (grayscale / 255), found {float(array[where]):.7g} at index "
            f"{list(where)}{f' and {int(bad.sum()) - 1} more' if bad.sum() > 1 else ''}")


def raw_pixel_problem(array: np.ndarray) -> str | None:
    """:func:`pixel_problem` for ``predict_uint8``: each value an integer pixel from 0 to 255."""
    bad = ~(np.isfinite(array) & (array >= 0) & (array <= 255) & (np.floor(array) == array))
    if not bad.any():
        return None
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"expected integer pixel values from 0 to 255 (signature predict_uint8), found {float(array[where]):.7g} "
            f"at index {list(where)}{f' and {int(bad.sum()) - 1} more' if bad.sum() > 1 else ''}")


def pixels_to_input(pixels, shape: tuple[int, ...] = (SIDE * SIDE,)) -> np.ndarray:
    """One example of the model's input ``shape``, in [0, 1]: for (784,) 784 values or 28 rows of 28 (EMNIST
    orientation); for (H, W, C) H rows of W pixels of C values, or H·W·C values row-major."""
    size = int(np.prod(shape))
    accepted = [(size,), (SIDE, SIDE)] if len(shape) == 1 else [(size,), tuple(shape)]
    wanted = f"{size} pixels or {'×'.join(map(str, accepted[1]))}"
    array = numbers(pixels, f"'pixels' as {wanted}")
    if array.shape not in accepted:
        raise BadInput(f"expected {wanted}, found shape {list(array.shape)}")
    problem = pixel_problem(array)
    if problem:
        raise BadInput(problem)
    return array.reshape(shape)


def top_k(scores: np.ndarray, labels: list[str], k: int = TOP_K) -> list[dict]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"label": labels[i], "class_id": int(i), "probability": float(scores[i])} for i in order]


# --- the model, loaded once per process ----------------------------------------------------

def interpreter_threads() -> int:
    """Every core the function has (Lambda's vCPUs grow with its memory), or ``TFLITE_THREADS`` when it is set."""
    text = os.environ.get("TFLITE_THREADS", "").strip()
    if not text:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"TFLITE_THREADS must be a whole number of interpreter threads, 1 or more, found {text!r}; "
                         f"fix it in the function's environment, or unset it to use every core")
    return int(text)


class TFLiteModel:
    def __init__(self, model_path: Path, labels_path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(model_path), num_threads=interpreter_threads())
        runner = self.interpreter.get_signature_runner("serving_default")
        ((self.input_name, details),) = runner.get_input_details().items()
        self.input_index, self.sized = details["index"], None
        self.scores_index = runner.get_output_details()["scores"]["index"]
        # the interpreter's own calls reach its first subgraph only, where crossport's files keep the signature; a
        # runner kept alive holds the interpreter, which then refuses its own calls, so it is kept only if needed
        self.runner = None if getattr(runner, "_subgraph_index", None) == 0 else runner
        self.shape = tuple(int(d) for d in details["shape"][1:])  # one example: (784,) or (H, W, C)
        self.labels = labels_path.read_text().splitlines()

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """The signature's own sequence, with the interpreter resized only when the batch's shape changes (LiteRT's
        signature runner resizes and allocates on every call: crossport.runtimes.signature_call)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.runner is not None:
            return np.asarray(self.runner(**{self.input_name: rows})["scores"])
        if rows.shape != self.sized:
            self.sized = None
            self.interpreter.resize_tensor_input(self.input_index, rows.shape)
            self.interpreter.allocate_tensors()
            self.sized = rows.shape
        self.interpreter.set_tensor(self.input_index, rows)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.scores_index)


_MODEL: TFLiteModel | None = None


def model() -> TFLiteModel:
    global _MODEL
    if _MODEL is None:
        _MODEL = TFLiteModel(Path(os.environ.get("MODEL_PATH", HERE / "model.tflite")),
                             Path(os.environ.get("LABELS_PATH", HERE / "labels.txt")))
    return _MODEL


# --- the handler ---------------------------------------------------------------------------

REQUEST_SHAPE = "a JSON object with 'image' (base64 PNG or JPEG) or 'pixels'"


def parse_request(body, shape: tuple[int, ...] = (SIDE * SIDE,)) -> np.ndarray:
    """A decoded JSON body → one example of the model's input ``shape``; BadInput for anything else."""
    if not isinstance(body, dict):
        raise BadInput(f"expected {REQUEST_SHAPE}")
    if "image" in body:
        if not isinstance(body["image"], str):
            raise BadInput("expected 'image' to be a base64 string of a PNG or JPEG")
        try:
            data = base64.b64decode(body["image"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise BadInput("'image' is not valid base64") from error
        return image_to_input(data, shape)
    if "pixels" in body:
        return pixels_to_input(body["pixels"], shape)
    raise BadInput(f"expected 'image' or 'pixels', found keys {sorted(body)[:5]}")


def max_depth(shape: tuple[int, ...]) -> int:
    """The deepest valid request: {"pixels": [28 rows of 28]} for a 28×28 model, {"pixels": [H rows of W pixels of
    C values]} for any other."""
    return 1 + (2 if len(shape) == 1 else len(shape))


def _response(status: int, payload: dict) -> dict:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": json.dumps(payload)}


def lambda_handler(event, context=None) -> dict:
    loaded = model()
    try:
        body = event_body(event)
        if content_type(event).startswith("image/"):  # a binary media type: the body is the image itself
            row = image_to_input(body, loaded.shape)
        else:
            row = parse_request(parse_json(body, max_depth(loaded.shape), REQUEST_SHAPE), loaded.shape)
    except BadInput as error:
        return _response(400, {"error": str(error)})
    scores = loaded.scores(row[np.newaxis])[0]
    return _response(200, {"predictions": top_k(scores, loaded.labels)})


def content_type(event: dict) -> str:
    """The request's media type, lower case: API Gateway's REST API keeps the header's case, the HTTP API
    lower-cases it."""
    headers = event.get("headers") if isinstance(event, dict) else None
    if not isinstance(headers, dict):
        return ""
    value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == "content-type"), "")
    return value.split(";")[0].strip().lower() if isinstance(value, str) else ""


def event_body(event) -> bytes:
    """The raw body of an API Gateway proxy event, base64 decoded when the event says so."""
    if not isinstance(event, dict):
        raise BadInput(f"expected an API Gateway proxy event (an object with 'body'), found {type(event).__name__}")
    raw = event.get("body")
    if raw is None:
        raise BadInput("expected a request body")
    if not isinstance(raw, str):
        raise BadInput(f"expected 'body' as text (API Gateway passes the request body as a string), "
                       f"found {type(raw).__name__}")
    if len(raw) > MAX_BODY_BYTES * 4 // 3 + 4:
        raise BadInput(f"request body too large: at most {MAX_BODY_BYTES} bytes")
    if event.get("isBase64Encoded") is True:
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as error:
            raise BadInput("the body is marked base64 but does not decode") from error
    data = raw.encode("utf-8", errors="surrogatepass")
    if len(data) > MAX_BODY_BYTES:
        raise BadInput(f"request body too large: {len(data)} bytes, at most {MAX_BODY_BYTES}")
    return data
