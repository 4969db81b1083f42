"""``python -m tools.int8_search RUN_DIR``: what the int8 fallback's candidates cost and buy on a run, as numbers.

Validate searches only when int8_full fails the gate and stops at the first candidate that passes. This measures
every candidate of the fixed list (pipelines/stages/int8.py) on the run's whole test split, beside the fp32 and
plain int8_full files the run made: layers kept in float, test accuracy, accuracy drop against the fp32 file with
its one-sided upper bound (McNemar, at the confidence validate judges each file at: the gate's own for int8_full,
the search's corrected one for a candidate), file size and batch-1 latency (median of interleaved rounds, one
thread). Prints a Markdown table; ``--json`` writes the rows.
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


def measure(run_dir: Path, seconds: float = 2.0, rounds: int = 5) -> dict:
    """``rows`` (one per file), the ``confidence`` their upper bounds are at, and the test ``examples``."""
    from crossport.formats import BY_NAME
    from crossport.parity import CONFIDENCE, accuracy_drop_bounds
    from crossport.runtimes import chunk_for, load_tflite
    from export.int8_layers import Int8Quantization
    from pipelines.gate import fallback_confidence
    from pipelines.manifest import Manifest
    from pipelines.stages.int8 import DIAGNOSIS_SAMPLES, Diagnosis, candidate_sizes, candidates, ranked_layers
    from pipelines.tools.bench.harness import summarize, timed

    manifest = Manifest.load(run_dir)
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
        right = {name: np.argmax(run(images)["scores"], axis=1) == targets for name, run in runs.items()}
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
            rows.append({"file": name, "float_layers": float_layers, "accuracy": float(np.mean(right[name])),
                         "lost": lost, "gained": gained, "drop_points": 100 * (lost - gained) / len(targets),
                         "drop_upper_points": 100 * upper, "confidence": level,
                         "bytes": path.stat().st_size, "batch1_p50_ms": summarize(latency[name], 1)["p50_ms"]})
    return {"rows": rows, "confidence": confidence, "examples": len(targets)}


def recorded(manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's test images and labels and its calibration images, as model inputs."""
    from crossport.files import read_npz
    from crossport.interface import to_inputs

    redo = "import" if manifest.config.get("onnx") else "data"
    arrays = read_npz(manifest.require("dataset", for_stage="int8_search"), redo=redo, need=("x_test", "y_test"),
                      only=True)
    calibration = read_npz(manifest.require("calibration", for_stage="int8_search"), redo=redo, need=("images",))
    return to_inputs(arrays["x_test"]), arrays["y_test"], to_inputs(calibration["images"])


def markdown(rows: list[dict], examples: int, confidence: float) -> str:
    from crossport.parity import CONFIDENCE

    bounds = f"int8_full at the gate's {100 * CONFIDENCE:.4g} %, candidates at the search's {100 * confidence:.4g} %"
    lines = [f"| file | test accuracy | drop vs fp32, points (upper bound: {bounds}) | size | batch-1 p50 |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['file']} | {row['accuracy']:.2%} | {row['drop_points']:+.2f} ({row['drop_upper_points']:.2f}) | "
              f"{row['bytes'] / 1e6:.2f} MB | {row['batch1_p50_ms']:.3f} ms |" for row in rows]
    return "\n".join([*lines, "", f"{examples:,} test images."])


def main(argv: list[str] | None = None) -> int:
    from crossport.cli import summary_line

    parser = argparse.ArgumentParser(prog="python -m tools.int8_search", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per file (default 2)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    measured = measure(args.run_dir, args.seconds)
    if args.json:
        args.json.write_text(json.dumps(measured["rows"], indent=2) + "\n")
    sys.stdout.write(markdown(measured["rows"], measured["examples"], measured["confidence"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
