"""The stage table. Each stage is a plain function of a :class:`Context`.

A stage reads its inputs through the manifest (which checks their hashes), writes its
outputs into the run directory, checks what it wrote by reloading it from disk, and returns
them with their parents (the runner records them in the manifest and holds them to the
stage's declared ``makes``) together with params and metrics for tracking.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from crossport.errors import DataError, ParityError, TrainingError
from crossport.formats import FORMATS, TFLITE_FORMATS
from crossport.interface import ASSETS_EXTRA, CLASSES, CLASSIFY_KEY, INPUT, LOGITS, PREDICT_KEY, SCORES
from crossport.parity import HopResult, LossyPolicy, compare, compare_exact, raise_on_failure
from pipelines.config import (
    ONNX,
    POLICIES,
    REFERENCE,
    SM_CLASSIFY,
    SM_PREDICT,
    TF_GRAPH,
    PipelineConfig,
    hop_spec,
    hop_specs,
    tolerance_table,
)
from pipelines.importing import import_stage
from pipelines.manifest import Manifest
from pipelines.results import DatasetToLog, Made, ModelToLog, StageResult

log = logging.getLogger(__name__)

GOLDEN_SIZE = 64
CALIBRATION_SIZE = 500  # full-int8 calibration images drawn from the training split
DIAGNOSE_EXAMPLES = 512  # test images the divergence finder runs on


@dataclass
class Context:
    config: PipelineConfig
    manifest: Manifest
    inputs: dict[str, Path] = field(default_factory=dict)  # the stage's needs, hashes verified
    tracker: object = None  # pipelines.tracking tracker; only the register stage uses it

    def input(self, name: str) -> Path:
        return self.inputs[name]

    @property
    def run_dir(self) -> Path:
        return self.manifest.run_dir


@dataclass(frozen=True)
class Stage:
    """A plain function and its contract: the artifacts it needs and makes, and the config
    fields its outputs depend on (``reads``: a change to one re-runs the stage on resume)."""

    name: str
    needs: tuple[str, ...]
    makes: tuple[str, ...]
    run: Callable[[Context], StageResult]
    reads: tuple[str, ...] = ()
    # For a stage whose result lives outside the run directory: is it still there and current?
    intact: Callable[[Manifest], bool] | None = None
    # The run route (PipelineConfig.route) the stage belongs to; None: every route.
    route: str | None = None

    def needs_on(self, route: str) -> tuple[str, ...]:
        """The needs some stage of ``route`` makes: validate reads the checkpoint only where one is trained."""
        made = {name for stage in STAGES if stage.route in (None, route) for name in stage.makes}
        return tuple(need for need in self.needs if need in made)


# --- helpers ---------------------------------------------------------------------------


def load_arrays(ctx: Context) -> dict[str, np.ndarray]:
    from crossport.files import read_npz

    return read_npz(ctx.input("dataset"), redo="import" if ctx.config.onnx else "data",
                    need=("x_train", "y_train", "x_test", "y_test"))


def read_labels(ctx: Context) -> tuple[str, ...]:
    from crossport.interface import label_problem

    path = ctx.input("labels")
    labels = tuple(path.read_text(encoding="utf-8", errors="replace").splitlines())
    problem = label_problem(labels)
    if problem:
        raise DataError(f"the run's {path} {problem}.",
                        hint=f"Re-run the {'import' if ctx.config.onnx else 'data'} stage.")
    return labels


def golden_inputs(ctx: Context) -> np.ndarray:
    from crossport.files import read_npz
    from crossport.interface import to_inputs

    return to_inputs(read_npz(ctx.input("golden"), redo="import" if ctx.config.onnx else "data",
                              need=("images",))["images"])


def golden_exact(ctx: Context):
    from crossport.exact import Exact

    return Exact.load(ctx.input("golden_exact"))


# On 64 golden images a lossy variant's agreement rate cannot be measured; a stage's own
# check only proves it loads, keeps the interface and stays finite. validate judges it.
INTERFACE_ONLY = LossyPolicy(max_disagreement=1.0, max_accuracy_drop=None, confidence=0.5,
                             reason="golden-batch self-check: interface and finiteness only")


def self_check(reference: str, candidate: str, ref_out: dict, cand_out: dict, exact, *, diagnose=None) -> None:
    """A stage's check of the file it just wrote, on the golden batch, with the golden batch's exact bounds.

    ``diagnose``, when given, is called on failure and its text added to the error (the
    divergence finder, for the TensorFlow graph).
    """
    spec = hop_spec(reference, candidate)
    if spec.lossy is not None:
        spec = replace(spec, lossy=INTERFACE_ONLY)
    result = compare(spec, ref_out, cand_out, bounds=exact.bounds)
    raise_on_failure([result], detail=diagnose() if diagnose and not result.passed else None)


def locate_divergence(onnx_path: Path, tf_graph: Path, images: np.ndarray, network_gamma: float):
    """Run the divergence finder (ONNX Runtime vs the TF translation, node by node)."""
    from translation.divergence import find_divergence
    from translation.onnx_export import read_onnx

    proto = read_onnx(onnx_path, missing="Run the export or import stage first.", redo="Re-run the stage that made it.")
    return find_divergence(proto, tf_graph, {INPUT: images}, network_gamma)


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


# --- stages ----------------------------------------------------------------------------


def write_data(ctx: Context, dataset) -> StageResult:
    """A dataset's files in the run directory: arrays, labels, the golden batch, the calibration images."""
    config = ctx.config
    run_dir = ctx.run_dir
    save_npz_atomic(run_dir / "data.npz", x_train=dataset.x_train, y_train=dataset.y_train,
                    x_test=dataset.x_test, y_test=dataset.y_test)
    (run_dir / "labels.txt").write_text("\n".join(dataset.labels) + "\n")
    save_npz_atomic(run_dir / "golden.npz", images=dataset.x_test[:GOLDEN_SIZE], labels=dataset.y_test[:GOLDEN_SIZE])
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(dataset.x_train), size=min(CALIBRATION_SIZE, len(dataset.x_train)), replace=False)
    save_npz_atomic(run_dir / "calibration.npz", images=dataset.x_train[np.sort(pick)])
    digest = dataset.digest
    ctx.manifest.facts["dataset"] = {
        "name": dataset.name, "source": dataset.source, "digest": digest,
        "num_classes": len(dataset.labels), "train_examples": len(dataset.y_train),
        "test_examples": len(dataset.y_test),
    }
    log.info("dataset %s: %d train, %d test, %d classes, digest %s", dataset.name, len(dataset.y_train),
             len(dataset.y_test), len(dataset.labels), digest[:12])
    return StageResult(
        made=[Made("dataset", run_dir / "data.npz"), Made("labels", run_dir / "labels.txt", ("dataset",)),
              Made("golden", run_dir / "golden.npz", ("dataset",)),
              Made("calibration", run_dir / "calibration.npz", ("dataset",))],
        params={"dataset": dataset.name, "dataset_digest": digest, "dataset_source": dataset.source},
        metrics={"train_examples": len(dataset.y_train), "test_examples": len(dataset.y_test),
                 "num_classes": len(dataset.labels)},
        log_artifacts=[run_dir / "labels.txt"],
        dataset=DatasetToLog(dataset.name, digest, dataset.source, run_dir / "data.npz",
                             dataset.x_test, dataset.y_test),
    )


