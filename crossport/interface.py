"""The input/output contract every servable crossport publishes keeps (README.md, "What a run produces").

One place for the names, sizes and signature definitions: the ONNX export, the SavedModel
builder and its checker, TFLite conversion, the warmup records, the servable card, the
web service and the tests import them from here.

- ``serving_default``: method ``tensorflow/serving/predict``; input ``images`` float32
  [None, *shape] in [0, 1], the model's :class:`ImageContract`: [None, 784] for a 28×28
  grayscale model (EMNIST orientation), [None, H, W, C] upright and channels last for any
  other; output ``scores`` float32 [None, C].
- ``classify``: method ``tensorflow/serving/classify``; input ``inputs`` string [None] of
  serialized ``tf.train.Example`` with feature ``images`` (the image's values, row-major);
  outputs ``classes`` string [None, C] (the labels) and ``scores`` float32 [None, C].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIDE = 28
INPUT_SIZE = IMAGE_SIDE * IMAGE_SIDE  # 784: one flattened 28×28 image
INPUT = "images"  # the input tensor of every servable, and the tf.train.Example feature
SCORES = "scores"  # softmax probabilities [N, C]
LOGITS = "logits"  # pre-softmax values [N, C]: the ONNX export and the TF graph only
CLASSES = "classes"  # classify's label strings [N, C]
CLASSIFY_INPUT = "inputs"  # classify's serialized tf.train.Example batch (TF Serving's fixed key)

PREDICT_KEY = "serving_default"
PREDICT_UINT8_KEY = "predict_uint8"  # images as 0-255 integers, scaled by 1/255 inside the graph: 4x smaller requests
CLASSIFY_KEY = "classify"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"

ASSETS_EXTRA = "assets.extra"  # everything of a version besides the SavedModel lives here
MODELS_CONFIG = "models.config"  # TF Serving's ModelServerConfig beside the model directories


def label_problem(labels, classes: int | None = None) -> str | None:
    """What makes ``labels`` unfit to be a version's labels.txt (one label per line, in class-id order) and
    classify's ``classes`` strings, or None: each a non-empty string with no control character (a newline would
    become a line of its own), no label twice, and ``classes`` of them where the model's class count is known."""
    import unicodedata

    if classes is not None and len(labels) != classes:
        return f"lists {len(labels)} labels; the model outputs {classes} classes"
    for index, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            return f"label {index} is {label!r}, not a non-empty string"
        if label != label.strip():
            return f"label {index} ({label!r}) starts or ends with white space"
        bad = next((c for c in label if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
        if bad is not None:
            return f"label {index} ({label!r}) holds the control character {bad!r}"
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if list(labels).count(label) > 1)
        return f"lists the label {twice!r} twice"
    return None


def to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 [N, *shape] → float32 in [0, 1]: the scaling every servable expects."""
    return images.astype(np.float32) / np.float32(255.0)


class Inputs:
    """float32 model inputs made a slice at a time from what holds them more compactly: uint8 pixels (scaled as
    :func:`to_inputs` scales them, so every value is the same bit for bit) and float32 rows, one part after another.

    A slice is another :class:`Inputs`; numpy reads one (``np.asarray``) as the float32 array it stands for, and any
    other index as those rows. Every runtime (:func:`crossport.runtimes.chunked`) and the exact reference read their
    inputs a chunk at a time, so validate holds EMNIST byclass's full-size test split as its 91 MB of pixels, not
    as 365 MB of float32."""

    dtype = np.dtype(np.float32)

    def __init__(self, *parts: np.ndarray, start: int = 0, stop: int | None = None) -> None:
        self._parts = parts
        self._start = start
        self._stop = sum(len(part) for part in parts) if stop is None else stop
        self.shape = (self._stop - self._start, *parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            return Inputs(*self._parts, start=self._start + start, stop=self._start + max(start, stop))
        if isinstance(key, int | np.integer):
            row = range(len(self))[key]
            return np.asarray(self[row : row + 1])[0]
        rows = np.arange(len(self))[key]  # any other index: those rows, each read on its own
        return np.stack([np.asarray(self[int(row) : int(row) + 1])[0] for row in rows]) if len(rows) else (
            np.empty((0, *self.shape[1:]), np.float32))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        pieces, offset = [], 0
        for part in self._parts:
            low, high = max(self._start - offset, 0), min(self._stop - offset, len(part))
            if low < high:
                rows = part[low:high]
                pieces.append(to_inputs(rows) if rows.dtype == np.uint8 else rows.astype(np.float32))
            offset += len(part)
        array = np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), np.float32)
        return array if dtype is None else array.astype(dtype)


def transposed(images: np.ndarray) -> np.ndarray:
    """[N, 784] images with each 28×28 picture transposed: EMNIST orientation ↔ upright."""
    return images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 1).reshape(-1, INPUT_SIZE)


CHANNEL_NAMES = {1: "grayscale", 3: "RGB"}


@dataclass(frozen=True)
class ImageContract:
    """What one example of ``images`` is, declared by the shape of the published input.

    ``(784,)``: a 28×28 grayscale image flattened row-major in EMNIST orientation (each
    picture transposed), crossport's contract since its first version and every trained
    model's. ``(H, W, C)``: an image of any other size, upright as people see it, channels
    last (TensorFlow's layout), C = 1 (grayscale) or 3 (RGB). Values in [0, 1] either way;
    a model that expects normalised inputs gets its ``(x − mean) / std`` inside the graph.
    """

    shape: tuple[int, ...] = (INPUT_SIZE,)

    @classmethod
    def of(cls, shape) -> ImageContract:
        """The contract of a published input's example ``shape``, or ValueError saying why there is none."""
        shape = tuple(int(d) for d in shape)
        problem = image_shape_problem(shape)
        if problem:
            raise ValueError(problem)
        return cls(shape)

    @classmethod
    def for_image(cls, height: int, width: int, channels: int) -> ImageContract:
        """28×28 grayscale keeps the flat contract; any other image is published [N, H, W, C]."""
        if (height, width, channels) == (IMAGE_SIDE, IMAGE_SIDE, 1):
            return cls()
        return cls.of((height, width, channels))

    @property
    def flat(self) -> bool:
        return len(self.shape) == 1

    @property
    def height(self) -> int:
        return IMAGE_SIDE if self.flat else self.shape[0]

    @property
    def width(self) -> int:
        return IMAGE_SIDE if self.flat else self.shape[1]

    @property
    def channels(self) -> int:
        return 1 if self.flat else self.shape[2]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def orientation(self) -> str:
        """``emnist``: each 28×28 picture transposed, as EMNIST stores it; ``upright``: as people see it."""
        return "emnist" if self.flat else "upright"

    def batch_shape(self) -> list:
        return [None, *self.shape]

    def describe(self) -> str:
        kind = CHANNEL_NAMES[self.channels]
        if self.flat:
            return f"{self.height}×{self.width} {kind}, flattened row-major to {self.size} values, EMNIST orientation"
        return (f"{self.height}×{self.width} {kind}, [N, {self.height}, {self.width}, {self.channels}] channels last, "
                "upright")

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "height": self.height, "width": self.width, "channels": self.channels,
                "channel_order": CHANNEL_NAMES[self.channels], "orientation": self.orientation,
                "value_range": [0.0, 1.0]}


EMNIST_IMAGE = ImageContract()  # 28×28 grayscale, [N, 784], EMNIST orientation: every trained model's


def image_shape_problem(shape: tuple) -> str | None:
    """Why ``shape`` (one example's) is not a published image input, or None."""
    if shape == (INPUT_SIZE,):
        return None
    if len(shape) != 3 or any(d < 1 for d in shape) or shape[2] not in CHANNEL_NAMES:
        return (f"an image input is [N, {INPUT_SIZE}] (28×28 grayscale) or [N, H, W, C] with C 1 or 3; found "
                f"[N, {', '.join(map(str, shape))}]")
    if shape == (IMAGE_SIDE, IMAGE_SIDE, 1):
        return f"a 28×28 grayscale image is published as [N, {INPUT_SIZE}], not [N, 28, 28, 1]"
    return None


@dataclass(frozen=True)
class TensorContract:
    dtype: str  # DataType enum name, e.g. "DT_FLOAT"
    shape: tuple[int | None, ...]  # None: any size (the batch dimension)

    def describe(self) -> str:
        return f"{self.dtype} [{', '.join('-1' if d is None else str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class SignatureContract:
    method: str
    inputs: dict[str, TensorContract]
    outputs: dict[str, TensorContract]
    optional: bool = False  # versions published before it existed lack it: checked only where present


def signature_contracts(num_classes: int, image: ImageContract | None = None) -> dict[str, SignatureContract]:
    image = image or EMNIST_IMAGE
    scores = {SCORES: TensorContract("DT_FLOAT", (None, num_classes))}
    return {
        PREDICT_KEY: SignatureContract(PREDICT_METHOD, {INPUT: TensorContract("DT_FLOAT", (None, *image.shape))},
                                       scores),
        PREDICT_UINT8_KEY: SignatureContract(PREDICT_METHOD,
                                             {INPUT: TensorContract("DT_UINT8", (None, *image.shape))}, scores,
                                             optional=True),
        CLASSIFY_KEY: SignatureContract(
            CLASSIFY_METHOD,
            {CLASSIFY_INPUT: TensorContract("DT_STRING", (None,))},
            {
                CLASSES: TensorContract("DT_STRING", (None, num_classes)),
                SCORES: TensorContract("DT_FLOAT", (None, num_classes)),
            },
        ),
    }
