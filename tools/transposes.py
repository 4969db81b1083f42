"""``python -m tools.transposes [ARCH ...]``: Transposes left in each architecture's fp32 TFLite file, and its batch-1
latency against ONNX Runtime's on the same ONNX file.

Each architecture (seeded, untrained, 10 classes, the registry's own constructor) is exported, translated and
converted as the pipeline does it, with and without the channels-last rewrite (:mod:`translation.channels_last`);
TFLite and ONNX Runtime then run batch 1 on one thread (``pipelines.tools.bench``'s timing: warm-up, then rounds).
The measurement behind docs/training.md, "From NCHW to NHWC".
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from crossport.cli import summary_line

log = logging.getLogger("crossport")


def convert(arch: str, root: Path, rewrite: bool) -> tuple[Path, Path]:
    """The architecture's ONNX file and fp32 TFLite file under ``root`` (channels-last rewrite on or off)."""
    from unittest import mock

    from export.servable import build_saved_model
    from export.tflite import convert_tflite
    from training.model import ModelConfig, build_model
    from translation.onnx_export import export_onnx
    from translation.onnx_to_tf import translate

    root.mkdir(parents=True, exist_ok=True)
    labels = tuple(str(i) for i in range(10))
    onnx_path = root / "model.onnx"
    if not onnx_path.exists():
        import torch

        torch.manual_seed(0)
        export_onnx(build_model(ModelConfig(arch=arch, num_classes=10)).eval(), labels, "0" * 64, onnx_path)
    variant = root / ("rewritten" if rewrite else "plain")
    if rewrite:
        translate(onnx_path, variant / "tf_graph", expose_intermediates=False)
    else:  # translate() imports the rewrite per call: here it rewrites nothing
        with mock.patch("translation.channels_last.channels_last", lambda model: []):
            translate(onnx_path, variant / "tf_graph", expose_intermediates=False)
    build_saved_model(variant / "tf_graph", labels, variant / "saved_model")
    convert_tflite(variant / "saved_model", variant / "model.tflite")
    return onnx_path, variant / "model.tflite"


def measure(arch: str, root: Path, seconds: float) -> dict:
    from crossport.runtimes import load_onnx, load_tflite
    from export.layout import placement, tflite_ops
    from pipelines.tools.bench.harness import summarize, timed

    row = {"arch": arch}
    batch = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    for rewrite in (False, True):
        onnx_path, tflite = convert(arch, root / arch, rewrite)
        key = "rewritten" if rewrite else "plain"
        row[f"{key}_transposes"] = placement(tflite_ops(tflite))["transposes"]
        row[f"{key}_p50_ms"] = summarize(timed(load_tflite(tflite, threads=1), batch, seconds), 1)["p50_ms"]
    row["onnxruntime_p50_ms"] = summarize(timed(load_onnx(onnx_path, threads=1), batch, seconds), 1)["p50_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    from training.model import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="python -m tools.transposes", description=summary_line(__doc__),
                                     allow_abbrev=False)
    parser.add_argument("archs", nargs="*", default=[name for name in ARCHITECTURES if name != "mlp"])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per runtime (default 3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="crossport-transposes-") as directory:
        rows = [measure(arch, Path(directory), args.seconds) for arch in args.archs]
    log.info("%-20s %22s %22s %24s %18s", "model", "Transposes (plain)", "Transposes (rewrite)",
             "TFLite p50 ms (plain/rw)", "ORT p50 ms")
    for row in rows:
        log.info("%-20s %22d %22d %13.3f / %8.3f %18.3f", row["arch"], row["plain_transposes"],
                 row["rewritten_transposes"], row["plain_p50_ms"], row["rewritten_p50_ms"], row["onnxruntime_p50_ms"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
