"""The conversion stages: PyTorch → ONNX (export), ONNX → TensorFlow (translate), the SavedModel with TF Serving's
signatures and warmup records (package), and the TFLite variants (tflite). Each checks what it wrote on the golden
batch against the exact values before the next stage may read it."""

from __future__ import annotations

from pathlib import Path

from crossport.files import replace_atomic
from crossport.interface import CLASSIFY_KEY, LOGITS, PREDICT_KEY, SCORES
from pipelines.gate import ONNX, REFERENCE, SM_CLASSIFY, SM_PREDICT, TF_GRAPH
from pipelines.results import Made, ModelToLog, StageResult
from pipelines.stages.context import (
    Context,
    golden_exact,
    golden_inputs,
    locate_divergence,
    read_labels,
    recorded_inputs,
    self_check,
)


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
    with replace_atomic(exact_path) as partial:
        exact_outputs(checkpoint.model, golden).save(partial)
    path = ctx.run_dir / "model.onnx"
    export_onnx(checkpoint.model, checkpoint.labels, ctx.manifest.artifacts["checkpoint"].sha256, path)
    threads = ctx.config.threads
    self_check(REFERENCE, ONNX, load_torch(checkpoint_path, threads)(golden), load_onnx(path, threads)(golden),
               Exact.load(exact_path))
    return StageResult(made=[Made("golden_exact", exact_path, ("checkpoint", "golden")),
                             Made("onnx", path, ("checkpoint",))],
                       metrics={"onnx_bytes": path.stat().st_size}, models=[ModelToLog("onnx", path, golden[:4])])


def translate_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import chunk_for, load_onnx, load_saved_model
    from translation.onnx_export import check_onnx, onnx_hints
    from translation.onnx_to_tf import translate

    onnx_path = ctx.input("onnx")
    check_onnx(onnx_path, **onnx_hints(ctx.config.onnx))  # one clear line, not a parser traceback
    out = ctx.run_dir / "tf_graph"
    translate(onnx_path, out)
    golden, exact, threads = golden_inputs(ctx), golden_exact(ctx), ctx.config.threads
    # the translation returns every intermediate tensor too: the check keeps two, a chunk of calls at a time as
    # validate does (resnet18's 64 golden images with all of theirs kept took 0.7 GB more)
    translated = load_saved_model(out, threads=threads, outputs=(SCORES, LOGITS), chunk=chunk_for(onnx_path))
    self_check(ONNX, TF_GRAPH, load_onnx(onnx_path, threads)(golden), translated(golden), exact,
               diagnose=lambda: locate_divergence(onnx_path, out, golden, exact.network_gamma).describe())
    return StageResult(made=[Made("tf_graph", out, ("onnx",))])


def package_stage(ctx: Context) -> StageResult:
    from crossport.runtimes import load_onnx, load_saved_model
    from export.servable import build_saved_model, check_uint8_signature
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
    check_uint8_signature(out, golden, threads)
    warmup = ctx.run_dir / "tf_serving_warmup_requests"
    records = write_warmup(warmup, ctx.config.name, golden)
    return StageResult(made=[Made("saved_model", out, ("tf_graph", "labels")), Made("warmup", warmup, ("golden",))],
                       metrics={"warmup_records": records},
                       models=[ModelToLog("tensorflow", out, golden[:4])])


def tflite_stage(ctx: Context) -> StageResult:
    from crossport.formats import TFLITE_CONVERTED
    from crossport.runtimes import load_saved_model, load_tflite
    from export.layout import placement, saved_model_ops, tflite_ops
    from export.tflite import convert_tflite

    saved_model = ctx.input("saved_model")
    calibration = recorded_inputs(ctx, "calibration")
    golden, exact, threads = golden_inputs(ctx), golden_exact(ctx), ctx.config.threads
    reference = load_saved_model(saved_model, threads=threads)(golden)
    metrics, layout = {}, {}
    paths = []
    made = []
    for fmt in TFLITE_CONVERTED:
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
