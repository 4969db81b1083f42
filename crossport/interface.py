"""The input/output contract every servable crossport publishes keeps (README.md, "What a run produces").

One place for the names, sizes and signature definitions: the ONNX export, the SavedModel
builder and its checker, TFLite conversion, the warmup records, the servable card, the
web service and the tests import them from here.

- ``serving_default``: method ``tensorflow/serving/predict``; input ``images`` float32
  [None, 784] (28×28 grayscale in [0, 1], EMNIST orientation); output ``scores`` float32
  [None, C].
- ``classify``: method ``tensorflow/serving/classify``; input ``inputs`` string [None] of
  serialized ``tf.train.Example`` with feature ``images`` (784 floats); outputs ``classes``
  string [None, C] (the labels) and ``scores`` float32 [None, C].
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
    """uint8 [N, 784] → float32 in [0, 1]: the scaling every servable expects."""
    return images.astype(np.float32) / np.float32(255.0)


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


def signature_contracts(num_classes: int) -> dict[str, SignatureContract]:
    return {
        PREDICT_KEY: SignatureContract(
            PREDICT_METHOD,
            {INPUT: TensorContract("DT_FLOAT", (None, INPUT_SIZE))},
            {SCORES: TensorContract("DT_FLOAT", (None, num_classes))},
        ),
        CLASSIFY_KEY: SignatureContract(
            CLASSIFY_METHOD,
            {CLASSIFY_INPUT: TensorContract("DT_STRING", (None,))},
            {
                CLASSES: TensorContract("DT_STRING", (None, num_classes)),
                SCORES: TensorContract("DT_FLOAT", (None, num_classes)),
            },
        ),
    }
