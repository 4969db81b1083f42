"""Validate's int8 work: where the int8 files lose accuracy, layer by layer (the diagnoses: int8_full's outputs,
int8_dynamic's weights), and, when int8_full fails the gate (or is undecided in a run that omits undecided variants:
:func:`answers`), the fewest layers to keep in float that pass it (the fallback, published as ``int8_mixed``).

The fallback tries candidates in a fixed order, decided before any is judged: the k worst-ranked layers in float,
for k = 1, 2, 3, 4, 6, 8, 11, 16, … (each about √2 × the last) and finally all layers but one. A layer in float keeps
its output tensor in float only if the layers reading it run in float too, so each candidate also keeps the readers
of its layers; a candidate that this leaves with no int8 layer is skipped (it would be the fp32 file). Each
candidate is judged by the gate's own lossy hops (against the SavedModel and the reference, on the whole test split)
at confidence 1 − (1 − CONFIDENCE)/m for m candidates (Bonferroni), so the chance that the search
publishes a file that breaks int8_full's policy stays within the gate's own 1 − CONFIDENCE. The first that passes
(not undecided) is published; none passing leaves int8_full's verdict standing (a failure refuses the run; an
undecided int8_full is left out of the version by --undecided omit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from crossport.formats import BY_RUNTIME
from pipelines.gate import POLICIES, TFLITE, fallback_confidence, hop_specs
from pipelines.stages.context import Context, recorded_inputs

log = logging.getLogger(__name__)

INT8_FULL, INT8_MIXED, INT8_DYNAMIC = TFLITE["int8_full"], TFLITE["int8_mixed"], TFLITE["int8_dynamic"]
MIXED = BY_RUNTIME[INT8_MIXED]
DIAGNOSIS_SAMPLES = 64  # test images the quantization debugger runs: enough to rank layers; the rest is fixed cost


@dataclass
class Diagnosis:
    """parity.json's ``int8_layers``, and the calibration it came from (the fallback quantizes it again)."""

    record: dict
    quantization: object  # export.int8_layers.Int8Quantization


def diagnose_int8(ctx: Context, results: list, images: np.ndarray) -> Diagnosis | None:
    """Where the full-int8 file loses accuracy, layer by layer (export/int8_layers.py), when any of its hops did
    not pass outright (failed, or undecided); None when it passed or was not built."""
    from export.int8_layers import ROUNDING_ONLY, Int8Quantization

    why = not_plain_pass(results, INT8_FULL)
    if not why:
        return None
    samples = np.asarray(images[:DIAGNOSIS_SAMPLES])
    quantization = Int8Quantization(ctx.input("saved_model"), recorded_inputs(ctx, "calibration"), samples)
    layers = quantization.layer_errors()
    if layers:
        log.info("%s: the layer with the largest int8 error is %s (%s), %.2f quantization steps rms (rounding "
                 "alone: %.2f)", INT8_FULL, layers[0]["layer"], layers[0]["op"], layers[0]["rmse_over_scale"],
                 ROUNDING_ONLY)
    record = {"variant": INT8_FULL, "of": "outputs", "samples": len(samples), "rounding_only": ROUNDING_ONLY,
              "layers": layers, "why": why}
    return Diagnosis(record, quantization)


def diagnose_weights(ctx: Context, results: list) -> dict | None:
    """Where the dynamic-range int8 file loses accuracy, layer by layer: its activations stay float, so its weights
    against the fp32 file's (export/int8_layers.py: weight_errors), when any of its hops did not pass outright; None
    when it passed or was not built."""
    from export.int8_layers import ROUNDING_ONLY, weight_errors

    why = not_plain_pass(results, INT8_DYNAMIC)
    if not why:
        return None
    layers = weight_errors(ctx.input(BY_RUNTIME[TFLITE["fp32"]].name), ctx.input(BY_RUNTIME[INT8_DYNAMIC].name))
    return {"variant": INT8_DYNAMIC, "of": "weights", "samples": None, "rounding_only": ROUNDING_ONLY,
            "layers": layers, "why": why}


def not_plain_pass(results: list, candidate: str) -> list[str]:
    """``candidate``'s hops that failed or were undecided, as "hop: verdict" (empty when it passed or was not
    built): what a diagnosis is made for."""
    return [f"{r.hop}: {r.verdict}" for r in results if r.candidate == candidate and r.verdict != "pass"]


def answers(results: list, undecided: str) -> bool:
    """Whether the fallback answers int8_full's verdict: a failure that is the run's only one (otherwise nothing is
    published anyway), or, in a run that leaves undecided variants out (``undecided`` "omit"), an undecided verdict
    in a run with no failure: a deployer who asked for int8 within a tighter --int8-max-drop than the test split can
    confirm gets the fewest layers in float that confirm it, instead of no int8 file."""
    failed = {r.candidate for r in results if not r.passed}
    if failed:
        return failed == {INT8_FULL}
    return undecided == "omit" and any(r.candidate == INT8_FULL and r.undecided for r in results)


