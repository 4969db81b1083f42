"""TF Serving's rules, checked offline against published versions and ``models.config``.

No TF Serving binary runs here, so this module applies the checks TF Serving makes when it
loads a version and answers requests: the rules its predict and classify handlers apply to
SignatureDefs (method names, input/output keys, dtypes, ranks, batch dimension), the
``ModelServerConfig`` proto it parses from ``--model_config_file``, and a replay of
``assets.extra/tf_serving_warmup_requests`` through the SavedModel, record by record.

    python -m pipelines.contract models        # every model in models.config, every version
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from crossport.errors import CrossportError, PackageError, report

PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"


def signature_problems(version_dir: Path) -> list[str]:
    """Every way the version's SignatureDefs break TF Serving's predict/classify rules."""
    from tensorflow.core.framework import types_pb2

    from translation.servable import read_signature_defs

    defs = {key: value for key, value in read_signature_defs(version_dir).items() if not key.startswith("__")}
    problems = []

    def tensors(key, side, infos):
        for name, info in infos.items():
            dims = [d.size for d in info.tensor_shape.dim]
            if info.tensor_shape.unknown_rank or not dims:
                problems.append(f"{key}: {side} {name!r} has no known rank (TF Serving batches on dimension 0)")
            elif dims[0] != -1:
                problems.append(f"{key}: {side} {name!r} has a fixed batch dimension {dims[0]}, expected -1")
            if info.dtype == types_pb2.DT_INVALID:
                problems.append(f"{key}: {side} {name!r} has no dtype")

    if "serving_default" not in defs:
        problems.append("no 'serving_default' signature: TF Serving's default for requests without a signature_name")
    for key, signature in defs.items():
        if signature.method_name == PREDICT:
            if not signature.inputs or not signature.outputs:
                problems.append(f"{key}: a predict signature needs inputs and outputs")
        elif signature.method_name == CLASSIFY:
            # tensorflow_serving/servables/tensorflow/classifier.cc: one DT_STRING input
            # (serialized tf.Examples), outputs 'classes' (DT_STRING) and/or 'scores' (DT_FLOAT).
            if list(signature.inputs) != ["inputs"] or signature.inputs["inputs"].dtype != types_pb2.DT_STRING:
                problems.append(f"{key}: classify needs exactly one DT_STRING input 'inputs', found "
                                f"{ {k: types_pb2.DataType.Name(v.dtype) for k, v in signature.inputs.items()} }")
            outputs = set(signature.outputs)
            if not outputs or outputs - {"classes", "scores"}:
                problems.append(f"{key}: classify outputs must be 'classes' and/or 'scores', found {sorted(outputs)}")
            if "classes" in outputs and signature.outputs["classes"].dtype != types_pb2.DT_STRING:
                problems.append(f"{key}: classify output 'classes' must be DT_STRING")
            if "scores" in outputs and signature.outputs["scores"].dtype != types_pb2.DT_FLOAT:
                problems.append(f"{key}: classify output 'scores' must be DT_FLOAT")
            for name in outputs & {"classes", "scores"}:
                if len(signature.outputs[name].tensor_shape.dim) != 2:
                    problems.append(f"{key}: classify output {name!r} must be [batch, classes]")
        else:
            problems.append(f"{key}: method {signature.method_name!r} is neither predict nor classify")
        tensors(key, "input", signature.inputs)
        tensors(key, "output", signature.outputs)
    return problems


def models_config_problems(models_dir: Path) -> list[str]:
    """``models.config`` parsed with TF Serving's own ``ModelServerConfig`` proto, and checked."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from pipelines.publish import MODELS_CONFIG, versions

    path = Path(models_dir) / MODELS_CONFIG
    if not path.is_file():
        return [f"{path} does not exist"]
    try:
        config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as error:
        return [f"{path} is not a ModelServerConfig: {error}"]
    problems = []
    for entry in config.model_config_list.config:
        base = Path(entry.base_path)
        if entry.model_platform != "tensorflow":
            problems.append(f"{entry.name}: model_platform {entry.model_platform!r}, expected 'tensorflow'")
        if not base.is_absolute() or not versions(base):
            problems.append(f"{entry.name}: base_path {base} must be absolute and hold integer version directories")
            continue
        for number in versions(base):
            problems += [f"{entry.name}/{number}: {p}" for p in signature_problems(base / str(number))]
    if not config.model_config_list.config:
        problems.append(f"{path} lists no models")
    return problems


def replay_warmup(version_dir: Path) -> list[dict]:
    """Replay every warmup record through the SavedModel as TF Serving does at load time.

    Returns one summary per record (kind, batch size, output shapes); raises PackageError
    on a record TF Serving would reject.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(version_dir) / "assets.extra" / "tf_serving_warmup_requests"
    if not path.is_file():
        raise PackageError(f"{path} does not exist.", hint="Re-publish the version.")
    model = tf.saved_model.load(str(version_dir))
    replayed = []
    for index, raw in enumerate(tf.data.TFRecordDataset(str(path))):
        record = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        kind = record.WhichOneof("log_type")
        if kind == "predict_log":
            request = record.predict_log.request
            function = _signature(model, request.model_spec.signature_name or "serving_default", index)
            inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
            outputs = function(**inputs)
            batch = int(next(iter(inputs.values())).shape[0])
        elif kind == "classify_log":
            request = record.classify_log.request
            function = _signature(model, request.model_spec.signature_name or "classify", index)
            examples = [example.SerializeToString() for example in request.input.example_list.examples]
            outputs = function(inputs=tf.constant(examples))
            batch = len(examples)
        else:
            raise PackageError(f"warmup record {index} is a {kind}, which crossport servables do not answer.")
        shapes = {name: list(value.shape) for name, value in outputs.items()}
        if any(shape[0] != batch for shape in shapes.values()):
            raise PackageError(f"warmup record {index} ({kind}): batch {batch} answered with shapes {shapes}.")
        scores = outputs["scores"].numpy()
        if not np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
            raise PackageError(f"warmup record {index} ({kind}): scores do not sum to 1.")
        replayed.append({"record": index, "kind": kind, "batch": batch, "shapes": shapes})
    if not replayed:
        raise PackageError(f"{path} holds no records.")
    return replayed


def _signature(model, key: str, index: int):
    if key not in model.signatures:
        raise PackageError(f"warmup record {index} asks for signature {key!r}, which the SavedModel lacks.")
    return model.signatures[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.contract",
                                     description="Check published versions against TF Serving's rules.")
    parser.add_argument("models_dir", type=Path, help="the model repository holding models.config")
    args = parser.parse_args(argv)
    try:
        problems = models_config_problems(args.models_dir)
        if not problems:
            from google.protobuf import text_format
            from tensorflow_serving.config import model_server_config_pb2

            config = text_format.Parse((args.models_dir / "models.config").read_text(),
                                       model_server_config_pb2.ModelServerConfig())
            for entry in config.model_config_list.config:
                from pipelines.publish import versions

                for number in versions(Path(entry.base_path)):
                    records = replay_warmup(Path(entry.base_path) / str(number))
                    sys.stdout.write(f"{entry.name}/{number}: signatures ok, {len(records)} warmup records replayed\n")
    except CrossportError as error:
        return report(error)
    for problem in problems:
        sys.stdout.write(f"PROBLEM: {problem}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
