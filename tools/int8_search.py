"""``python -m tools.int8_search RUN_DIR``: what the int8 fallback's candidates cost and buy on a run, as numbers.

Validate searches only when int8_full fails the gate (or is undecided, with --undecided omit) and stops at the first
candidate that passes. This measures every candidate of the fixed list (pipelines/stages/int8.py) on the run's whole
test split, beside the fp32 and plain int8_full files the run made: layers kept in float, test accuracy, accuracy
drop against the fp32 file with its one-sided upper bound (McNemar, at the confidence validate judges each file at:
the gate's own for int8_full, the search's corrected one for a candidate), the gate's verdict on each int8 file at an
--int8-max-drop of your choice (its lossy hop, the fp32 file standing for the SavedModel), file size and batch-1
latency (median of interleaved rounds, one thread). Prints a Markdown table and what validate would publish;
``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("crossport")


def measure(run_dir: Path, seconds: float = 2.0, rounds: int = 5, int8_max_drop: float | None = None) -> dict:
    """``rows`` (one per file), the ``confidence`` their upper bounds are at, and the test ``examples``; each int8
    row with the gate's verdict under ``int8_max_drop`` (default: the run's own --int8-max-drop)."""
    from dataclasses import replace

    from crossport.formats import BY_NAME
    from crossport.parity import CONFIDENCE, accuracy_drop_bounds, compare
    from crossport.runtimes import chunk_for, load_tflite
    from export.int8_layers import Int8Quantization
    from pipelines.gate import INT8_MAX_DROP_POINTS, SM_PREDICT, TFLITE, fallback_confidence, hop_spec, run_policies
    from pipelines.manifest import Manifest
    from pipelines.stages.int8 import DIAGNOSIS_SAMPLES, Diagnosis, candidate_sizes, candidates, ranked_layers
    from pipelines.tools.bench.harness import summarize, timed

    manifest = Manifest.load(run_dir)
    points = int8_max_drop or manifest.config.get("int8_max_drop") or INT8_MAX_DROP_POINTS
    policies = run_policies(points)
    images, targets, calibration = recorded(manifest)
    quantization = Int8Quantization(manifest.require("saved_model", for_stage="int8_search"), calibration,
                                    images[:DIAGNOSIS_SAMPLES])
    diagnosis = Diagnosis({"layers": quantization.layer_errors(), "why": []}, quantization)
    confidence = fallback_confidence(len(candidate_sizes(len(ranked_layers(diagnosis)))))  # as validate judges
    files = [(name, None, manifest.require(BY_NAME[f"tflite_{name}"].name, for_stage="int8_search"))
             for name in ("fp32", "int8_full")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size, floats, flatbuffer in candidates(diagnosis):
            path = Path(scratch) / f"candidate_{size}.tflite"
            path.write_bytes(flatbuffer)
            files.append((f"{len(floats)} in float (k={size})", len(floats), path))
        # every file loaded at once, so each call takes as many images as the model's activations allow (a
        # MobileNet's interpreters took 12 GB at 4,096 images a call)
        chunk = chunk_for(manifest.require("onnx", for_stage="int8_search"))
        runs = {name: load_tflite(path, threads=1, chunk=chunk) for name, _, path in files}
        scores = {name: run(images)["scores"] for name, run in runs.items()}
        right = {name: np.argmax(values, axis=1) == targets for name, values in scores.items()}
        latency = {name: [] for name in runs}
        for _ in range(rounds):  # interleaved: every file sees the machine in the same state, round by round
            for name, run in runs.items():
                latency[name] += timed(lambda rows, run=run: run(rows), images[:1], seconds / rounds, rounds=1)
        for name, float_layers, path in files:
            lost = int(np.sum(right["fp32"] & ~right[name]))
            gained = int(np.sum(~right["fp32"] & right[name]))
            # plain int8_full is judged at the gate's own confidence, a candidate at the search's corrected one
            level = CONFIDENCE if float_layers is None else confidence
            upper = accuracy_drop_bounds(lost, gained, len(targets), level)[1]
            # the gate's own hop, with the fp32 file in the SavedModel's place (the fp32 gate holds them together)
            spec = hop_spec(SM_PREDICT, TFLITE["int8_full" if float_layers is None else "int8_mixed"], policies)
            spec = replace(spec, lossy=replace(spec.lossy, confidence=level))
            verdict = None if name == "fp32" else compare(spec, {"scores": scores["fp32"]}, {"scores": scores[name]},
                                                          targets).verdict
            rows.append({"file": name, "float_layers": float_layers, "accuracy": float(np.mean(right[name])),
                         "lost": lost, "gained": gained, "drop_points": 100 * (lost - gained) / len(targets),
                         "drop_upper_points": 100 * upper, "confidence": level, "verdict": verdict,
                         "bytes": path.stat().st_size, "batch1_p50_ms": summarize(latency[name], 1)["p50_ms"]})
    return {"rows": rows, "confidence": confidence, "examples": len(targets), "int8_max_drop": points}


def recorded(manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's test images and labels and its calibration images, as model inputs."""
    from crossport.files import read_npz
    from crossport.interface import to_inputs

    redo = "import" if manifest.config.get("onnx") else "data"
    arrays = read_npz(manifest.require("dataset", for_stage="int8_search"), redo=redo, need=("x_test", "y_test"),
                      only=True)
    calibration = read_npz(manifest.require("calibration", for_stage="int8_search"), redo=redo, need=("images",))
    return to_inputs(arrays["x_test"]), arrays["y_test"], to_inputs(calibration["images"])


def markdown(rows: list[dict], examples: int, confidence: float, int8_max_drop: float) -> str:
    from crossport.parity import CONFIDENCE

    bounds = f"int8_full at the gate's {100 * CONFIDENCE:.4g} %, candidates at the search's {100 * confidence:.4g} %"
    lines = [f"| file | test accuracy | drop vs fp32, points (upper bound: {bounds}) | gate at --int8-max-drop "
             f"{int8_max_drop:g} | size | batch-1 p50 |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['file']} | {row['accuracy']:.2%} | {row['drop_points']:+.2f} ({row['drop_upper_points']:.2f}) | "
              f"{row['verdict'] or '-'} | {row['bytes'] / 1e6:.2f} MB | {row['batch1_p50_ms']:.3f} ms |"
              for row in rows]
    searched = [row for row in rows if row["float_layers"] is not None]
    first = next((row["file"] for row in searched if row["verdict"] == "pass"), None)
    plain = next(row["verdict"] for row in rows if row["file"] == "int8_full")
    chosen = ("int8_full as it is" if plain == "pass" else f"{first}, the first candidate the gate passes" if first
              else "no int8 file: no candidate passes")
    return "\n".join([*lines, "", f"{examples:,} test images. What validate would publish as int8 at this policy "
                                  f"(int8_full {plain}; a search runs on a failure, or on undecided with --undecided "
                                  f"omit): {chosen}."])


def main(argv: list[str] | None = None) -> int:
    from crossport.cli import summary_line

    parser = argparse.ArgumentParser(prog="python -m tools.int8_search", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per file (default 2)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--int8-max-drop", type=float, metavar="POINTS",
                        help="judge the int8 files at this policy (default: the run's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    measured = measure(args.run_dir, args.seconds, int8_max_drop=args.int8_max_drop)
    if args.json:
        args.json.write_text(json.dumps(measured["rows"], indent=2) + "\n")
    sys.stdout.write(markdown(measured["rows"], measured["examples"], measured["confidence"],
                              measured["int8_max_drop"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