def data_stage(ctx: Context) -> StageResult:
    from training.data import data_dir_from, load_dataset

    config = ctx.config
    return write_data(ctx, load_dataset(config.dataset, data_dir_from(config.data_dir), seed=config.seed))


def training_configs(config, num_classes: int):
    """The model and training-loop configs a run's settings give (the train stage and every node of a
    distributed run build them the same way)."""
    from training.model import ModelConfig
    from training.train import TrainConfig

    return (ModelConfig(arch=config.model, num_classes=num_classes),
            TrainConfig(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                        seed=config.seed, patience=config.patience))


def launch_of(config):
    """This machine's share of a distributed run (training.launch.Launch)."""
    from training.launch import Launch

    return Launch(config.nproc, config.nnodes, config.node_rank, config.rdzv_endpoint)


def train_stage(ctx: Context) -> StageResult:
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.model import ARCHITECTURES, macs_per_example
    from training.train import evaluate, split_validation, train

    arrays = load_arrays(ctx)
    labels = read_labels(ctx)
    config = ctx.config
    model_config, train_config = training_configs(config, len(labels))
    path = ctx.run_dir / "model.pt"
    if config.nproc * config.nnodes == 1:
        x_fit, y_fit, x_val, y_val = split_validation(arrays["x_train"], arrays["y_train"], config.seed)
        model, metrics = train(x_fit, y_fit, x_val, y_val, model_config, train_config)
        refuse_diverged(metrics, train_config)
        metrics["test_accuracy"] = evaluate(model, arrays["x_test"], arrays["y_test"])  # once, at the end
        save_checkpoint(path, model, labels, ctx.manifest.artifacts["dataset"].sha256, metrics, train_config)
    else:
        metrics = train_distributed(ctx, model_config, train_config, path)
    reloaded = load_checkpoint(path)
    model = reloaded.model
    accuracy = evaluate(reloaded.model, arrays["x_test"], arrays["y_test"])
    ctx.manifest.facts["test_accuracy"] = accuracy
    ctx.manifest.facts["model"] = {"arch": model_config.arch, "summary": ARCHITECTURES[model_config.arch].summary,
                                   "parameters": sum(p.numel() for p in model.parameters()),
                                   "macs_per_example": macs_per_example(model)}
    from pipelines.reports import training_curves_png

    curves = ctx.run_dir / "training_curves.png"
    training_curves_png(curves, metrics["history"])
    history = {f"epoch_{row['epoch']}_val_accuracy": row["val_accuracy"] for row in metrics["history"]}
    ctx.manifest.facts["best_epoch"] = metrics.get("best_epoch")
    return StageResult(
        made=[Made("checkpoint", path, ("dataset", "labels"))],
        params={"epochs": config.epochs, "patience": config.patience, "batch_size": config.batch_size,
                "learning_rate": config.learning_rate, "seed": config.seed, "model": config.model,
                "dropout": model_config.dropout,
                "world_size": config.nproc * config.nnodes,
                **({"hidden_sizes": str(model_config.hidden_sizes)} if config.model == "mlp" else
                   {"channels": str(model_config.channels)}),
                "macs_per_example": macs_per_example(model)},
        metrics={"test_accuracy": accuracy, "train_loss": metrics["train_loss"],
                 "val_accuracy": metrics["val_accuracy"], "best_epoch": metrics["best_epoch"], **history},
        log_artifacts=[path, curves],
        models=[ModelToLog("pytorch", path, golden_inputs(ctx)[:4])],
    )


