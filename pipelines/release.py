"""What goes into a published version, and the gate that lets only blessed runs through."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

from crossport import __version__
from crossport.errors import PublishError
from crossport.files import sha256_path, write_json_atomic
from pipelines.publish import ASSETS_EXTRA, publish_version

# run artifact → file name inside assets.extra/ (the published layout contract)
EXTRA_FILES = {
    "onnx": "model.onnx",
    "tflite_fp32": "model_fp32.tflite",
    "tflite_fp16": "model_fp16.tflite",
    "tflite_int8_dynamic": "model_int8_dynamic.tflite",
    "tflite_int8_full": "model_int8_full.tflite",
    "labels": "labels.txt",
    "parity": "parity.json",
    "parity_errors": "parity_errors.png",
    "confusion_matrix": "confusion_matrix.png",
    "warmup": "tf_serving_warmup_requests",
}


def check_blessed(ctx) -> dict:
    """The parity report, if it passed and validated exactly the artifacts recorded now."""
    parity_path = ctx.input("parity")
    report = json.loads(parity_path.read_text())
    if report.get("verdict") != "pass":
        failing = [hop["hop"] for hop in report.get("hops", []) if hop.get("verdict") != "pass"]
        raise PublishError(f"refusing to publish: parity verdict is {report.get('verdict')!r} "
                           f"(failing hops: {', '.join(failing) or 'none listed'}).",
                           hint="Fix the drift and re-run --stage validate; see parity.json.")
    for name, sha in report.get("artifacts", {}).items():
        current = ctx.manifest.artifacts.get(name)
        if current is None or current.sha256 != sha:
            raise PublishError(f"refusing to publish: artifact {name!r} changed after it was validated.",
                               hint="Re-run --stage validate, then --stage publish.")
    return report


def publish_run(ctx) -> tuple[int, Path]:
    report = check_blessed(ctx)
    manifest = ctx.manifest
    sources = {name: ctx.input(name) for name in ("saved_model", *EXTRA_FILES)}

    def build(staging: Path) -> None:
        shutil.copytree(sources["saved_model"], staging, dirs_exist_ok=True)
        extra = staging / ASSETS_EXTRA
        extra.mkdir()
        for name, filename in EXTRA_FILES.items():
            shutil.copy2(sources[name], extra / filename)

    def finalize(staging: Path, version: int) -> None:
        extra = staging / ASSETS_EXTRA
        write_json_atomic(extra / "manifest.json", version_manifest(ctx, staging, version))
        write_json_atomic(extra / "servable.json", servable_card(ctx, report, version))

    version, path = publish_version(Path(ctx.config.models_dir), ctx.config.name, build, finalize)
    manifest.facts["published"] = {"version": version, "path": str(path)}
    manifest.save()
    return version, path


def version_manifest(ctx, staging: Path, version: int) -> dict:
    """Every file of the version with its sha256, its parent's sha256 and the stage that made it."""
    run = ctx.manifest.artifacts
    entries = [{
        "name": "saved_model", "path": ".", "stage": "package",
        "sha256": sha256_path(staging, exclude=(ASSETS_EXTRA,)),
        "parents": run["saved_model"].parents,
    }]
    for name, filename in EXTRA_FILES.items():
        entries.append({
            "name": name, "path": f"{ASSETS_EXTRA}/{filename}", "stage": run[name].stage,
            "sha256": sha256_path(staging / ASSETS_EXTRA / filename), "parents": run[name].parents,
        })
    return {
        "name": ctx.config.name,
        "version": version,
        "crossport_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(ctx.run_dir.resolve()),
        "dataset": ctx.manifest.facts.get("dataset"),
        "provenance": ctx.manifest.facts.get("provenance"),
        "mlflow": _mlflow_ids(ctx),
        "config": ctx.manifest.config,
        "artifacts": entries,
        "lineage": {name: {"sha256": a.sha256, "stage": a.stage, "parents": a.parents} for name, a in run.items()},
    }


def _mlflow_ids(ctx) -> dict | None:
    """Where this version's runs are tracked; the registry version is added by the register
    stage, which runs after publish (see README: publish, then register)."""
    facts = ctx.manifest.facts.get("mlflow")
    if not facts or not ctx.config.tracking:
        return None
    return {**facts, "registered_model": ctx.config.name}


def servable_card(ctx, report: dict, version: int) -> dict:
    labels = ctx.manifest.path("labels").read_text().splitlines()
    return {
        "name": ctx.config.name,
        "version": version,
        "input": {
            "name": "images", "dtype": "float32", "shape": [None, 784],
            "scaling": "grayscale pixel / 255, in [0, 1]",
            "orientation": "EMNIST: the 28x28 image transposed (row-major pixels of the image's transpose)",
        },
        "outputs": {"scores": {"dtype": "float32", "shape": [None, len(labels)], "meaning": "softmax probabilities"}},
        "signatures": {
            "serving_default": "tensorflow/serving/predict: images -> scores",
            "classify": "tensorflow/serving/classify: inputs (tf.train.Example, feature 'images') -> classes, scores",
        },
        "labels": labels,
        "test_accuracy": ctx.manifest.facts.get("test_accuracy"),
        "dataset": ctx.manifest.facts.get("dataset"),
        "parity_verdict": report["verdict"],
        "accuracy": ctx.manifest.facts.get("accuracy"),
        "formats": {"saved_model": ".", **{name: f"{ASSETS_EXTRA}/{f}" for name, f in EXTRA_FILES.items()
                                          if name == "onnx" or name.startswith("tflite_")}},
    }
