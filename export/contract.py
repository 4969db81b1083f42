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

from crossport.errors import CrossportError, PackageError
from crossport.interface import ASSETS_EXTRA, CLASSIFY_KEY, PREDICT_KEY, SCORES
from export.servable import signature_problems  # the one SignatureDef checker; this command applies it
from export.warmup import WARMUP_FILE


def models_config_problems(models_dir: Path, *, signatures: bool = True, serving_root: str = "/models") -> list[str]:
    """``models.config`` parsed with TF Serving's own ``ModelServerConfig`` proto, and checked (with every listed
    version's signatures unless ``signatures`` is False). A base path under ``serving_root`` (where TF Serving
    mounts the repository) is checked in ``models_dir``; any other must exist on this machine."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from crossport.interface import MODELS_CONFIG
    from export.publish import base_path_here, versions

    path = Path(models_dir) / MODELS_CONFIG
    if not path.is_file():
        return [f"{path} does not exist"]
    try:
        config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as error:
        return [f"{path} is not a ModelServerConfig: {error}"]
    problems = []
    for entry in config.model_config_list.config:
        base = base_path_here(entry.base_path, models_dir, serving_root)
        if entry.model_platform != "tensorflow":
            problems.append(f"{entry.name}: model_platform {entry.model_platform!r}, expected 'tensorflow'")
        if not base.is_absolute():
            problems.append(f"{entry.name}: base_path {base} is relative; crossport writes absolute paths (TF "
                            "Serving would resolve it against its own working directory)")
            continue
        if not versions(base):
            problems.append(f"{entry.name}: base_path {base} holds no integer version directories")
            continue
        problems += [f"{entry.name}: version label {label!r} points at version {number}, which {base} does not hold "
                     "(TF Serving refuses labels of versions it does not serve)"
                     for label, number in entry.version_labels.items() if number not in versions(base)]
        for number in versions(base) if signatures else ():
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
            key = request.model_spec.signature_name or PREDICT_KEY
            function = _signature(model, key, index)
            inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
            outputs = function(**inputs)
            batch = int(next(iter(inputs.values())).shape[0])
        elif kind == "classify_log":
            request = record.classify_log.request
            key = request.model_spec.signature_name or CLASSIFY_KEY
            function = _signature(model, key, index)
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
        replayed.append({"record": index, "kind": kind, "signature": key, "batch": batch, "shapes": shapes,
                         "model": request.model_spec.name})
    if not replayed:
        raise PackageError(f"{path} holds no records.")
    return replayed


def _signature(model, key: str, index: int):
    if key not in model.signatures:
        raise PackageError(f"warmup record {index} asks for signature {key!r}, which the SavedModel lacks.")
    return model.signatures[key]


def class_count(version_dir: Path) -> int | None:
    """How many classes a version answers: its labels.txt, else its predict signature's ``scores`` width."""
    labels = Path(version_dir) / ASSETS_EXTRA / "labels.txt"
    if labels.is_file():
        return len(labels.read_text().splitlines())
    return signature_class_count(version_dir)


def signature_class_count(version_dir: Path) -> int | None:
    """The width of the predict signature's ``scores`` output [batch, classes], or None."""
    from export.servable import read_signature_defs

    predict = read_signature_defs(version_dir).get(PREDICT_KEY)
    if predict is not None and SCORES in predict.outputs:
        dims = [d.size for d in predict.outputs[SCORES].tensor_shape.dim]
        if len(dims) == 2 and dims[1] > 0:
            return dims[1]
    return None


