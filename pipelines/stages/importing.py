"""The import stage: a model brought as an ONNX file takes the place of data, train and export.

It keeps the file as the run's lineage root (``source.onnx``, hash-checked like every
artifact), resolves labels and evaluation data (:mod:`pipelines.eval_data`), finds out
which way up the model wants its images, normalizes the graph to crossport's contract
(:mod:`translation.onnx_import`) and writes ``model.onnx`` with the golden batch's exact
values read from that graph (:mod:`crossport.exact.graph`). From there translate, package,
tflite, validate, publish and register run as for a model trained here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from crossport.errors import DataError, ImportModelError
from crossport.interface import INPUT, SCORES, transposed
from crossport.parity import CONFIDENCE
from pipelines.results import Made, ModelToLog, StageResult

log = logging.getLogger(__name__)

SOURCE = "source.onnx"


def normalized(data: bytes, orientation: str, scaling: tuple | None = None):
    import onnx

    from translation.onnx_export import EXPORT_OPSET
    from translation.onnx_import import normalize

    return normalize(onnx.load_from_string(data), orientation=orientation, target_opset=EXPORT_OPSET,
                     scaling=scaling)


def session(model):
    from crossport.runtimes import onnx_session

    try:
        return onnx_session(model)
    except Exception as error:  # ORT raises its own Fail/InvalidGraph types
        raise ImportModelError(f"ONNX Runtime cannot load the normalized model: {str(error).splitlines()[0]}.",
                               hint="Check the file with onnx.checker; run with --debug for the details.") from error


def predict_classes(sess, images: np.ndarray) -> np.ndarray:
    from crossport.interface import to_inputs

    out = []
    for start in range(0, len(images), 4096):
        (scores,) = sess.run([SCORES], {INPUT: to_inputs(images[start:start + 4096])})
        out.append(np.argmax(scores, axis=1))
    return np.concatenate(out) if out else np.empty(0, np.int64)


def detect_orientation(data: bytes, images: np.ndarray, targets: np.ndarray,
                       scaling: tuple | None = None) -> dict:
    """Accuracy both ways up, and the orientation that is better by an exact sign test at 99 % (else refuse).

    Parity cannot see orientation: every runtime agrees on a wrongly oriented input. Only
    accuracy can. Of the examples exactly one way gets right, a model indifferent to
    orientation gets each right either way with probability 1/2; the better way is taken
    only when that hypothesis is rejected at the one-sided 1 % level.
    """
    from scipy.stats import binomtest

    sess = session(normalized(data, "emnist", scaling).model)
    as_given = predict_classes(sess, images) == targets
    flipped = predict_classes(sess, transposed(images)) == targets
    only_given, only_flipped = int(np.sum(as_given & ~flipped)), int(np.sum(flipped & ~as_given))
    discordant = only_given + only_flipped
    p = binomtest(max(only_given, only_flipped), discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    found = {"accuracy_emnist": float(np.mean(as_given)), "accuracy_upright": float(np.mean(flipped)),
             "examples": len(targets), "discordant": discordant, "p_value": float(p)}
    if p >= 1 - CONFIDENCE:
        raise ImportModelError(
            f"cannot tell which way up the model wants its images: on {len(targets)} evaluation images it is "
            f"{found['accuracy_emnist']:.1%} accurate in EMNIST orientation and {found['accuracy_upright']:.1%} "
            f"upright (sign test p = {p:.3g}, needs < {1 - CONFIDENCE:.2g}).",
            hint="Pass --orientation upright or --orientation emnist, or more (or correctly labelled) --eval-data.")
    found["chosen"] = "emnist" if only_given > only_flipped else "upright"
    return found


def batch_check(sess, path: Path, image) -> None:
    """The dynamic batch actually works: three images at once, through the whole graph."""
    try:
        sess.run(None, {INPUT: np.zeros((3, *image.shape), np.float32)})
    except Exception as error:  # ORT names the failing node in its message
        raise ImportModelError(
            f"{path}: the model does not run on a batch of 3 after its batch dimension was made dynamic: "
            f"{str(error).splitlines()[0]}.",
            hint="The node named there fixes the batch size; re-export the model with a dynamic batch.") from error


def import_stage(ctx) -> StageResult:
    import onnx

    from crossport.exact.graph import check_network, exact_from_onnx
    from crossport.files import replace_atomic, sha256_file
    from crossport.interface import to_inputs
    from pipelines.eval_data import load_eval_data, resolve_labels
    from pipelines.stages.context import GOLDEN_SIZE
    from pipelines.stages.data import write_data
    from training.data import data_dir_from
    from translation.onnx_export import check_onnx, onnx_hints, read_onnx
    from translation.onnx_to_tf import refuse_unsupported

    config, run_dir = ctx.config, ctx.run_dir
    given = Path(config.onnx)
    proto = read_onnx(given, ImportModelError, missing="Pass --onnx with the path of an ONNX file.",
                      redo="Pass a complete ONNX file (onnx.checker.check_model should accept it).")
    # The file as given is the lineage root: kept beside the run, hash-recorded, never changed.
    source = run_dir / SOURCE
    with replace_atomic(source) as partial:
        shutil.copyfile(given, partial)
    data = source.read_bytes()
    metadata = {prop.key: prop.value for prop in proto.metadata_props}

    first = normalized(data, "emnist")
    image = first.image  # what the published input is: 28×28 grayscale [N, 784], or [N, H, W, C]
    classes = int(session(first.model).run([SCORES], {INPUT: np.zeros((1, *image.shape), np.float32)})[0].shape[1])
    labels, labels_from = resolve_labels(metadata, config.labels_file, classes, config.eval_data)
    if not image.flat and config.orientation != "auto":
        raise ImportModelError(f"--orientation {config.orientation} applies to 28x28 grayscale models; this model "
                               f"takes {image.describe()} images, published upright.", hint="Drop --orientation.")
    dataset = load_eval_data(config.eval_data, labels=labels, data_dir=data_dir_from(config.data_dir),
                             seed=config.seed, orientation=config.eval_orientation, image=image)
    from export.tflite import MIN_CALIBRATION

    if len(dataset.x_train) < MIN_CALIBRATION:  # before translation, not after it
        raise DataError(f"the evaluation data {dataset.name} holds {len(dataset.x_train)} calibration images; full "
                        f"int8 calibration needs at least {MIN_CALIBRATION}.",
                        hint="Pass --eval-data with more images (an .npz may add 'x_train' for calibration).")
    detected = None
    orientation = config.orientation
    scaling = None if config.mean is None else (config.mean, config.std)
    if not image.flat:
        orientation = "upright"  # [N, H, W, C] images are published as people see them
    elif orientation == "auto":
        detected = detect_orientation(data, dataset.x_test, dataset.y_test, scaling)
        orientation = detected["chosen"]
        log.info("orientation: %s (accuracy %.1f%% in EMNIST orientation, %.1f%% upright, p = %.2g)", orientation,
                 100 * detected["accuracy_emnist"], 100 * detected["accuracy_upright"], detected["p_value"])
    result = normalized(data, orientation, scaling)
    path = run_dir / "model.onnx"
    with replace_atomic(path) as partial:
        onnx.save(result.model, str(partial))
    check_onnx(path, **onnx_hints(given))  # the same contract and onnx.checker as crossport's own export
    refuse_unsupported(result.model, given)  # one line naming the node, before translate would fail on it
    batch_check(session(result.model), given, image)
    for step in result.steps:
        log.info("import: %s", step)

    made = write_data(ctx, dataset)
    golden = to_inputs(dataset.x_test[:GOLDEN_SIZE])
    exact = exact_from_onnx(path, golden)
    network_ratio = check_network(result.model, golden, exact)  # the network read the graph as onnx.reference does
    exact_path = run_dir / "golden_exact.npz"
    with replace_atomic(exact_path) as partial:
        exact.save(partial)

    ctx.manifest.facts["source"] = {
        "path": str(given.resolve()), "sha256": sha256_file(source), "bytes": source.stat().st_size,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(), "opset": result.source_opset,
        "ir_version": result.source_ir_version, "input_shape": [d if isinstance(d, int) else None
                                                               for d in result.input_shape],
        "metadata": metadata, "normalization": result.steps, "logits": result.logits,
        "labels_from": labels_from, "orientation": orientation, "image": image.to_json(),
        "layout": result.layout, "scaling": result.scaling, "model_input": result.model_input,
        "orientation_detected": detected, "network_check_ratio": network_ratio,
    }
    ctx.manifest.facts["model"] = {"arch": "onnx", "summary": _summary(result.model),
                                   "parameters": int(sum(np.prod(i.dims) for i in result.model.graph.initializer)),
                                   "macs_per_example": _macs(path)}
    if result.logits != "output":
        log.info("logits: %s", "exposed from the model's Softmax input" if result.logits == "exposed"
                 else "the model's own output; scores computed by a Softmax crossport added")
    made.made = [Made("source_onnx", source), *made.made, Made("onnx", path, ("source_onnx",)),
                 Made("golden_exact", exact_path, ("onnx", "golden"))]
    made.params.update({"source_sha256": ctx.manifest.facts["source"]["sha256"], "source_opset": result.source_opset,
                        "orientation": orientation, "labels_from": labels_from,
                        "normalization_steps": len(result.steps)})
    made.metrics.update({"onnx_bytes": path.stat().st_size})
    made.log_artifacts.append(source)
    made.models = [ModelToLog("onnx", path, golden[:4])]
    return made


def _summary(model) -> str:
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return "imported ONNX: " + ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.items())


def _macs(path: Path) -> int | None:
    import onnx

    from crossport.exact.graph import network_from_onnx
    from training.model import macs_per_example

    return macs_per_example(network_from_onnx(onnx.load(str(path), load_external_data=False)))

