"""``python -m tools.gate_matrix``: no false alarms, shown on a matrix of correct runs.

Runs ``--stage all`` for every case asked for, each in its own run and models directory under
``--out``, and prints one line per run: its exit code, the reference's accuracy, the worst fp32
|Δ|/2B of any hop, the worst fp32 error/B against the exact values, the largest sign-test T of
any judged artifact against its threshold t, and each lossy variant's verdict. Every run is a
correct pipeline, so every line must say PASS. Exit code 1 if one does not.

* digits: every (model, epochs, seed, threads, oneDNN) combination asked for;
* ``--zoo``: the foreign models of :mod:`tools.zoo` (other exporters' opsets and activations,
  no biases, a Softmax head, 62 classes evaluated on digits), each brought with ``--onnx``.

    python -m tools.gate_matrix --out runs/matrix                     # digits MLP, 1/3/10 epochs × seeds 0-4
    python -m tools.gate_matrix --out runs/matrix --models cnn --epochs 3 --seeds 0 1 --zoo
    python -m tools.gate_matrix --out runs/matrix --epochs 3 --threads 1 2 --onednn 0 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from crossport.cli import summary_line
from pipelines.summary import exact_ratio

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
        "exact_ratio": exact_ratio(report),
        "sign": max(o["sign_statistic"] for c in judged for o in c["outputs"]),
        "threshold": report["error_model"]["sign_test"]["threshold"],
        "lossy": verdicts,
        "accuracy": next(h["reference_accuracy"] for h in hops if h["reference"] == report["reference"]),
    }


def cases(args) -> list[tuple[str, list[str], dict]]:
    """(name, pipeline flags, environment) per run."""
    runs = []
    for model, epochs, seed, threads, onednn in itertools.product(args.models, args.epochs, args.seeds,
                                                                  args.threads or [None], args.onednn or [None]):
        name = f"{model}-e{epochs}-s{seed}" + (f"-t{threads}" if threads else "") + (
            f"-onednn{onednn}" if onednn is not None else "")
        flags = ["--dataset", "digits", "--model", model, "--epochs", str(epochs), "--seed", str(seed),
                 *(["--threads", str(threads)] if threads else [])]
        runs.append((name, flags, {} if onednn is None else {"TF_ENABLE_ONEDNN_OPTS": str(onednn)}))
    if args.zoo:
        from tools.zoo import ZOO, build, eval_data_for, write_eval_data

        folder = args.out / "zoo"
        write_eval_data(folder)
        for spec in ZOO:
            runs.append((f"zoo:{spec.name}", ["--onnx", str(build(spec, folder)), "--eval-data",
                                              eval_data_for(spec, folder)], {}))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gate_matrix", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("--models", nargs="+", default=["mlp"], help="architectures trained on digits")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", help="--threads values to run each case with")
    parser.add_argument("--onednn", type=int, nargs="+", choices=[0, 1], help="TF_ENABLE_ONEDNN_OPTS values")
    parser.add_argument("--zoo", action="store_true", help="also the foreign models of tools.zoo, brought with --onnx")
    parser.add_argument("--out", type=Path, required=True, help="where the runs go (one directory per run)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further pipeline flags, after --")
    args = parser.parse_args(argv)
    extra = [flag for flag in args.extra if flag != "--"]
    failures = 0
    header = (f"{'run':<34} {'rc':>3} {'accuracy':>8} {'|Δ|/2B':>8} {'err/B':>8} {'sign T':>11}  "
              + "  ".join(f"{name.removeprefix('tflite_'):>12}" for name in LOSSY) + "  verdict")
    sys.stdout.write(header + "\n")
    for name, flags, env in cases(args):
        run = args.out / name.replace(":", "-")
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.run", "--stage", "all", *flags, "--run-dir", str(run / "run"),
             "--models-dir", str(run / "models"), "--no-tracking", *extra],
            capture_output=True, text=True, check=False, env={**os.environ, **env})
        parity = run / "run" / "parity.json"
        if not parity.is_file():
            failures += 1
            sys.stdout.write(f"{name:<34} {result.returncode:>3}  no parity report: "
                             f"{result.stderr.strip().splitlines()[-1:]}\n")
            continue
        row = summarize(json.loads(parity.read_text()))
        failures += result.returncode != 0 or row["verdict"] != "pass"
        sign = f"{row['sign']:.2f} < {row['threshold']:.2f}"
        sys.stdout.write(
            f"{name:<34} {result.returncode:>3} {row['accuracy']:>8.2%} {row['fp32_hop_ratio']:>8.2g} "
            f"{row['exact_ratio']:>8.2g} {sign:>11}  "
            + "  ".join(f"{row['lossy'][lossy]:>12}" for lossy in LOSSY) + f"  {row['verdict'].upper()}\n")
        sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