def refuse_diverged(metrics: dict, train_config) -> None:
    """Stop at train, before a checkpoint is kept, when the model kept is a diverged one."""
    from training.train import divergence

    reason = divergence(metrics, train_config.learning_rate)
    if reason is not None:
        raise TrainingError(reason)


def train_distributed(ctx: Context, model_config, train_config, path: Path) -> dict:
    """The train stage across processes: torchrun starts training.distributed per rank; rank 0's checkpoint
    becomes the run's model.pt. Its output (``ddp/``) and every rank's log (``torchrun/``) are the stage's own."""
    import shlex
    import shutil

    from training.launch import launch_command, run_distributed

    config = ctx.config
    launch = launch_of(config)
    out, log_dir = ctx.run_dir / "ddp", ctx.run_dir / "torchrun"
    for own in (out, log_dir):  # written by this stage only: a re-run starts clean
        shutil.rmtree(own, ignore_errors=True)
    command = launch_command(launch, data=ctx.input("dataset"), labels=ctx.input("labels"), out=out,
                             log_dir=log_dir, model_config=model_config, train_config=train_config,
                             dataset_sha256=ctx.manifest.artifacts["dataset"].sha256, threads=config.threads)
    log.info("training on %d processes (%d per node, %d node%s): %s", launch.world_size, launch.nproc,
             launch.nnodes, "s" if launch.nnodes > 1 else "", shlex.join(command))
    if launch.nnodes > 1:
        log.info("on node R of the others, with this run directory shared or copied: python -m pipelines.run "
                 "--stage train --run-dir %s --nproc %d --nnodes %d --node-rank R --rdzv-endpoint %s", ctx.run_dir,
                 launch.nproc, launch.nnodes, launch.rdzv_endpoint)
    metrics = run_distributed(command, log_dir=log_dir, out=out, world_size=launch.world_size)
    refuse_diverged(metrics, train_config)
    os.replace(out / "model.pt", path)
    return metrics


