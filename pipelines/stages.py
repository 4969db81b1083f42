"""The stage table. Each stage is a plain function of a :class:`Context`.

A stage reads its inputs through the manifest (which checks their hashes), writes its
outputs into the run directory, checks what it wrote by reloading it from disk, records
the outputs in the manifest and returns params and metrics for tracking.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossport.parity import compare, raise_on_failure
from pipelines.config import (
    ONNX,
    REFERENCE,
    SM_CLASSIFY,
    SM_PREDICT,
    TFLITE_FP32,
    PipelineConfig,
    hop_spec,
    hop_specs,
)
from pipelines.manifest import Manifest

log = logging.getLogger(__name__)

GOLDEN_SIZE = 64


@dataclass
class Context:
    config: PipelineConfig
    manifest: Manifest
    inputs: dict[str, Path] = field(default_factory=dict)  # the stage's needs, hashes verified

    def input(self, name: str) -> Path:
        return self.inputs[name]

    @property
    def run_dir(self) -> Path:
        return self.manifest.run_dir


@dataclass
class StageResult:
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    log_artifacts: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    makes: tuple[str, ...]
    run: Callable[[Context], StageResult]


# --- helpers ---------------------------------------------------------------------------


def load_arrays(ctx: Context) -> dict[str, np.ndarray]:
    with np.load(ctx.input("dataset")) as arrays:
        return {key: arrays[key] for key in arrays.files}


def read_labels(ctx: Context) -> tuple[str, ...]:
    return tuple(ctx.input("labels").read_text().splitlines())


def golden_inputs(ctx: Context) -> np.ndarray:
    from training.train import to_inputs

    with np.load(ctx.input("golden")) as arrays:
        return to_inputs(arrays["images"])


def self_check(reference: str, candidate: str, ref_out: dict, cand_out: dict) -> None:
    """A stage's check of the file it just wrote, on the golden batch."""
    raise_on_failure([compare(hop_spec(reference, candidate), ref_out, cand_out)])


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


# --- stages ----------------------------------------------------------------------------


def data_stage(ctx: Context) -> StageResult:
    from training.data import data_dir_from, load_dataset

    config = ctx.config
    dataset = load_dataset(config.dataset, data_dir_from(config.data_dir), seed=config.seed)
    run_dir = ctx.run_dir
    save_npz_atomic(run_dir / "data.npz", x_train=dataset.x_train, y_train=dataset.y_train,
                    x_test=dataset.x_test, y_test=dataset.y_test)
    (run_dir / "labels.txt").write_text("\n".join(dataset.labels) + "\n")
    save_npz_atomic(run_dir / "golden.npz", images=dataset.x_test[:GOLDEN_SIZE], labels=dataset.y_test[:GOLDEN_SIZE])
    digest = dataset.digest
    ctx.manifest.facts["dataset"] = {
        "name": dataset.name, "source": dataset.source, "digest": digest,
        "num_classes": len(dataset.labels), "train_examples": len(dataset.y_train),
        "test_examples": len(dataset.y_test),
    }
    ctx.manifest.record("dataset", run_dir / "data.npz", "data")
    ctx.manifest.record("labels", run_dir / "labels.txt", "data", parents=("dataset",))
    ctx.manifest.record("golden", run_dir / "golden.npz", "data", parents=("dataset",))
    log.info("dataset %s: %d train, %d test, %d classes, digest %s", dataset.name, len(dataset.y_train),
             len(dataset.y_test), len(dataset.labels), digest[:12])
    return StageResult(
        params={"dataset": dataset.name, "dataset_digest": digest, "dataset_source": dataset.source},
        metrics={"train_examples": len(dataset.y_train), "test_examples": len(dataset.y_test),
                 "num_classes": len(dataset.labels)},
        log_artifacts=[run_dir / "labels.txt"],
    )