def candidate_sizes(layers: int) -> list[int]:
    """How many of the ``layers`` worst-ranked layers each candidate keeps in float: 1, 2, 3, 4, 6, 8, 11, 16, …
    and all but one (every layer in float is the fp32 file with quantize steps added, not an int8 file)."""
    sizes, k = [], 1
    while k < layers - 1:
        sizes.append(k)
        k = max(k + 1, round(k * math.sqrt(2)))
    return [*sizes, layers - 1] if layers > 1 else []


def candidates(diagnosis: Diagnosis) -> Iterator[tuple[int, tuple[str, ...], bytes]]:
    """Each candidate in the fixed order (module docstring) once: how many worst layers it takes, every layer it
    keeps in float (in graph order: those and their readers), and its file."""
    ranked = ranked_layers(diagnosis)
    order = {layer["layer"]: layer["order"] for layer in diagnosis.record["layers"]}
    readers = diagnosis.quantization.readers()
    tried: set[tuple[str, ...]] = set()
    for size in candidate_sizes(len(ranked)):
        chosen = set(ranked[:size])
        floats = tuple(sorted(chosen.union(*(readers.get(name, ()) for name in chosen)), key=lambda n: order.get(n, 0)))
        if floats not in tried and not set(ranked) <= set(floats):  # with their readers, some keep every layer
            tried.add(floats)
            yield size, floats, diagnosis.quantization.with_float(list(floats))


def ranked_layers(diagnosis: Diagnosis) -> list[str]:
    """The layers a candidate may keep in float, worst first: every ranked layer but the scores' Softmax."""
    return [layer["layer"] for layer in diagnosis.record["layers"] if layer["op"] != "SOFTMAX"]


@dataclass
class Fallback:
    """The search's record (parity.json's ``int8_fallback``) and, when a candidate passed, its hops, outputs and
    file."""

    record: dict
    results: list = field(default_factory=list)
    outputs: dict | None = None
    path: Path | None = None


def int8_fallback(ctx: Context, diagnosis: Diagnosis, outputs: dict, reference: str, targets: np.ndarray,
                  bounds: dict, images: np.ndarray, policies: dict = POLICIES) -> Fallback:
    """The first candidate (module docstring) that the gate passes, written to the run directory as the int8_mixed
    file; every candidate tried is recorded. First, the converter's own int8 file from the same calibration, nothing
    in float, is judged by the gate's own policy: if it passes, int8_full's failure is not quantization's (the run's
    file is not what the converter makes of this SavedModel), and nothing is searched."""
    from crossport.files import write_bytes_atomic
    from crossport.parity import compare
    from crossport.runtimes import chunk_for, load_format

    ranked = len(ranked_layers(diagnosis))
    sizes = candidate_sizes(ranked)
    confidence = fallback_confidence(len(sizes))
    plain = [spec for spec in hop_specs(reference, present=(INT8_MIXED,), policies=policies)
             if spec.candidate == INT8_MIXED]
    specs = [replace(spec, lossy=replace(spec.lossy, confidence=confidence)) for spec in plain]
    path = ctx.run_dir / Path(MIXED.path).name
    record = {"trigger": diagnosis.record["why"], "ranked_layers": ranked,
              "candidates": [], "confidence": confidence, "chosen": None, "requantized": None,
              "rule": "the k worst-ranked layers and the layers reading them in float, k = "
                      f"{', '.join(map(str, sizes))}; the first the gate passes at confidence {confidence:.5f}"}
    chunk = chunk_for(ctx.input("onnx"))

    def judged(flatbuffer: bytes, judging: list) -> tuple[str, list, dict]:
        write_bytes_atomic(path, flatbuffer)
        candidate = load_format(MIXED, path, ctx.config.threads, chunk=chunk)(images)
        results = [compare(spec, outputs[spec.reference], candidate, targets, bounds) for spec in judging]
        verdict = "fail" if any(not r.passed for r in results) else \
            "undecided" if any(r.undecided for r in results) else "pass"
        return verdict, results, candidate

    record["requantized"], _, _ = judged(diagnosis.quantization.with_float([]), plain)
    if record["requantized"] == "pass":
        path.unlink(missing_ok=True)
        log.warning("int8 fallback: the converter's own int8 file of this SavedModel passes the gate, so the run's "
                    "int8_full file is not what it makes: nothing searched; re-run --stage tflite")
        return Fallback(record)
    for size, floats, flatbuffer in candidates(diagnosis):
        verdict, results, candidate = judged(flatbuffer, specs)
        record["candidates"].append({"worst_layers": size, "float_layers": list(floats), "bytes": path.stat().st_size,
                                     "verdict": verdict, "hops": {r.hop: r.verdict for r in results},
                                     "accuracy": results[0].candidate_accuracy})
        log.info("int8 fallback: %d layer(s) in float (%s): %s", len(floats), ", ".join(floats), verdict)
        if verdict == "pass":
            record["chosen"] = len(record["candidates"]) - 1
            return Fallback(record, results, candidate, path)
    path.unlink(missing_ok=True)
    log.warning("int8 fallback: no candidate passed the gate; int8_full's verdict stands")
    return Fallback(record)