def export_stage(ctx: Context) -> StageResult:
    from crossport.exact import Exact, exact_outputs
    from crossport.runtimes import load_onnx
    from training.checkpoint import load_checkpoint, load_torch
    from translation.onnx_export import export_onnx

    checkpoint_path = ctx.input("checkpoint")
    checkpoint = load_checkpoint(checkpoint_path)
    golden = golden_inputs(ctx)
    # The golden batch's exact values and float32 error bounds: what every later stage's own
    # check compares against (those stages run TensorFlow and never load PyTorch).
    exact_path = ctx.run_dir / "golden_exact.npz"
    partial = exact_path.with_name("golden_exact.partial.npz")
    exact_outputs(checkpoint.model, golden).save(partial)
    os.replace(partial, exact_path)
    path = ctx.run_dir / "model.onnx"
    export_onnx(checkpoint.model, checkpoint.labels, ctx.manifest.artifacts["checkpoint"].sha256, path)
    threads = ctx.config.threads
    self_check(REFERENCE, ONNX, load_torch(checkpoint_path, threads)(golden), load_onnx(path, threads)(golden),
               Exact.load(exact_path))
    return StageResult(made=[Made("golden_exact", exact_path, ("checkpoint", "golden")),
                             Made("onnx", path, ("checkpoint",))],
                       metrics={"onnx_bytes": path.stat().st_size}, models=[ModelToLog("onnx", path, golden[:4])])


def translate_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import load_onnx, load_saved_model
    from translation.onnx_export import check_onnx, onnx_hints
    from translation.onnx_to_tf import translate

    onnx_path = ctx.input("onnx")
    check_onnx(onnx_path, **onnx_hints(ctx.config.onnx))  # one clear line, not a parser traceback
    out = ctx.run_dir / "tf_graph"
    translate(onnx_path, out)
    golden, exact, threads = golden_inputs(ctx), golden_exact(ctx), ctx.config.threads
    self_check(ONNX, TF_GRAPH, load_onnx(onnx_path, threads)(golden),
               _scores_and_logits(load_saved_model(out, threads=threads)(golden)), exact,
               diagnose=lambda: locate_divergence(onnx_path, out, golden, exact.network_gamma).describe())
    return StageResult(made=[Made("tf_graph", out, ("onnx",))])


def package_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import load_onnx, load_saved_model
    from export.servable import build_saved_model
    from export.warmup import write_warmup

    tf_graph = ctx.input("tf_graph")
    onnx_path = ctx.input("onnx")
    labels = read_labels(ctx)
    out = ctx.run_dir / "saved_model"
    build_saved_model(tf_graph, labels, out)
    golden, exact, threads = golden_inputs(ctx), golden_exact(ctx), ctx.config.threads
    reference = load_onnx(onnx_path, threads)(golden)
    diagnose = lambda: locate_divergence(onnx_path, tf_graph, golden, exact.network_gamma).describe()  # noqa: E731
    for signature, name in ((PREDICT_KEY, SM_PREDICT), (CLASSIFY_KEY, SM_CLASSIFY)):
        self_check(ONNX, name, reference, load_saved_model(out, signature, threads)(golden), exact, diagnose=diagnose)
    warmup = ctx.run_dir / "tf_serving_warmup_requests"
    records = write_warmup(warmup, ctx.config.name, golden)
    return StageResult(made=[Made("saved_model", out, ("tf_graph", "labels")), Made("warmup", warmup, ("golden",))],
                       metrics={"warmup_records": records},
                       models=[ModelToLog("tensorflow", out, golden[:4])])


