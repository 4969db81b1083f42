"""The servable card: what a deployer needs to use a published version without our code."""

from __future__ import annotations

from crossport import __version__
from crossport.formats import BY_NAME, FORMATS
from crossport.interface import (
    CLASSIFY_INPUT,
    CLASSIFY_KEY,
    EMNIST_IMAGE,
    INPUT,
    PREDICT_UINT8_KEY,
    SCORES,
    ImageContract,
    signature_contracts,
)

FORMAT_FILES = {fmt.name: fmt.path for fmt in FORMATS}
PNG_RECIPE = [
    "decode the PNG or JPEG to grayscale in [0, 1] (all 16 bits of a 16-bit PNG; palettes expanded)",
    "composite transparent pixels onto the background: white under dark ink, black under light ink",
    "if the background is light (mean > 0.5), invert it: the model expects white ink on black",
    "crop to the ink, scale the crop to fit 20x20 and centre it in a 28x28 canvas",
    "transpose the 28x28 array (EMNIST orientation), flatten row-major to 784 values",
    "as float32 values in [0, 1]; batch as [N, 784]",
]


def image_recipe(image: ImageContract) -> list[str]:
    """How a PNG or JPEG becomes one example (serving.serverless_handler does exactly this)."""
    if image.flat:
        return PNG_RECIPE
    kind = "RGB" if image.channels == 3 else "grayscale"
    mode = "RGB" if image.channels == 3 else "L"
    return [f"decode the PNG or JPEG and convert it to {kind} (PIL's convert('{mode}'), as torchvision's image "
            "loader does; EXIF orientation applied)",
            f"resize to {image.width}x{image.height} (width x height) with bilinear interpolation",
            f"as float32 values / 255 in [0, 1], upright, channels last; batch as [N, {image.height}, {image.width}, "
            f"{image.channels}]"]


def input_section(image: ImageContract, normalization: str | None) -> dict:
    """The card's ``input``: the declared contract (crossport.interface.ImageContract) and what the model does
    with it inside the graph."""
    if image.flat:
        scaling = "grayscale pixel value / 255, in [0, 1]; white ink on black"
        orientation = "EMNIST: the 28x28 image transposed, then flattened row-major"
    else:
        scaling = f"{'R, G, B' if image.channels == 3 else 'grayscale'} value / 255, in [0, 1]"
        orientation = "upright, as people see it; channels last"
    return {"name": INPUT, "dtype": "float32", "shape": image.batch_shape(), "image": image.to_json(),
            "scaling": scaling + (f"; {normalization}" if normalization else ""),
            "orientation": orientation, "refused": VALUES_REFUSED, "png_to_input": image_recipe(image)}


# The one rule REST, gRPC, the Lambda handler and the upload page keep (serving.serverless_handler.pixel_problem).
VALUES_REFUSED = ("any value outside [0, 1], NaN or infinity: REST answers 400, gRPC INVALID_ARGUMENT, the Lambda "
                  "handler 400, each naming the first such value and its index (TF Serving itself would compute "
                  "an answer)")


def card_signatures(num_classes: int, image: ImageContract = EMNIST_IMAGE) -> dict:
    """The signature contract the SavedModel is built and checked against, written for people."""
    notes = {(CLASSIFY_KEY, CLASSIFY_INPUT): f" serialized tf.train.Example, feature '{INPUT}'",
             (PREDICT_UINT8_KEY, INPUT): " pixel values 0-255, scaled by 1/255 in the graph (a quarter of the float32 "
                                         "request's bytes; the same scores as serving_default on x/255)"}
    return {key: {"method": sig.method,
                  "inputs": {name: t.describe() + notes.get((key, name), "") for name, t in sig.inputs.items()},
                  "outputs": {name: t.describe() for name, t in sig.outputs.items()}}
            for key, sig in signature_contracts(num_classes, image).items()}


