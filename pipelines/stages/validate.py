"""The validate stage: every runtime on the test split, every hop and every artifact against the exact values,
the report (``parity.json``) and its plots; on a failure, where the drift starts."""

from __future__ import annotations

import logging

import numpy as np

from crossport.errors import ParityError
from crossport.formats import FORMATS
from crossport.interface import CLASSES, CLASSIFY_KEY
from crossport.parity import HopResult, compare, compare_exact, raise_on_failure
from pipelines.gate import ONNX, POLICIES, REFERENCE, SM_CLASSIFY, TF_GRAPH, hop_specs, tolerance_table
from pipelines.results import Made, StageResult
from pipelines.stages.context import Context, load_arrays, locate_divergence, read_labels, scores_and_logits

log = logging.getLogger(__name__)

DIAGNOSE_EXAMPLES = 512  # test images the divergence finder runs on
# The error model, written once (docs/parity.md, "The error model"); parity.json names it and its version and
# records the figures it gave this run. A change to the model's rules is a new version.
ERROR_MODEL = {"name": "crossport float32 running error bound", "version": 1,
               "document": "docs/parity.md#the-error-model"}
VALIDATED = ("checkpoint", *(fmt.name for fmt in FORMATS))
PLOTS = ("parity_errors.png", "confusion_matrix.png")


def validate_stage(ctx: Context) -> StageResult:
    """Run every runtime on the test split, judge every hop and artifact, write the report and its plots."""
    from crossport.files import write_json_atomic
    from crossport.interface import to_inputs

    paths = {name: ctx.input(name) for name in VALIDATED if name in ctx.inputs}
    # The original: the PyTorch checkpoint when the model was trained here; the ONNX graph itself when it was
    # brought as an ONNX file (its exact values then come from the graph, crossport/exact/graph.py).
    reference = REFERENCE if "checkpoint" in paths else ONNX
    arrays = load_arrays(ctx)
    labels = read_labels(ctx)
    images, targets = to_inputs(arrays["x_test"]), arrays["y_test"]
    exact = exact_values(paths, reference, images)
    outputs = run_runtimes(ctx, paths, reference, images)
    results, against_exact = judge(outputs, reference, targets, exact, labels)
    divergence = None
    if any(not r.passed and r.candidate != ONNX and POLICIES[r.candidate].fp32 for r in results):
        divergence = locate_divergence(paths["onnx"], ctx.input("tf_graph"), _diagnose_batch(images, results),
                                       exact.network_gamma).to_dict()
    report = parity_report(ctx, paths, reference, exact, results, against_exact, divergence, len(images))
    path = ctx.run_dir / "parity.json"
    write_json_atomic(path, report)
    plot(ctx.run_dir, outputs, reference, exact, labels, targets)

    made = [Made("parity", path, tuple(paths)),
            *(Made(plot.removesuffix(".png"), ctx.run_dir / plot, tuple(paths)) for plot in PLOTS)]
    reference_scores = outputs[reference]["scores"]
    ctx.manifest.facts["parity_verdict"] = report["verdict"]
    ctx.manifest.facts["accuracy"] = {r.candidate: r.candidate_accuracy for r in results if r.reference == reference}
    ctx.manifest.facts["accuracy"][reference] = float(np.mean(np.argmax(reference_scores, axis=1) == targets))
    undecided = report["undecided"]
    if undecided:
        log.warning("undecided on %d test examples (too few to tell): %s; --undecided %s %s them",
                    len(images), ", ".join(undecided), ctx.config.undecided,
                    "publishes (marked unverified)" if ctx.config.undecided == "publish" else "leaves out")
    try:
        raise_on_failure([*results, *against_exact], detail=report["detail"])
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


def exact_values(paths: dict, reference: str, images: np.ndarray):
    """The exact float64 values and float32 bounds of the original: the checkpoint, or the ONNX graph brought."""
    from crossport.exact import exact_outputs
    from crossport.exact.graph import exact_from_onnx
    from training.checkpoint import load_checkpoint

    if reference == REFERENCE:
        return exact_outputs(load_checkpoint(paths["checkpoint"]).model, images)
    return exact_from_onnx(paths["onnx"], images)