def train_stage(ctx: Context) -> StageResult:
    from training.model import ModelConfig
    from training.train import TrainConfig, evaluate, load_checkpoint, save_checkpoint, train

    arrays = load_arrays(ctx)
    labels = read_labels(ctx)
    config = ctx.config
    model_config = ModelConfig(num_classes=len(labels))
    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size,
                               learning_rate=config.learning_rate, seed=config.seed)
    model, metrics = train(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                           model_config, train_config)
    path = ctx.run_dir / "model.pt"
    save_checkpoint(path, model, labels, ctx.manifest.artifacts["dataset"].sha256, metrics, train_config)
    reloaded = load_checkpoint(path)
    accuracy = evaluate(reloaded.model, arrays["x_test"], arrays["y_test"])
    ctx.manifest.facts["test_accuracy"] = accuracy
    ctx.manifest.record("checkpoint", path, "train", parents=("dataset", "labels"))
    history = {f"epoch_{row['epoch']}_test_accuracy": row["test_accuracy"] for row in metrics["history"]}
    return StageResult(
        params={"epochs": config.epochs, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
                "seed": config.seed, "hidden_sizes": str(model_config.hidden_sizes),
                "dropout": model_config.dropout},
        metrics={"test_accuracy": accuracy, "train_loss": metrics["train_loss"], **history},
        log_artifacts=[path],
    )


def export_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import load_onnx, load_torch
    from export.onnx_export import export_onnx
    from training.train import load_checkpoint

    checkpoint_path = ctx.input("checkpoint")
    checkpoint = load_checkpoint(checkpoint_path)
    path = ctx.run_dir / "model.onnx"
    export_onnx(checkpoint.model, checkpoint.labels, ctx.manifest.artifacts["checkpoint"].sha256, path)
    golden = golden_inputs(ctx)
    self_check(REFERENCE, ONNX, load_torch(checkpoint_path)(golden), load_onnx(path)(golden))
    ctx.manifest.record("onnx", path, "export", parents=("checkpoint",))
    return StageResult(metrics={"onnx_bytes": path.stat().st_size}, log_artifacts=[path])


def translate_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import load_onnx, load_saved_model
    from translation.onnx_to_tf import translate

    onnx_path = ctx.input("onnx")
    out = ctx.run_dir / "tf_graph"
    translate(onnx_path, out)
    golden = golden_inputs(ctx)
    self_check(ONNX, SM_PREDICT, load_onnx(onnx_path)(golden), load_saved_model(out)(golden))
    ctx.manifest.record("tf_graph", out, "translate", parents=("onnx",))
    return StageResult()


def package_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import load_onnx, load_saved_model
    from export.warmup import write_warmup
    from translation.servable import build_saved_model

    tf_graph = ctx.input("tf_graph")
    onnx_path = ctx.input("onnx")
    labels = read_labels(ctx)
    out = ctx.run_dir / "saved_model"
    build_saved_model(tf_graph, labels, out)
    golden = golden_inputs(ctx)
    reference = load_onnx(onnx_path)(golden)
    self_check(ONNX, SM_PREDICT, reference, load_saved_model(out, "serving_default")(golden))
    self_check(ONNX, SM_CLASSIFY, reference, load_saved_model(out, "classify")(golden))
    warmup = ctx.run_dir / "tf_serving_warmup_requests"
    records = write_warmup(warmup, ctx.config.name, golden)
    ctx.manifest.record("saved_model", out, "package", parents=("tf_graph", "labels"))
    ctx.manifest.record("warmup", warmup, "package", parents=("golden",))
    return StageResult(metrics={"warmup_records": records}, log_artifacts=[out])


def tflite_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import load_saved_model, load_tflite
    from translation.tflite import convert_tflite

    saved_model = ctx.input("saved_model")
    path = ctx.run_dir / "model_fp32.tflite"
    convert_tflite(saved_model, path, "fp32")
    golden = golden_inputs(ctx)
    self_check(SM_PREDICT, TFLITE_FP32, load_saved_model(saved_model)(golden), load_tflite(path)(golden))
    ctx.manifest.record("tflite_fp32", path, "tflite", parents=("saved_model",))
    return StageResult(metrics={"tflite_fp32_bytes": path.stat().st_size}, log_artifacts=[path])


VALIDATED = ("checkpoint", "onnx", "saved_model", "tflite_fp32")