def servable_card(*, name: str, version: int, labels: list[str], report: dict, facts: dict, sizes: dict[str, int],
                  mlflow_ids: dict | None, image: ImageContract = EMNIST_IMAGE) -> dict:
    hops = {hop["hop"]: hop for hop in report["hops"]}
    reference = report.get("reference", "pytorch")  # onnxruntime for a model brought as an ONNX file
    undecided = set(report.get("undecided", []))
    formats = {}
    for fmt, path in FORMAT_FILES.items():
        if fmt not in sizes:  # left out of this version (--undecided omit)
            continue
        runtime = BY_NAME[fmt].runtime
        # the reference itself (an imported model's ONNX) has no hop of its own: it agrees with itself
        hop = hops.get(f"{reference} -> {runtime}") or (
            {"candidate_accuracy": (facts.get("accuracy") or {}).get(runtime), "top1_agreement": 1.0}
            if runtime == reference else {})
        formats[fmt] = {"path": path, "bytes": sizes.get(fmt), "test_accuracy": hop.get("candidate_accuracy"),
                        "top1_agreement_with_reference": hop.get("top1_agreement"),
                        "max_abs_score_error": max((o["max_abs"] for o in hop.get("outputs", [])), default=None),
                        "parity": "unverified" if fmt in undecided else "verified",
                        "transposes": (facts.get("layout") or {}).get(fmt, {}).get("transposes")}
    for diagnosis in (report.get("int8_layers"), report.get("int8_weights")):  # outputs (full), weights (dynamic)
        if diagnosis and diagnosis["variant"] in formats:  # where int8 loses accuracy, worst three (parity.html: all)
            formats[diagnosis["variant"]]["worst_int8_layers"] = [
                {key: layer[key] for key in ("layer", "op", "typical_relative_error", "rmse_over_scale")}
                for layer in diagnosis["layers"][:3]]
    fallback = report.get("int8_fallback") or {}
    for replaced, mixed in (report.get("replaced") or {}).items():  # int8_full did not pass; int8_mixed passed instead
        if mixed in formats and fallback.get("chosen") is not None:
            formats[mixed].update(replaces=replaced, why_replaced=fallback.get("trigger"),
                                  float_layers=fallback["candidates"][fallback["chosen"]]["float_layers"])
    base = f"http://localhost:8501/v1/models/{name}"
    return {
        "name": name,
        "version": version,
        "produced_by": f"crossport {__version__}",
        "model": facts.get("model"),
        "input": input_section(image, (facts.get("source") or {}).get("scaling")),
        "outputs": {SCORES: {"dtype": "float32", "shape": [None, len(labels)],
                               "meaning": "softmax probability per class; class id = index into labels"}},
        "signatures": card_signatures(len(labels), image),
        "labels": labels,
        "formats": formats,
        "parity": {"verdict": report["verdict"], "examples": report["examples"], "reference": reference,
                   "logits": report.get("logits", "output"), "tolerances": report["tolerances"],
                   "unverified": sorted(undecided & set(formats)),
                   "omitted": sorted(undecided - set(formats)), "replaced": report.get("replaced") or {}},
        "lineage": {
            "dataset": facts.get("dataset"),
            "source": _source(facts.get("source")),
            "code": (facts.get("provenance") or {}).get("code"),
            "mlflow": mlflow_ids,
            "lineage_command": f"python -m pipelines.lineage <models-dir>/{name}/{version}",
        },
        "example_requests": {
            "rest_predict_rows": f"curl -d '{{\"instances\": [{_example_text(image)}]}}' {base}:predict",
            "rest_predict_columns": f"curl -d '{{\"inputs\": {{\"images\": [[0.0, ...]]}}}}' {base}:predict",
            "rest_classify": f"curl -d '{{\"signature_name\": \"classify\", \"examples\": [{{\"images\": "
                             f"[0.0, ...]}}]}}' {base}:classify",
            "rest_metadata": f"curl {base}/versions/{version}/metadata",
            "tflite_python": ("from ai_edge_litert.interpreter import Interpreter; "
                              "runner = Interpreter(model_path='model_fp32.tflite')"
                              ".get_signature_runner('serving_default'); "
                              f"scores = runner(images=batch_float32_Nx{'x'.join(map(str, image.shape))})"
                              "['scores']"),
        },
    }


def _example_text(image: ImageContract) -> str:
    if image.flat:
        return "[0.0, ... 784 values ...]"
    return f"[[[{', '.join(['0.0'] * image.channels)}], ... {image.width} pixels ...], ... {image.height} rows ...]"


def _source(source: dict | None) -> dict | None:
    """For a model brought as an ONNX file: the file it came from and what crossport changed to publish it."""
    if not source:
        return None
    return {key: source.get(key) for key in ("path", "sha256", "producer", "opset", "ir_version", "input_shape",
                                              "orientation", "labels_from", "logits", "normalization")}