def tflite_stage(ctx: Context) -> StageResult:
    from crossport.formats import TFLITE_FORMATS
    from crossport.interface import to_inputs
    from crossport.runtimes import load_saved_model, load_tflite
    from export.layout import placement, saved_model_ops, tflite_ops
    from export.tflite import convert_tflite

    saved_model = ctx.input("saved_model")
    from crossport.files import read_npz

    calibration = to_inputs(read_npz(ctx.input("calibration"), redo="import" if ctx.config.onnx else "data",
                                     need=("images",))["images"])
    golden, exact, threads = golden_inputs(ctx), golden_exact(ctx), ctx.config.threads
    reference = load_saved_model(saved_model, threads=threads)(golden)
    metrics, layout = {}, {}
    paths = []
    made = []
    for fmt in TFLITE_FORMATS:
        path = ctx.run_dir / Path(fmt.path).name
        convert_tflite(saved_model, path, fmt.variant, calibration=calibration)
        self_check(SM_PREDICT, fmt.runtime, reference, load_tflite(path, threads)(golden), exact)
        made.append(Made(fmt.name, path, ("saved_model", "calibration") if fmt.calibrated else ("saved_model",)))
        metrics[f"{fmt.name}_bytes"] = path.stat().st_size
        layout[fmt.name] = placement(tflite_ops(path))
        paths.append(path)
    layout["saved_model"] = placement(saved_model_ops(saved_model))
    for name, counts in layout.items():
        metrics[f"{name}_transposes"] = counts["transposes"]
        metrics[f"{name}_transposes_between_convs"] = counts["between_convs"]
    ctx.manifest.facts["layout"] = layout  # the card reports it
    return StageResult(made=made, params={"calibration_images": len(calibration)}, metrics=metrics,
                       log_artifacts=paths)


ERROR_MODEL = ("B per output element, from a float64 pass of the PyTorch network: each layer y = W·x + b of fan-in n "
               "passes on |W|·e_in and adds γ̃(n+1)·(|W|·|x| + |b|), γ̃(n) = expm1(λ√n·u + n·u²/(1−u)) "
               "(Higham & Mary 2019); ReLU/max-pool pass e_in; softmax |Δp_i| ≤ p_i(e_i + Σp_j e_j) + "
               "p_i·u(|t_i| + Σp_j|t_j| + C + 8) + u²; fp32 hops allow 2·B, artifacts against exact values B")
VALIDATED = ("checkpoint", *(fmt.name for fmt in FORMATS))
PLOTS = ("parity_errors.png", "confusion_matrix.png")


