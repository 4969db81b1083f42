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
from crossport.interface import ASSETS_EXTRA, CLASSIFY_KEY, PREDICT_KEY, SCORES
from export.servable import signature_problems  # the one SignatureDef checker; this command applies it
from export.warmup import WARMUP_FILE


def models_config_problems(models_dir: Path) -> list[str]:
    """``models.config`` parsed with TF Serving's own ``ModelServerConfig`` proto, and checked."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from crossport.interface import MODELS_CONFIG
    from export.publish import versions

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

    path = Path(version_dir) / ASSETS_EXTRA / WARMUP_FILE
    if not path.is_file():
        raise PackageError(f"{path} does not exist.", hint="Re-publish the version.")
    model = tf.saved_model.load(str(version_dir))
    replayed = []
    for index, raw in enumerate(tf.data.TFRecordDataset(str(path))):
        record = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        kind = record.WhichOneof("log_type")
        if kind == "predict_log":
            request = record.predict_log.request
            function = _signature(model, request.model_spec.signature_name or PREDICT_KEY, index)
            inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
            outputs = function(**inputs)
            batch = int(next(iter(inputs.values())).shape[0])
        elif kind == "classify_log":
            request = record.classify_log.request
            function = _signature(model, request.model_spec.signature_name or CLASSIFY_KEY, index)
            examples = [example.SerializeToString() for example in request.input.example_list.examples]
            outputs = function(inputs=tf.constant(examples))
            batch = len(examples)
        else:
            raise PackageError(f"warmup record {index} is a {kind}, which crossport servables do not answer.")
        shapes = {name: list(value.shape) for name, value in outputs.items()}
        if any(shape[0] != batch for shape in shapes.values()):
            raise PackageError(f"warmup record {index} ({kind}): batch {batch} answered with shapes {shapes}.")
        scores = outputs[SCORES].numpy()
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
                from export.publish import versions

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