def run_runtimes(ctx: Context, paths: dict, reference: str, images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Every runtime's outputs on ``images``, each artifact loaded from the run directory's copy of it."""
    from crossport.console import progress
    from crossport.runtimes import load_format, load_saved_model
    from training.checkpoint import load_torch

    threads = ctx.config.threads
    runs = {
        **({REFERENCE: lambda: load_torch(paths["checkpoint"], threads)(images)} if reference == REFERENCE else {}),
        TF_GRAPH: lambda: scores_and_logits(load_saved_model(ctx.input("tf_graph"), threads=threads)(images)),
        SM_CLASSIFY: lambda: load_saved_model(paths["saved_model"], CLASSIFY_KEY, threads)(images),
        **{fmt.runtime: lambda fmt=fmt: load_format(fmt, paths[fmt.name], threads)(images) for fmt in FORMATS},
    }
    outputs = {}
    with progress(total=len(runs), desc=f"validate on {len(images):,} test images", unit="runtime") as bar:
        for name, run in runs.items():
            bar.set_postfix_str(name)
            outputs[name] = run()
            bar.update()
    return outputs


def judge(outputs: dict, reference: str, targets: np.ndarray, exact, labels: tuple[str, ...]) -> tuple[list, list]:
    """Every hop of the chain (pipelines.gate.hop_specs), and every artifact against the exact values."""
    results = [compare(spec, outputs[spec.reference], outputs[spec.candidate], targets, exact.bounds)
               for spec in hop_specs(reference)]
    _check_classes(results, outputs[SM_CLASSIFY][CLASSES], labels)
    against_exact = [
        compare_exact(name, outputs[name], exact.values, exact.bounds, outputs[reference],
                      exact.noise_factor if name == reference or POLICIES[name].fp32 else None)
        for name in (reference, *(name for name in POLICIES if name != reference))
    ]
    return results, against_exact


def parity_report(ctx: Context, paths: dict, reference: str, exact, results: list, against_exact: list,
                  divergence: dict | None, examples: int) -> dict:
    """``parity.json``: the verdict, every check, the error model by name with this run's figures, the lineage."""
    from crossport.exact import EXP_ULPS, FALSE_ALARM, U32

    passed = all(check.passed for check in (*results, *against_exact))
    return {
        "verdict": "pass" if passed else "fail",
        "examples": examples,
        "reference": reference,
        # a model brought without logits has them exposed from its Softmax's input (or computed): said here
        "logits": (ctx.manifest.facts.get("source") or {}).get("logits", "output"),
        "dataset_digest": ctx.manifest.facts.get("dataset", {}).get("digest"),
        # everything validate blessed, the labels (the classify signature's classes) included
        "artifacts": {name: ctx.manifest.artifacts[name].sha256 for name in (*paths, "labels")},
        "error_model": {**ERROR_MODEL, "unit_roundoff": U32, "false_alarm": FALSE_ALARM,
                        "exp_ulps": EXP_ULPS, "lambda": exact.lam, "fan_ins": list(exact.fan_ins),
                        "network_gamma": exact.network_gamma, "noise_factor": exact.noise_factor,
                        "bound_median": {k: float(np.median(v)) for k, v in exact.bounds.items()},
                        "bound_max": {k: float(np.max(v)) for k, v in exact.bounds.items()}},
        "tolerances": tolerance_table(),
        "hops": [result.to_dict() for result in results],
        "against_exact": [check.to_dict() for check in against_exact],
        "undecided": sorted({r.candidate for r in results if r.undecided and r.passed}),
        "divergence": divergence,
        "detail": divergence_detail(results, against_exact, divergence),
    }


def plot(run_dir, outputs: dict, reference: str, exact, labels: tuple[str, ...], targets: np.ndarray) -> None:
    """The error distributions against the reference and the reference's confusion matrix (PLOTS)."""
    from pipelines.reports import confusion_matrix_png, error_distribution_png

    reference_scores = outputs[reference]["scores"]
    # a candidate with the wrong output shape already failed; it has no per-example error
    candidates = [name for name in outputs
                  if name != reference and outputs[name].get("scores", np.empty(0)).shape == reference_scores.shape]
    error_distribution_png(
        run_dir / PLOTS[0],
        {name: np.max(np.abs(outputs[name]["scores"] - reference_scores), axis=1) for name in candidates},
        # the fp32 rows' bound is per element; the plot marks the median allowed |Δ| (2·B)
        {name: float(np.median(2 * exact.bounds["scores"])) if POLICIES[name].fp32 else None for name in candidates},
        reference,
    )
    confusion_matrix_png(run_dir / PLOTS[1], labels, targets, np.argmax(reference_scores, axis=1),
                         "PyTorch reference" if reference == REFERENCE else "ONNX Runtime reference (imported model)")


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