def validate_stage(ctx: Context) -> StageResult:
    from crossport.console import progress
    from crossport.exact import EXP_ULPS, FALSE_ALARM, U32, exact_outputs
    from crossport.exact_onnx import exact_from_onnx
    from crossport.files import write_json_atomic
    from crossport.interface import to_inputs
    from crossport.runtimes import load_format, load_saved_model
    from pipelines.reports import confusion_matrix_png, error_distribution_png
    from training.checkpoint import load_checkpoint, load_torch

    paths = {name: ctx.input(name) for name in VALIDATED if name in ctx.inputs}
    # The original: the PyTorch checkpoint when the model was trained here; the ONNX graph itself when it was
    # brought as an ONNX file (its exact values then come from the graph, crossport/exact_onnx.py).
    reference = REFERENCE if "checkpoint" in paths else ONNX
    arrays = load_arrays(ctx)
    labels = read_labels(ctx)
    images, targets = to_inputs(arrays["x_test"]), arrays["y_test"]
    threads = ctx.config.threads
    exact = (exact_outputs(load_checkpoint(paths["checkpoint"]).model, images) if reference == REFERENCE
             else exact_from_onnx(paths["onnx"], images))
    runs = {
        **({REFERENCE: lambda: load_torch(paths["checkpoint"], threads)(images)} if reference == REFERENCE else {}),
        TF_GRAPH: lambda: _scores_and_logits(load_saved_model(ctx.input("tf_graph"), threads=threads)(images)),
        SM_CLASSIFY: lambda: load_saved_model(paths["saved_model"], CLASSIFY_KEY, threads)(images),
        # every published format, from the run directory's copy of it
        **{fmt.runtime: lambda fmt=fmt: load_format(fmt, paths[fmt.name], threads)(images) for fmt in FORMATS},
    }
    outputs = {}
    with progress(total=len(runs), desc=f"validate on {len(images):,} test images", unit="runtime") as bar:
        for name, run in runs.items():
            bar.set_postfix_str(name)
            outputs[name] = run()
            bar.update()
    results = [compare(spec, outputs[spec.reference], outputs[spec.candidate], targets, exact.bounds)
               for spec in hop_specs(reference)]
    _check_classes(results, outputs[SM_CLASSIFY][CLASSES], labels)
    against_exact = [
        compare_exact(name, outputs[name], exact.values, exact.bounds, outputs[reference],
                      exact.noise_factor if name == reference or POLICIES[name].fp32 else None)
        for name in (reference, *(name for name in POLICIES if name != reference))
    ]

    divergence = None
    if any(not r.passed and r.candidate != ONNX and POLICIES[r.candidate].fp32 for r in results):
        divergence = locate_divergence(paths["onnx"], ctx.input("tf_graph"), _diagnose_batch(images, results),
                                       exact.network_gamma).to_dict()
    detail = divergence_detail(results, against_exact, divergence)
    passed = all(check.passed for check in (*results, *against_exact))
    undecided = sorted({r.candidate for r in results if r.undecided and r.passed})
    report = {
        "verdict": "pass" if passed else "fail",
        "examples": len(images),
        "reference": reference,
        # a model brought without logits has them exposed from its Softmax's input (or computed): said here
        "logits": (ctx.manifest.facts.get("source") or {}).get("logits", "output"),
        "dataset_digest": ctx.manifest.facts.get("dataset", {}).get("digest"),
        # everything validate blessed, the labels (the classify signature's classes) included
        "artifacts": {name: ctx.manifest.artifacts[name].sha256 for name in (*paths, "labels")},
        "error_model": {"bound": ERROR_MODEL, "unit_roundoff": U32, "false_alarm": FALSE_ALARM,
                        "exp_ulps": EXP_ULPS, "lambda": exact.lam, "fan_ins": list(exact.fan_ins),
                        "network_gamma": exact.network_gamma, "noise_factor": exact.noise_factor,
                        "bound_median": {k: float(np.median(v)) for k, v in exact.bounds.items()},
                        "bound_max": {k: float(np.max(v)) for k, v in exact.bounds.items()}},
        "tolerances": tolerance_table(),
        "hops": [result.to_dict() for result in results],
        "against_exact": [check.to_dict() for check in against_exact],
        "undecided": undecided,
        "divergence": divergence,
        "detail": detail,
    }
    path = ctx.run_dir / "parity.json"
    write_json_atomic(path, report)

    reference_scores = outputs[reference]["scores"]
    # a candidate with the wrong output shape already failed; it has no per-example error
    candidates = [name for name in outputs
                  if name != reference and outputs[name].get("scores", np.empty(0)).shape == reference_scores.shape]
    error_distribution_png(
        ctx.run_dir / PLOTS[0],
        {name: np.max(np.abs(outputs[name]["scores"] - reference_scores), axis=1) for name in candidates},
        # the fp32 rows' bound is per element; the plot marks the median allowed |Δ| (2·B)
        {name: float(np.median(2 * exact.bounds["scores"])) if POLICIES[name].fp32 else None for name in candidates},
        reference,
    )
    confusion_matrix_png(ctx.run_dir / PLOTS[1], labels, targets, np.argmax(reference_scores, axis=1),
                         "PyTorch reference" if reference == REFERENCE else "ONNX Runtime reference (imported model)")
    made = [Made("parity", path, tuple(paths)),
            *(Made(plot.removesuffix(".png"), ctx.run_dir / plot, tuple(paths)) for plot in PLOTS)]
    ctx.manifest.facts["parity_verdict"] = report["verdict"]
    ctx.manifest.facts["accuracy"] = {r.candidate: r.candidate_accuracy for r in results if r.reference == reference}
    ctx.manifest.facts["accuracy"][reference] = float(np.mean(np.argmax(reference_scores, axis=1) == targets))
    if undecided:
        log.warning("undecided on %d test examples (too few to tell): %s; --undecided %s %s them",
                    len(images), ", ".join(undecided), ctx.config.undecided,
                    "publishes (marked unverified)" if ctx.config.undecided == "publish" else "leaves out")
    try:
        raise_on_failure([*results, *against_exact], detail=detail)
    except ParityError as error:  # the failing report is recorded, so publish can read it and refuse
        return StageResult(made=made, error=error)
    worst = max((o.max_abs for r in results for o in r.outputs if POLICIES[r.candidate].fp32), default=0.0)
    worst_ratio = max((o.worst_ratio for c in against_exact if c.judged for o in c.outputs), default=0.0)
    return StageResult(
        made=made,
        metrics={"parity_fp32_max_abs": worst, "parity_fp32_worst_bound_ratio": worst_ratio,
                 "parity_hops": len(results), "parity_examples": len(images),
                 "parity_undecided_variants": len(undecided),
                 **{f"accuracy_{name.replace(':', '_')}": value
                    for name, value in ctx.manifest.facts["accuracy"].items()}},
        log_artifacts=[path, *(ctx.run_dir / plot for plot in PLOTS)],
    )