def validate_stage(ctx: Context) -> StageResult:
    from crossport.files import write_json_atomic
    from crossport.runtimes import load_onnx, load_saved_model, load_tflite, load_torch
    from training.train import to_inputs

    paths = {name: ctx.input(name) for name in VALIDATED}
    arrays = load_arrays(ctx)
    labels = read_labels(ctx)
    images, targets = to_inputs(arrays["x_test"]), arrays["y_test"]
    outputs = {
        REFERENCE: load_torch(paths["checkpoint"])(images),
        ONNX: load_onnx(paths["onnx"])(images),
        SM_PREDICT: load_saved_model(paths["saved_model"], "serving_default")(images),
        SM_CLASSIFY: load_saved_model(paths["saved_model"], "classify")(images),
        TFLITE_FP32: load_tflite(paths["tflite_fp32"])(images),
    }
    results = [compare(spec, outputs[spec.reference], outputs[spec.candidate], targets) for spec in hop_specs()]
    classes = outputs[SM_CLASSIFY]["classes"]
    expected = np.array([label.encode() for label in labels], dtype=object)
    if classes.shape != (len(images), len(labels)) or not all(np.array_equal(row, expected) for row in classes):
        for result in results:
            if result.candidate == SM_CLASSIFY:
                result.failures.append(f"{result.hop}: output 'classes' rows are not the label map {list(labels)[:5]}…")
    passed = all(result.passed for result in results)
    report = {
        "verdict": "pass" if passed else "fail",
        "examples": len(images),
        "dataset_digest": ctx.manifest.facts.get("dataset", {}).get("digest"),
        "artifacts": {name: ctx.manifest.artifacts[name].sha256 for name in VALIDATED},
        "hops": [result.to_dict() for result in results],
    }
    path = ctx.run_dir / "parity.json"
    write_json_atomic(path, report)
    ctx.manifest.record("parity", path, "validate", parents=VALIDATED)
    ctx.manifest.facts["parity_verdict"] = report["verdict"]
    ctx.manifest.facts["parity"] = [
        {"hop": r.hop, "max_abs": max((o.max_abs for o in r.outputs), default=None),
         "top1_agreement": r.top1_agreement, "verdict": "pass" if r.passed else "fail"} for r in results
    ]
    ctx.manifest.save()
    raise_on_failure(results)
    worst = max((o.max_abs for r in results for o in r.outputs), default=0.0)
    return StageResult(metrics={"parity_max_abs": worst, "parity_hops": len(results), "parity_examples": len(images)},
                       log_artifacts=[path])


def publish_stage(ctx: Context) -> StageResult:
    from pipelines.release import publish_run

    version, path = publish_run(ctx)
    return StageResult(params={"published_version": version, "published_path": str(path)},
                       metrics={"published_version": version})


STAGES: tuple[Stage, ...] = (
    Stage("data", (), ("dataset", "labels", "golden"), data_stage),
    Stage("train", ("dataset", "labels"), ("checkpoint",), train_stage),
    Stage("export", ("checkpoint", "golden"), ("onnx",), export_stage),
    Stage("translate", ("onnx", "golden"), ("tf_graph",), translate_stage),
    Stage("package", ("tf_graph", "onnx", "labels", "golden"), ("saved_model", "warmup"), package_stage),
    Stage("tflite", ("saved_model", "golden"), ("tflite_fp32",), tflite_stage),
    Stage("validate", ("dataset", "labels", *VALIDATED), ("parity",), validate_stage),
    Stage("publish", ("parity", "saved_model", "onnx", "tflite_fp32", "labels", "warmup"), (), publish_stage),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def stage_by_name(name: str) -> Stage:
    return next(stage for stage in STAGES if stage.name == name)


def parity_table(report: dict) -> str:
    rows = [f"{'hop':<46} {'scores |Δ|':>10} {'logits |Δ|':>10} {'top-1':>9} {'ties':>5}  verdict"]
    for hop in report["hops"]:
        by_output = {o["name"]: f"{o['max_abs']:.2e}" for o in hop["outputs"]}
        agreement = hop["top1_agreement"]
        agreement = f"{agreement:.4%}" if agreement is not None else "-"
        rows.append(f"{hop['hop']:<46} {by_output.get('scores', '-'):>10} {by_output.get('logits', '-'):>10} "
                    f"{agreement:>9} {hop['near_ties_excluded']:>5}  {hop['verdict']}")
    return "\n".join(rows)


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
