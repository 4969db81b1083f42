"""The validate stage: every runtime on the test split, every hop and every artifact against the exact values,
the report (``parity.json``) and its plots; on a failure, where the drift starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crossport.errors import ParityError
from crossport.formats import BY_RUNTIME, FORMATS
from crossport.interface import CLASSES, CLASSIFY_KEY, LOGITS, SCORES
from crossport.parity import HopResult, compare, compare_exact, raise_on_failure
from pipelines.gate import ONNX, POLICIES, REFERENCE, SM_CLASSIFY, TF_GRAPH, hop_specs, run_policies, tolerance_table
from pipelines.results import Made, StageResult
from pipelines.stages.context import Context, load_arrays, locate_divergence, read_labels
from pipelines.stages.int8 import INT8_FULL, INT8_MIXED, MIXED, answers, diagnose_int8, diagnose_weights, int8_fallback

log = logging.getLogger(__name__)

DIAGNOSE_EXAMPLES = 512  # test images the divergence finder runs on
# The error model, written once (docs/parity.md, "The error model"); parity.json names it and its version and
# records the figures it gave this run. A change to the model's rules is a new version.
ERROR_MODEL = {"name": "crossport float32 error bounds (running, adjoint and sampled) and sign test", "version": 8,
               "document": "docs/parity.md#the-error-model"}
VALIDATED = ("checkpoint", *(fmt.name for fmt in FORMATS if not fmt.optional))  # int8_mixed: made here
PROBE_SIZE = 8192  # test images the sign test runs on (dithered): enough for its power, a bounded cost at any size
DITHER = 2.0**-10  # the probe's dither, as a fraction of the images' range
PLOTS = ("parity_errors.png", "confusion_matrix.png")


def validate_stage(ctx: Context) -> StageResult:
    """Run every runtime on the test split, judge every hop and artifact, write the report and its plots."""
    from crossport.files import write_json_atomic
    from crossport.interface import Inputs, to_inputs
    from export.layout import placement, tflite_ops

    paths = {name: ctx.input(name) for name in VALIDATED if name in ctx.inputs}
    # The original: the PyTorch checkpoint when the model was trained here; the ONNX graph itself when it was
    # brought as an ONNX file (its exact values then come from the graph, crossport/exact/graph.py).
    reference = REFERENCE if "checkpoint" in paths else ONNX
    arrays = load_arrays(ctx, ("x_test", "y_test"))
    labels = read_labels(ctx)
    pixels, targets = arrays["x_test"], arrays["y_test"]
    probe_inputs = dithered(to_inputs(pixels[:PROBE_SIZE]))
    # each runtime loaded once, run on the test split and the probe together, made float32 a chunk at a time from
    # the pixels (116,323 float32 images are 365 MB at EMNIST byclass's full size, their pixels 91 MB)
    inputs = Inputs(pixels, probe_inputs)
    images = inputs[: len(pixels)]
    # the exact values first: the float64 walks are validate's peak, so they run before the runtimes load the
    # SavedModels, which stay loaded until the stage ends (crossport.runtimes.open_saved_model). On the test split,
    # where the bound is the adjoint, each row first gets its lower bound L ≤ B, and B is walked only on the rows
    # where some fp32 error passes L or an answer changes (walked_where_near): every verdict is the one B everywhere
    # gives
    exact = exact_values(paths, reference, images, lower=True).model
    # the bound chosen on the test split's pilot serves the probe's walks too (one pilot a run, not three)
    probe_references = exact_values(paths, reference, probe_inputs, graph=True, bound=exact.bound)
    both = run_runtimes(ctx, paths, reference, inputs)
    outputs, probe_outputs = ({name: {key: rows[part] for key, rows in values.items()} for name, values in both.items()}
                              for part in (slice(None, len(images)), slice(len(images), None)))
    sign_test = SignTest.plan(outputs, reference, exact, probe_inputs)
    exact = walked_where_near(paths, reference, images, exact, {name: outputs[name] for name in sign_test.judged})
    probe = Probe(probe_outputs, probe_references)
    policies = run_policies(ctx.config.int8_max_drop)
    results, against_exact = judge(outputs, reference, targets, exact, labels, sign_test, probe, policies)
    divergence = None
    if any(not r.passed and r.candidate != ONNX and POLICIES[r.candidate].fp32 for r in results):
        divergence = locate_divergence(paths["onnx"], ctx.input("tf_graph"), _diagnose_batch(images, results),
                                       exact.network_gamma).to_dict()
    diagnosis = diagnose_int8(ctx, results, images)
    fallback = None
    if diagnosis and ctx.config.int8_fallback == "auto" and answers(results, ctx.config.undecided):
        fallback = int8_fallback(ctx, diagnosis, outputs, reference, targets, exact.bounds, images, policies)
    replaced = set()
    if fallback and fallback.path:  # int8_full's failure is answered by the int8_mixed file, published instead
        paths[MIXED.name], outputs[INT8_MIXED], replaced = fallback.path, fallback.outputs, {INT8_FULL}
        results = [*results, *fallback.results]
        against_exact.append(compare_exact(INT8_MIXED, fallback.outputs, exact, None))
        ctx.manifest.facts.setdefault("layout", {})[MIXED.name] = placement(tflite_ops(fallback.path))  # the card
    report = parity_report(ctx, paths, reference, exact, sign_test, probe.references, results, against_exact,
                           divergence, len(images), replaced, policies)
    report["int8_layers"] = diagnosis.record if diagnosis else None
    report["int8_weights"] = diagnose_weights(ctx, results)
    report["int8_fallback"] = fallback.record if fallback else None
    path = ctx.run_dir / "parity.json"
    write_json_atomic(path, report)
    plot(ctx.run_dir, outputs, reference, whole(exact, probe.references), labels, targets)
    page = write_parity_html(ctx, report)

    made = [*([Made(MIXED.name, fallback.path, ("saved_model", "calibration"))] if replaced else []),
            Made("parity", path, tuple(paths)),
            *(Made(plot.removesuffix(".png"), ctx.run_dir / plot, tuple(paths)) for plot in PLOTS),
            Made("parity_html", page, ("parity", *(plot.removesuffix(".png") for plot in PLOTS)))]
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
        raise_on_failure([*(r for r in results if r.candidate not in replaced), *probe.references.checks(),
                          *against_exact], detail=report["detail"])
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
        log_artifacts=[path, page, *(ctx.run_dir / plot for plot in PLOTS), *([fallback.path] if replaced else [])],
    )


PLOT_CAPTIONS = ("per-example error against the reference, with each hop's bound",
                 "the reference's confusion matrix on the test split")


def write_parity_html(ctx: Context, report: dict) -> Path:
    """``parity.html`` beside ``parity.json``: the same report for people (pipelines/parity_html.py)."""
    from crossport import __version__
    from crossport.files import write_bytes_atomic
    from pipelines.parity_html import render_parity_html

    dataset = (ctx.manifest.facts.get("dataset") or {}).get("name", ctx.config.dataset)
    code = (ctx.manifest.facts.get("provenance") or {}).get("code") or {}
    lineage = {"dataset digest": report["dataset_digest"],
               **{f"{name} sha256": sha for name, sha in report["artifacts"].items()},
               "code commit": f"{code.get('commit')}{' (with uncommitted changes)' if code.get('dirty') else ''}",
               "crossport": __version__}
    page = render_parity_html(report, title=f"{ctx.config.name} · {dataset} · parity {report['verdict']}",
                              plots=dict(zip(PLOT_CAPTIONS, (ctx.run_dir / plot for plot in PLOTS), strict=True)),
                              lineage=lineage)
    path = ctx.run_dir / "parity.html"
    write_bytes_atomic(path, page.encode())
    return path


@dataclass(frozen=True)
class References:
    """The exact values a run is judged against: the model's (the checkpoint's, or the graph brought), and its ONNX
    graph's, on the graph's own float32 weights, for every artifact converted from the graph; with the check that the
    two are one function (None for a model brought as a graph, which is both)."""

    model: object  # crossport.exact.Exact
    graph: object
    export: object | None  # crossport.parity.GraphResult

    def of(self, runtime: str):
        return self.model if runtime == REFERENCE else self.graph

    def checks(self) -> list:
        return [self.export] if self.export else []


def exact_values(paths: dict, reference: str, images: np.ndarray, graph: bool = False,
                 bound: str | None = None, lower: bool = False) -> References:
    """The exact float64 values and float32 bounds of the original (the checkpoint, or the ONNX graph brought) and,
    with ``graph``, of the ONNX graph, with the check that the two are one function. ``bound``: which bound
    (crossport.exact.walks), None to choose it on the images' pilot; the graph's walk takes the original's choice,
    as they are one function. ``lower``: the original's lower bound L where its bound is the adjoint
    (crossport.exact.exact_outputs)."""
    from crossport.exact import exact_outputs, folds
    from crossport.exact.graph import exact_from_onnx
    from crossport.parity import compare_graph

    model = original(paths, reference)
    exact = exact_outputs(model, images, bound=bound, lower=lower and not graph)
    if reference != REFERENCE or not graph:
        return References(exact, exact, None)
    onnx = exact_from_onnx(paths["onnx"], images, exact.bound)
    return References(exact, onnx, compare_graph(exact, onnx, folded=folds(model)))


def original(paths: dict, reference: str):
    """What the run's exact values come from: the checkpoint's model, or the ONNX graph brought."""
    if reference == REFERENCE:
        from training.checkpoint import load_checkpoint

        return load_checkpoint(paths["checkpoint"]).model
    import onnx

    from crossport.exact.graph import network_from_onnx

    return network_from_onnx(onnx.load(str(paths["onnx"]), load_external_data=False))


def walked_where_near(paths: dict, reference: str, images, exact, outputs: dict):
    """``exact`` with B walked on every row where an error passes the lower bound L it holds
    (crossport.parity.near_bound; ``outputs``: the fp32 artifacts', the reference's included), each in its own
    walk chunk (crossport.exact.complete); ``exact`` itself where it holds B on every row."""
    from crossport.exact import complete
    from crossport.parity import near_bound

    if exact.walked is None:
        return exact
    rows = near_bound(exact, outputs, reference)
    if len(rows):
        exact = complete(original(paths, reference), images, exact, rows)
    log.info("B walked on %d of %d test images (%d within L ≤ B of every check)", int(exact.walked.sum()),
             len(exact.walked), len(exact.walked) - int(exact.walked.sum()))
    return exact


def bound_walked(exact) -> dict | None:
    """For a report: on how many test images B was walked, None where on every one (else the test split holds its
    lower bound L on the others, and the figures of B are the probe's)."""
    if exact.walked is None:
        return None
    return {"images": int(exact.walked.sum()), "of": len(exact.walked),
            "figures": "the probe's (the test split holds L on the other images)"}


def whole(exact, references: References):
    """The exact values whose B is walked on every row, for the report's figures of B: the test split's, else the
    probe's (the model's)."""
    return exact if exact.walked is None else references.model


class Probe(NamedTuple):
    """The sign test's inputs run through every judged runtime, and their exact values."""

    outputs: dict
    references: References


def run_runtimes(ctx: Context, paths: dict, reference: str, images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Every runtime's outputs on ``images``, each artifact loaded from the run directory's copy of it."""
    from crossport.console import progress
    from crossport.runtimes import chunk_for, load_format, load_saved_model
    from training.checkpoint import load_torch

    threads, chunk = ctx.config.threads, chunk_for(paths["onnx"])  # the model's activations set the chunk
    runs = {
        **({REFERENCE: lambda: load_torch(paths["checkpoint"], threads, chunk)(images)}
           if reference == REFERENCE else {}),
        TF_GRAPH: lambda: load_saved_model(ctx.input("tf_graph"), threads=threads, outputs=(SCORES, LOGITS),
                                           chunk=chunk)(images),
        SM_CLASSIFY: lambda: load_saved_model(paths["saved_model"], CLASSIFY_KEY, threads, chunk=chunk)(images),
        **{fmt.runtime: lambda fmt=fmt: load_format(fmt, paths[fmt.name], threads, chunk=chunk)(images)
           for fmt in FORMATS if fmt.name in paths},
    }
    outputs = {}
    with progress(total=len(runs), desc=f"validate on {len(images):,} inputs (test split and probe)",
                  unit="runtime") as bar:
        for name, run in runs.items():
            bar.set_postfix_str(name)
            outputs[name] = run()
            bar.update()
    return outputs


@dataclass(frozen=True)
class SignTest:
    """The sign test's size for one run: which artifacts it judges, how many tests that makes, the threshold that
    keeps the run's false-alarm chance below FALSE_ALARM, and the probe it runs on."""

    judged: tuple[str, ...]
    tests: int
    threshold: float
    inputs: np.ndarray  # the probe: the first PROBE_SIZE test images, dithered

    @classmethod
    def plan(cls, outputs: dict, reference: str, exact, probe: np.ndarray) -> SignTest:
        from crossport.exact import sign_threshold

        judged = tuple(name for name in outputs if name == reference or POLICIES[name].fp32)
        tests = sum(exact.values[output].shape[1] for name in judged for output in exact.values
                    if output in outputs[name])
        return cls(judged, tests, sign_threshold(tests), probe)

    def to_dict(self) -> dict:
        from crossport.exact import FALSE_ALARM
        from crossport.parity import SIGN_TEST

        return {"statement": SIGN_TEST, "false_alarm": FALSE_ALARM, "tests": self.tests, "threshold": self.threshold,
                "probe_inputs": len(self.inputs), "dither": DITHER, "judged": list(self.judged)}


def dithered(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` plus uniform noise in [0, DITHER × their range): no two pixels, so no two patches, stay equal, and
    the image is unchanged to a quarter of an 8-bit grey level."""
    span = float(np.max(images) - np.min(images)) if images.size else 1.0
    noise = np.random.default_rng(seed).uniform(0.0, DITHER * (span or 1.0), images.shape)
    return (images + noise).astype(np.float32)


def judge(outputs: dict, reference: str, targets: np.ndarray, exact, labels: tuple[str, ...], sign_test: SignTest,
          probe: Probe, policies: dict = POLICIES) -> tuple[list, list]:
    """Every hop of the chain (pipelines.gate.hop_specs), and every artifact against the exact values: within B on
    the test split, and the sign test on the probe against the exact values of what it was converted from (the
    model for PyTorch, else the ONNX graph)."""
    results = [compare(spec, outputs[spec.reference], outputs[spec.candidate], targets, exact.bounds)
               for spec in hop_specs(reference, present=outputs, policies=policies)]
    _check_classes(results, outputs[SM_CLASSIFY][CLASSES], labels)
    against_exact = [
        compare_exact(name, outputs[name], exact, sign_test.threshold if name in sign_test.judged else None,
                      (probe.outputs[name], probe.references.of(name)))
        for name in (reference, *(name for name in POLICIES if name != reference and name in outputs))
    ]
    return results, against_exact


def parity_report(ctx: Context, paths: dict, reference: str, exact, sign_test: SignTest, references: References,
                  results: list, against_exact: list, divergence: dict | None, examples: int,
                  replaced: set[str] = frozenset(), policies: dict = POLICIES) -> dict:
    """``parity.json``: the verdict, every check, the error model by name with this run's figures, the lineage.
    ``replaced``: candidates whose failure the int8 fallback answered (left out of the verdict and the version)."""
    from crossport.exact import EXP_ULPS, FALSE_ALARM, U32
    from crossport.exact.rounding import CONSTANT_ROUNDINGS, SAMPLES, SIGMOID_ULPS, TANH_ULPS
    from crossport.files import sha256_file

    passed = all(check.passed for check in (*results, *references.checks(), *against_exact)
                 if getattr(check, "candidate", None) not in replaced)
    figures = whole(exact, references)  # the exact values whose B the report's figures of B read
    return {
        "verdict": "pass" if passed else "fail",
        "examples": examples,
        "reference": reference,
        # a model brought without logits has them exposed from its Softmax's input (or computed): said here
        "logits": (ctx.manifest.facts.get("source") or {}).get("logits", "output"),
        "dataset_digest": ctx.manifest.facts.get("dataset", {}).get("digest"),
        # everything validate blessed, the labels (the classify signature's classes) included
        "artifacts": {name: ctx.manifest.artifacts[name].sha256 if name in ctx.manifest.artifacts
                      else sha256_file(paths[name]) for name in (*paths, "labels")},  # int8_mixed is made here
        "replaced": {BY_RUNTIME[name].name: MIXED.name for name in sorted(replaced)},
        "error_model": {**ERROR_MODEL, "unit_roundoff": U32, "false_alarm": FALSE_ALARM,
                        "exp_ulps": EXP_ULPS, "tanh_ulps": TANH_ULPS, "sigmoid_ulps": SIGMOID_ULPS,
                        "constant_roundings": CONSTANT_ROUNDINGS, "lambda": exact.lam, "fan_ins": list(exact.fan_ins),
                        "network_gamma": exact.network_gamma,
                        "tangent_samples": SAMPLES if exact.bound == "sampled" else None,
                        "bound": exact.bound,
                        "bound_walked": bound_walked(exact),
                        "bound_median": {k: float(np.median(v)) for k, v in figures.bounds.items()},
                        "bound_max": {k: float(np.max(v)) for k, v in figures.bounds.items()},
                        "systematic_median": {k: float(np.median(v)) for k, v in figures.systematic.items()},
                        "sign_test": sign_test.to_dict()},
        "tolerances": tolerance_table(policies),
        "hops": [result.to_dict() for result in results],
        "export_function": references.export.to_dict() if references.export else None,
        "against_exact": [check.to_dict() for check in against_exact],
        "undecided": sorted({r.candidate for r in results if r.undecided and r.passed}),
        "divergence": divergence,
        "detail": divergence_detail(results, [*references.checks(), *against_exact], divergence),
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
        what = getattr(first_exact, "artifact", None)
        lines = [f"first failing check: {what} against the exact float64 values" if what else
                 "first failing check: the export (the ONNX graph's exact function against the model's)"]
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