def render_markdown(card: dict) -> str:
    """SERVABLE.md: the same card for people."""
    lines = [f"# {card['name']} — servable version {card['version']}", "",
             f"Produced by {card['produced_by']}. Parity verdict: **{card['parity']['verdict']}** on "
             f"{card['parity']['examples']} test images.", ""]
    model = card.get("model")
    if model:
        lines += [f"Model: **{model['arch']}** ({model['summary']}), {model['parameters']:,} parameters, "
                  f"{model['macs_per_example']:,} multiply-accumulates per image.", ""]
    lines += ["## Input", "",
             f"- `{card['input']['name']}`: {card['input']['dtype']} {card['input']['shape']}",
             f"- scaling: {card['input']['scaling']}", f"- orientation: {card['input']['orientation']}",
             f"- refused: {card['input']['refused']}",
             "", "From a PNG or JPEG:", ""]
    lines += [f"{i}. {step}" for i, step in enumerate(card["input"]["png_to_input"], 1)]
    lines += ["", "## Output", "", f"`scores`: {card['outputs']['scores']['meaning']} "
              f"({card['outputs']['scores']['dtype']} {card['outputs']['scores']['shape']}).", "",
              "## Signatures (TF Serving)", "", "| signature | method | inputs | outputs |", "|---|---|---|---|"]
    for key, sig in card["signatures"].items():
        lines.append(f"| `{key}` | `{sig['method']}` | " + ", ".join(f"`{k}` {v}" for k, v in sig["inputs"].items())
                     + " | " + ", ".join(f"`{k}` {v}" for k, v in sig["outputs"].items()) + " |")
    lines += ["", "## Formats", "",
              f"| format | file | size | test accuracy | top-1 agreement with {card['parity']['reference']} | parity | "
              "Transpose ops |",
              "|---|---|---|---|---|---|---|"]
    for fmt, info in card["formats"].items():
        size = f"{info['bytes'] / 1e6:.2f} MB" if info["bytes"] else "-"
        accuracy = f"{info['test_accuracy']:.2%}" if info["test_accuracy"] is not None else "-"
        agreement = (f"{info['top1_agreement_with_reference']:.2%}"
                     if info["top1_agreement_with_reference"] is not None else "-")
        transposes = info.get("transposes")
        lines.append(f"| {fmt} | `{info['path']}` | {size} | {accuracy} | {agreement} | {info['parity']} | "
                     f"{'-' if transposes is None else transposes} |")
    for fmt, info in card["formats"].items():
        worst = info.get("worst_int8_layers")
        if worst:
            lines += ["", f"{fmt} did not pass outright; the layers where int8 loses most (typical fraction of a "
                          "value lost; parity.html lists every layer): " + "; ".join(
                              f"`{layer['layer']}` ({layer['op']}) {layer['typical_relative_error'] or 0:.0%}"
                              for layer in worst) + "."]
    for fmt, info in card["formats"].items():
        if info.get("float_layers"):
            lines += ["", f"{info['replaces']} did not pass the gate ({'; '.join(info['why_replaced'] or [])}) and is "
                          f"not in this version; {fmt} keeps {len(info['float_layers'])} layer(s) in float32 and "
                          "passes it: "
                          + ", ".join(f"`{layer}`" for layer in info["float_layers"]) + "."]
    parity = card["parity"]
    if parity["unverified"] or parity["omitted"]:
        unverified, omitted = ", ".join(parity["unverified"]) or "none", ", ".join(parity["omitted"]) or "none"
        lines += ["", f"Unverified (the {parity['examples']} test images were too few to decide): {unverified}; "
                      f"left out: {omitted}."]
    lines += ["", "## Tolerances", "",
              "| candidate | values | against exact float64 | top-1 | max accuracy drop | why |",
              "|---|---|---|---|---|---|"]
    for row in parity["tolerances"]:
        lines.append(f"| {row['candidate']} | {row['values']} | {row['against_exact']} | {row['top1'] or '-'} | "
                     f"{row['max_accuracy_drop_points'] if row['max_accuracy_drop_points'] is not None else '-'} | "
                     f"{row['why']} |")
    lines += ["", "## Labels", "", "Class id → label: " + ", ".join(f"{i}={label}" for i, label in
                                                                    enumerate(card["labels"])), "",
              "## Example requests", ""]
    lines += [f"- {key}: `{value}`" for key, value in card["example_requests"].items()]
    lineage = card["lineage"]
    dataset = lineage.get("dataset") or {}
    code = lineage.get("code") or {}
    source = lineage.get("source")
    lines += ["", "## Lineage", ""]
    if source:
        lines += [f"- brought as an ONNX file: `{source['path']}` (sha256 `{source['sha256']}`, {source['producer']}, "
                  f"opset {source['opset']}); the model expects {source['orientation']} images; labels from "
                  f"{source['labels_from']}", *(f"  - {step}" for step in source["normalization"])]
    lines += [f"- dataset: {dataset.get('name')} (digest `{dataset.get('digest')}`)",
              f"- code commit: `{code.get('commit')}`{' (dirty tree)' if code.get('dirty') else ''}",
              f"- MLflow: {((lineage.get('mlflow') or {}).get('runs') or {}).get('pipeline', 'not tracked')}",
              f"- verify and trace: `{lineage['lineage_command']}`", ""]
    return "\n".join(lines)