def judge_version(version_dir: Path) -> list[tuple[str, str]]:
    """(who objects, what) for one version, crossport's or not: ``TF_SERVING_REFUSES``, ``CROSSPORT_ONLY`` or
    ``WARNING`` (TF Serving and crossport both accept it, but a deployer should know)."""
    from export.servable import CROSSPORT_ONLY, TF_SERVING_REFUSES, signature_findings

    version_dir = Path(version_dir)
    if not (version_dir / "saved_model.pb").is_file():
        return [(TF_SERVING_REFUSES, f"{version_dir} has no saved_model.pb")]
    classes = class_count(version_dir)
    findings = list(signature_findings(version_dir, classes))
    if classes is None:
        findings.append((CROSSPORT_ONLY, f"no labels.txt and no '{PREDICT_KEY}' {SCORES!r} output [batch, classes]: "
                                         "the class count crossport's contract is checked against is unknown"))
    if not (version_dir / ASSETS_EXTRA / WARMUP_FILE).is_file():
        findings.append((WARNING, f"no {ASSETS_EXTRA}/{WARMUP_FILE}: TF Serving does not require one, but without "
                                  "it the first requests after each load pay the model's warm-up"))
    elif not any(who == TF_SERVING_REFUSES for who, _ in findings):
        try:
            replayed = replay_warmup(version_dir)
        except PackageError as error:  # TF Serving fails the load when a warmup record fails
            findings.append((TF_SERVING_REFUSES, f"warmup: {error.message}"))
        else:  # TF Serving replays a record whatever model it names; a deployer reading them would be misled
            name = version_dir.parent.name if version_dir.name.isdigit() else None
            other = next((r for r in replayed if name and r["model"] and r["model"] != name), None)
            if other is not None:
                findings.append((CROSSPORT_ONLY, f"warmup record {other['record']} names model {other['model']!r}; "
                                                 f"the version is published as {name!r}"))
    return findings


WARNING = "warning"


def judge(path: Path, serving_root: str = "/models") -> dict[str, list[tuple[str, str]]]:
    """Findings per version for a model repository (with models.config), one model's directory, or one version."""
    from crossport.interface import MODELS_CONFIG
    from export.publish import versions
    from export.servable import CROSSPORT_ONLY, TF_SERVING_REFUSES

    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return {path.name: judge_version(path)}
    if (path / MODELS_CONFIG).is_file():
        found: dict[str, list[tuple[str, str]]] = {}
        problems = models_config_problems(path, signatures=False, serving_root=serving_root)
        if problems:  # TF Serving refuses a config it cannot parse, or a model with no version to load
            found[MODELS_CONFIG] = [(CROSSPORT_ONLY if "is relative" in p else TF_SERVING_REFUSES, p)
                                    for p in problems]
        for model in sorted(child for child in path.iterdir() if child.is_dir() and versions(child)):
            for number in versions(model):
                found[f"{model.name}/{number}"] = judge_version(model / str(number))
        return found
    if path.is_dir() and versions(path):
        return {f"{path.name}/{number}": judge_version(path / str(number)) for number in versions(path)}
    raise CrossportError(f"{path} is neither a SavedModel version (saved_model.pb), a model directory of integer "
                         f"versions, nor a model repository with {MODELS_CONFIG}.",
                         hint="Pass a model repository, a model's directory or one version directory.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.contract", allow_abbrev=False,
        description="Check servables against TF Serving's rules and crossport's contract, offline: a model "
                    "repository (models.config), one model's directory or one version, crossport's or not.")
    parser.add_argument("path", type=Path, help="model repository, model directory or version directory")
    parser.add_argument("--serving-root", default="/models",
                        help="where TF Serving mounts the repository: models.config base paths under it are checked "
                             "in PATH (default: /models)")
    parser.add_argument("--debug", action="store_true",
                        help="leave TensorFlow's own output on the console (default: crossport-contract-<pid>.log "
                             "in the temporary folder)")
    args = parser.parse_args(argv)
    from crossport.console import command_log, run_command

    # replaying the warmup records imports TensorFlow, whose output goes to the command's log
    return run_command(lambda: show(judge(args.path, args.serving_root)), debug=args.debug,
                       log_file=command_log("contract"))


def show(found: dict) -> int:
    """The findings, one line each; exit 1 when any is a problem."""
    problems = 0
    for where, findings in found.items():
        if not findings:
            sys.stdout.write(f"{where}: ok (TF Serving's rules and crossport's contract)\n")
        for who, text in findings:
            label = "WARNING" if who == WARNING else f"PROBLEM ({who})"
            problems += who != WARNING
            sys.stdout.write(f"{label}: {where}: {text}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
