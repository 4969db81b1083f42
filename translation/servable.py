"""The SavedModel deployers get: ``serving_default`` (predict) and ``classify`` signatures.

Contract (ARCHITECTURE.md, "Signatures"):

- ``serving_default``: method ``tensorflow/serving/predict``; input ``images`` float32
  [None, 784]; output ``scores`` float32 [None, C].
- ``classify``: method ``tensorflow/serving/classify``; input ``inputs`` string [None] of
  serialized ``tf.train.Example`` with feature ``images`` (784 floats); outputs ``classes``
  string [None, C] (the labels) and ``scores`` float32 [None, C].

TF 2.21's ``tf.saved_model.save`` writes every signature with the predict method, so the
classify signature's ``method_name`` is set in ``saved_model.pb`` after saving and
``fingerprint.pb`` is rewritten to match the edited graph.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from crossport.errors import PackageError

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
PREDICT_KEY = "serving_default"
CLASSIFY_KEY = "classify"
IMAGE_FEATURE = "images"
INPUT_SIZE = 784


@dataclass(frozen=True)
class TensorContract:
    dtype: str  # DataType enum name, e.g. "DT_FLOAT"
    shape: tuple[int | None, ...]  # None: any size (the batch dimension)


@dataclass(frozen=True)
class SignatureContract:
    method: str
    inputs: dict[str, TensorContract]
    outputs: dict[str, TensorContract]


def signature_contracts(num_classes: int) -> dict[str, SignatureContract]:
    return {
        PREDICT_KEY: SignatureContract(
            PREDICT_METHOD,
            {"images": TensorContract("DT_FLOAT", (None, INPUT_SIZE))},
            {"scores": TensorContract("DT_FLOAT", (None, num_classes))},
        ),
        CLASSIFY_KEY: SignatureContract(
            CLASSIFY_METHOD,
            {"inputs": TensorContract("DT_STRING", (None,))},
            {
                "classes": TensorContract("DT_STRING", (None, num_classes)),
                "scores": TensorContract("DT_FLOAT", (None, num_classes)),
            },
        ),
    }


def build_saved_model(tf_graph_dir: Path, labels: tuple[str, ...], out_dir: Path) -> None:
    """Wrap the translated graph in the two serving signatures and save it to ``out_dir``."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(tf_graph_dir))
    if "serving_default" not in graph.signatures:
        raise PackageError(f"translated graph {tf_graph_dir} has no serving_default signature.",
                           hint="Re-run the translate stage.")

    class Servable(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph
            self.labels = tf.constant(list(labels), dtype=tf.string)

        @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE], tf.float32, name="images")])
        def predict(self, images):
            return {"scores": self.graph.signatures["serving_default"](images=images)["scores"]}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            features = tf.io.parse_example(
                inputs, {IMAGE_FEATURE: tf.io.FixedLenFeature([INPUT_SIZE], tf.float32)}
            )
            scores = self.predict(features[IMAGE_FEATURE])["scores"]
            classes = tf.tile(self.labels[tf.newaxis, :], [tf.shape(scores)[0], 1])
            return {"classes": classes, "scores": scores}

    servable = Servable()
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(
        servable, str(staging),
        signatures={PREDICT_KEY: servable.predict, CLASSIFY_KEY: servable.classify},
    )
    set_method_name(staging, CLASSIFY_KEY, CLASSIFY_METHOD)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    check_signatures(out_dir, len(labels))


def set_method_name(saved_model_dir: Path, signature_key: str, method_name: str) -> None:
    """Set one SignatureDef's method name in ``saved_model.pb`` and refresh ``fingerprint.pb``."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model import fingerprinting_utils

    pb_path = Path(saved_model_dir) / "saved_model.pb"
    proto = saved_model_pb2.SavedModel.FromString(pb_path.read_bytes())
    for meta_graph in proto.meta_graphs:
        meta_graph.signature_def[signature_key].method_name = method_name
    pb_path.write_bytes(proto.SerializeToString())
    # The fingerprint hashes saved_model.pb; TF Serving and tf.saved_model tooling read it.
    fingerprinting_utils.write_fingerprint(str(saved_model_dir))


def read_signature_defs(saved_model_dir: Path) -> dict:
    """The SignatureDefs stored in ``saved_model.pb`` (serving meta graph)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    pb_path = Path(saved_model_dir) / "saved_model.pb"
    if not pb_path.is_file():
        raise PackageError(f"{saved_model_dir} is not a SavedModel: no saved_model.pb.",
                           hint="Re-run the package stage.")
    try:
        proto = saved_model_pb2.SavedModel.FromString(pb_path.read_bytes())
    except DecodeError as error:
        raise PackageError(f"{pb_path} is corrupt: {error}.", hint="Re-run the package stage.") from error
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise PackageError(f"{pb_path} has no meta graph tagged 'serve'.", hint="Re-run the package stage.")


def check_signatures(saved_model_dir: Path, num_classes: int) -> None:
    """Check the stored SignatureDefs against the contract; one error lists every mismatch."""
    from tensorflow.core.framework import types_pb2

    defs = read_signature_defs(saved_model_dir)
    problems = []
    for key, contract in signature_contracts(num_classes).items():
        if key not in defs:
            problems.append(f"missing signature {key!r}")
            continue
        sig = defs[key]
        if sig.method_name != contract.method:
            problems.append(f"{key}: method {sig.method_name!r}, expected {contract.method!r}")
        for side, wanted, found in (("input", contract.inputs, sig.inputs), ("output", contract.outputs, sig.outputs)):
            if set(found) != set(wanted):
                problems.append(f"{key}: {side}s {sorted(found)}, expected {sorted(wanted)}")
                continue
            for name, tensor in wanted.items():
                info = found[name]
                dtype = types_pb2.DataType.Name(info.dtype)
                shape = tuple(None if d.size == -1 else d.size for d in info.tensor_shape.dim)
                if info.tensor_shape.unknown_rank:
                    shape = ("unknown rank",)
                if dtype != tensor.dtype or shape != tensor.shape:
                    problems.append(f"{key}: {side} {name!r} is {dtype}{list(shape)}, "
                                    f"expected {tensor.dtype}{list(tensor.shape)}")
    if problems:
        raise PackageError(f"SavedModel {saved_model_dir} breaks the serving contract: " + "; ".join(problems) + ".",
                           hint="Re-run the package stage.")
