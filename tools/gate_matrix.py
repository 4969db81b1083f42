"""``python -m tools.gate_matrix``: no false alarms, shown on a matrix of correct runs.

Runs ``--stage all`` on the bundled digits for every (epochs, seed) pair asked for, each in
its own run and models directory under ``--out``, and prints one line per run: its exit
code, PyTorch accuracy, the worst fp32 |Δ|/2B of any hop, the worst fp32 error/B against
the exact values, the worst noise ratio against PyTorch and each lossy variant's verdict.
Every run is a correct pipeline, so every line must say PASS. Exit code 1 if one does not.

    python -m tools.gate_matrix --epochs 1 3 10 --seeds 0 1 2 3 4 --out /tmp/matrix
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from crossport.cli import summary_line

LOSSY = ("tflite_fp16", "tflite_int8_dynamic", "tflite_int8_full")


def summarize(report: dict) -> dict:
    hops = report["hops"]
    fp32_ratio = max((o["worst_ratio"] for h in hops for o in h["outputs"] if o.get("worst_ratio") is not None),
                     default=0.0)
    judged = [c for c in report["against_exact"] if c["judged"]]
    verdicts = {}
    for name in LOSSY:
        states = {h["verdict"] for h in hops if h["candidate"] == name}
        verdicts[name] = "fail" if "fail" in states else "undecided" if "undecided" in states else "pass"
    return {
        "verdict": report["verdict"],
        "fp32_hop_ratio": fp32_ratio,
        "exact_ratio": max(o["worst_ratio"] for c in judged for o in c["outputs"]),
        "noise": max(o["noise_ratio"] for c in judged for o in c["outputs"]),
        "lossy": verdicts,
        "accuracy": next(h["reference_accuracy"] for h in hops if h["reference"] == "pytorch"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gate_matrix", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, required=True, help="where the runs go (one directory per run)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further pipeline flags, after --")
    args = parser.parse_args(argv)
    extra = [flag for flag in args.extra if flag != "--"]
    failures = 0
    header = (f"{'epochs':>6} {'seed':>4} {'rc':>3} {'accuracy':>8} {'|Δ|/2B':>8} {'err/B':>8} {'noise':>6}  "
              + "  ".join(f"{name.removeprefix('tflite_'):>12}" for name in LOSSY) + "  verdict")
    sys.stdout.write(header + "\n")
    for epochs in args.epochs:
        for seed in args.seeds:
            run = args.out / f"e{epochs}-s{seed}"
            result = subprocess.run(
                [sys.executable, "-m", "pipelines.run", "--stage", "all", "--dataset", "digits", "--epochs",
                 str(epochs), "--seed", str(seed), "--run-dir", str(run / "run"), "--models-dir",
                 str(run / "models"), "--no-tracking", *extra],
                capture_output=True, text=True, check=False)
            parity = run / "run" / "parity.json"
            if not parity.is_file():
                failures += 1
                sys.stdout.write(f"{epochs:>6} {seed:>4} {result.returncode:>3}  no parity report: "
                                 f"{result.stderr.strip().splitlines()[-1:]}\n")
                continue
            row = summarize(json.loads(parity.read_text()))
            failures += result.returncode != 0 or row["verdict"] != "pass"
            sys.stdout.write(
                f"{epochs:>6} {seed:>4} {result.returncode:>3} {row['accuracy']:>8.2%} {row['fp32_hop_ratio']:>8.2g} "
                f"{row['exact_ratio']:>8.2g} {row['noise']:>5.2f}×  "
                + "  ".join(f"{row['lossy'][name]:>12}" for name in LOSSY) + f"  {row['verdict'].upper()}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