def divergence_detail(results: list[HopResult], against_exact: list, divergence: dict | None) -> str | None:
    """Where the drift starts, and what the node-by-node comparison does and does not cover."""
    failing = [r for r in results if not r.passed]
    if not failing and all(check.passed for check in against_exact):
        return None
    if failing:
        first = failing[0]  # hop_specs() lists the hops in conversion order
        lines = [f"first failing hop: {first.hop}"]
        if first.candidate == ONNX and first.reference == REFERENCE:
            lines.append("that is the PyTorch → ONNX export, which the node-by-node comparison (ONNX Runtime vs "
                         "the TensorFlow translation) does not cover; compare model.pt with model.onnx")
    else:
        first_exact = next(check for check in against_exact if not check.passed)
        lines = [f"first failing check: {first_exact.artifact} against the exact float64 values"]
    if divergence is not None:
        lines.append(f"node-by-node, ONNX Runtime vs the TensorFlow translation on {len(divergence['nodes'])} "
                     f"tensors (not covering export, packaging or TFLite conversion): {divergence['summary']}")
    return "; ".join(lines)


def _scores_and_logits(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The translated graph also returns every intermediate tensor; parity needs two."""
    return {name: outputs[name] for name in (SCORES, LOGITS) if name in outputs}


def _check_classes(results: list[HopResult], classes: np.ndarray, labels: tuple[str, ...]) -> None:
    """classify's ``classes`` output must be the label map on every row."""
    expected = np.array([label.encode() for label in labels], dtype=object)
    if classes.shape == (len(classes), len(labels)) and all(np.array_equal(row, expected) for row in classes):
        return
    for result in results:
        if result.candidate == SM_CLASSIFY:
            result.failures.append(f"{result.hop}: output 'classes' rows are not the label map")


def _diagnose_batch(images: np.ndarray, results: list[HopResult]) -> np.ndarray:
    """The first test images plus every failing hop's worst example."""
    worst = {o.worst_example for r in results if not r.passed for o in r.outputs if o.worst_example >= 0}
    index = sorted(set(range(min(DIAGNOSE_EXAMPLES, len(images)))) | worst)
    return images[index]


def publish_stage(ctx: Context) -> StageResult:
    from crossport.errors import ConfigError
    from pipelines.release import publish_run

    packaged = (ctx.manifest.stages.get("package") or {}).get("config", {}).get("name")
    if packaged and packaged != ctx.config.name:  # the warmup records carry the name they were packaged under
        raise ConfigError(f"--name {ctx.config.name} differs from the name this run was packaged as ({packaged}), "
                          "which its warmup records carry.",
                          hint=f"Run --stage all --name {ctx.config.name} (package and the stages after it re-run "
                               "under the new name), or publish as " + packaged + ".")
    version, path = publish_run(ctx)
    return StageResult(params={"published_version": version, "published_path": str(path)},
                       metrics={"published_version": version})


def still_published(manifest: Manifest) -> bool:
    published = manifest.facts.get("published") or {}
    return Path(published.get("path", "")).joinpath("saved_model.pb").is_file()


def registered_as_published(manifest: Manifest) -> bool:
    registry = manifest.facts.get("registry") or {}
    published = manifest.facts.get("published") or {}
    return (registry.get("servable_version"), registry.get("servable_path")) == (
        published.get("version"), published.get("path"))


def headline_metrics(facts: dict, version_dir: Path) -> dict[str, float]:
    """What the pipeline's parent run shows first: test accuracy per runtime, and each published format's size as
    the version's card (servable.json) records it."""
    card = json.loads((version_dir / ASSETS_EXTRA / "servable.json").read_text())
    metrics = {f"accuracy_{name.replace(':', '_')}": value for name, value in (facts.get("accuracy") or {}).items()}
    metrics.update({f"{name}_bytes": info["bytes"] for name, info in card["formats"].items()
                    if info.get("bytes") is not None})
    return metrics


def register_stage(ctx: Context) -> StageResult:
    """Make the published version a registry version (after publish; re-run to repair)."""
    from crossport.errors import PublishError
    from crossport.files import sha256_file

    published = ctx.manifest.facts.get("published")
    if not published:
        raise PublishError("nothing to register: this run has not published a version.",
                           hint="Run --stage publish first.")
    if not ctx.tracker.enabled:
        log.warning("tracking is off (--no-tracking): version %s is not registered in MLflow", published["version"])
        return StageResult()
    path = Path(published["path"])
    report = json.loads(ctx.input("parity").read_text())
    registration = ctx.tracker.register_servable(
        name=ctx.config.name, servable_version=published["version"], path=path,
        saved_model_sha256=sha256_file(path / "saved_model.pb"), verdict=report["verdict"],
        example=golden_inputs(ctx)[:2], source_sha256=(ctx.manifest.facts.get("source") or {}).get("sha256"),
    )
    ctx.tracker.log_headline(headline_metrics(ctx.manifest.facts, path), {"parity_verdict": report["verdict"]},
                             [ctx.input("parity"), *(ctx.run_dir / plot for plot in PLOTS)],
                             model_id=registration.model_id, dataset=ctx.manifest.facts.get("dataset"))
    ctx.manifest.facts["registry"] = {
        "model": registration.model, "version": registration.version, "alias": registration.alias,
        "servable_version": registration.servable_version, "servable_path": str(path),
        "tracking_uri": ctx.tracker.uri,
    }
    ctx.manifest.save()
    log.info("registered %s version %d (servable %d)%s", registration.model, registration.version,
             registration.servable_version, f", alias {registration.alias!r}" if registration.alias else "")
    return StageResult(params={"registered_model": registration.model, "registry_version": registration.version},
                       metrics={"registry_version": registration.version})


STAGES: tuple[Stage, ...] = (
    Stage("data", (), ("dataset", "labels", "golden", "calibration"), data_stage,
          reads=("dataset", "seed", "data_dir"), route="train"),
    Stage("train", ("dataset", "labels", "golden"), ("checkpoint",), train_stage,
          reads=("model", "epochs", "batch_size", "learning_rate", "seed", "patience", "nproc", "nnodes"),
          route="train"),
    Stage("export", ("checkpoint", "golden"), ("onnx", "golden_exact"), export_stage, route="train"),
    # A model brought as an ONNX file (--onnx): its file, labels and evaluation data instead of the three above.
    Stage("import", (), ("source_onnx", "dataset", "labels", "golden", "calibration", "onnx", "golden_exact"),
          import_stage, reads=("onnx", "eval_data", "labels_file", "orientation", "seed", "data_dir"),
          route="import"),
    Stage("translate", ("onnx", "golden", "golden_exact"), ("tf_graph",), translate_stage),
    Stage("package", ("tf_graph", "onnx", "labels", "golden", "golden_exact"), ("saved_model", "warmup"),
          package_stage, reads=("name",)),  # the warmup records name the model
    Stage("tflite", ("saved_model", "golden", "golden_exact", "calibration"), tuple(f.name for f in TFLITE_FORMATS),
          tflite_stage),
    Stage("validate", ("dataset", "labels", "tf_graph", *VALIDATED), ("parity", "parity_errors", "confusion_matrix"),
          validate_stage),
    Stage("publish", ("parity", "parity_errors", "confusion_matrix", *(f.name for f in FORMATS), "labels", "warmup"),
          (), publish_stage, reads=("models_dir", "name", "undecided", "serving_root", "republish"),
          intact=still_published),
    Stage("register", ("parity", "golden"), (), register_stage, reads=("name", "tracking", "tracking_uri"),
          intact=registered_as_published),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def stages_on(route: str) -> tuple[Stage, ...]:
    return tuple(stage for stage in STAGES if stage.route in (None, route))


def stage_by_name(name: str) -> Stage:
    return next(stage for stage in STAGES if stage.name == name)
