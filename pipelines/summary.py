"""The short report printed when a run ends."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.manifest import Manifest


def summary(manifest: Manifest, walls: dict[str, float], tracking_uri: str | None,
            skipped: list[str] | None = None) -> str:
    facts = manifest.facts
    lines = ["", "crossport run summary", f"  run directory  {manifest.run_dir}"]
    dataset = facts.get("dataset")
    if dataset:
        lines.append(f"  dataset        {dataset['name']} ({dataset['train_examples']} train / "
                     f"{dataset['test_examples']} test, {dataset['num_classes']} classes, "
                     f"digest {dataset['digest'][:12]})")
    if "test_accuracy" in facts:
        kept = f", epoch {facts['best_epoch']} kept for its validation accuracy" if facts.get("best_epoch") else ""
        lines.append(f"  test accuracy  {facts['test_accuracy']:.2%} (PyTorch{kept})")
    source = facts.get("source")
    if source:
        lines.append(f"  imported       {source['path']} (sha256 {source['sha256'][:12]}, opset {source['opset']}, "
                     f"{source['orientation']} images, {len(source['normalization'])} normalization step(s))")
        accuracy = (facts.get("accuracy") or {}).get("onnxruntime")
        if accuracy is not None:
            lines.append(f"  test accuracy  {accuracy:.2%} (ONNX Runtime, the imported model)")
    published = facts.get("published")
    if published and "publish" in walls:
        lines.append(f"  published      version {published['version']} at {published['path']}" if not
                     published.get("identical") else f"  not published  identical to version {published['version']} "
                     f"at {published['path']} (--republish publishes it again)")
    registry = facts.get("registry")
    if registry and "register" in walls:
        alias = f", alias {registry['alias']!r}" if registry.get("alias") else ""
        lines.append(f"  registered     {registry['model']} version {registry['version']} in MLflow{alias}")
        page = f"#/models/{registry['model']}/versions/{registry['version']}"
        uri = registry.get("tracking_uri") or ""
        lines.append(f"  version page   {uri.rstrip('/')}/{page}" if uri.startswith(("http://", "https://")) else
                     f"  version page   make ui, then http://127.0.0.1:5000/{page}")
    if walls:
        lines.append("  wall time      " + ", ".join(f"{name} {wall:.1f}s" for name, wall in walls.items())
                     + f" (total {sum(walls.values()):.1f}s)")
    if skipped:
        lines.append("  up to date     " + ", ".join(skipped) + " (skipped; --force redoes them)")
    lines.append(peak_line(manifest, walls))
    if tracking_uri:
        lines.append(f"  MLflow         {tracking_uri}")
    if "parity" in manifest.artifacts and "validate" in walls:
        report = json.loads(manifest.path("parity").read_text())
        page = manifest.run_dir / "parity.html"
        if published and "publish" in walls:
            page = Path(published["path"]) / "assets.extra" / "parity.html"
        lines += ["", f"parity on {report['examples']} test examples: {report['verdict'].upper()}  (report: {page})",
                  parity_table(report)]
    return "\n".join(lines)


def peak_line(manifest: Manifest, walls: dict[str, float]) -> str:
    """The process's peak resident memory, the stage that reached it, and the peak after each stage run."""
    from pipelines.memory import peak_gib

    after = [(name, peak) for name in walls
             if isinstance(peak := manifest.stages.get(name, {}).get("peak_rss_gib"), int | float)]
    if not after:
        return f"  peak memory    {peak_gib():.2f} GiB (this process)"
    top = max(after, key=lambda item: item[1])
    each = ", ".join(f"{name} {peak:.2f}" for name, peak in after)
    return (f"  peak memory    {peak_gib():.2f} GiB (this process; reached in {top[0]}; the peak after each stage: "
            f"{each})")


def run_title(manifest: Manifest, name: str, dataset: str, failed: str | None = None,
              state: str | None = None) -> str:
    """What the MLflow parent run is named: ``<model> · <dataset> · <verdict>``, and the version once published
    (``state``: what it says instead while the stages run)."""
    facts = manifest.facts
    dataset = (facts.get("dataset") or {}).get("name") or dataset
    if state:
        return " · ".join([name, dataset, state])
    verdict = facts.get("parity_verdict")
    if failed and failed != "validate":
        verdict = f"failed at {failed}"
    elif verdict is None:
        verdict = "not validated"
    else:
        verdict = f"parity {verdict}"
    published = facts.get("published") if not failed else None
    return " · ".join([name, dataset, verdict, *([f"version {published['version']}"] if published else [])])


def exact_ratio(report: dict) -> float | None:
    """The fp32 artifacts' largest error against the exact values, in units of B: on the test split where B was walked
    on every image, else on the probe (the test split's figure is a ceiling there: error_model.bound_walked)."""
    key = "probe_ratio" if (report.get("error_model") or {}).get("bound_walked") else "worst_ratio"
    ratios = [output[key] for check in report.get("against_exact", []) if check.get("judged")
              for output in check.get("outputs", []) if output.get(key) is not None]
    return max(ratios) if ratios else None


def parity_table(report: dict) -> str:
    rows = [f"{'hop':<52} {'scores |Δ|':>10} {'logits |Δ|':>10} {'Δ/bound':>8} {'top-1':>9} {'ties':>5} "
            f"{'accuracy':>9}  verdict"]
    for hop in report["hops"]:
        by_output = {o["name"]: f"{o['max_abs']:.2e}" for o in hop["outputs"]}
        ratios = [o["worst_ratio"] for o in hop["outputs"] if o.get("worst_ratio") is not None]
        agreement = hop["top1_agreement"]
        accuracy = hop["candidate_accuracy"]
        rows.append(
            f"{hop['hop']:<52} {by_output.get('scores', '-'):>10} {by_output.get('logits', '-'):>10} "
            f"{f'{max(ratios):.2g}' if ratios else '-':>8} "
            f"{f'{agreement:.4%}' if agreement is not None else '-':>9} {hop['near_ties_excluded']:>5} "
            f"{f'{accuracy:.2%}' if accuracy is not None else '-':>9}  {hop['verdict']}"
        )
    threshold = next((c["threshold"] for c in report.get("against_exact", []) if c["judged"]), None)
    rows += ["", f"{'against exact float64':<30} {'output':<7} {'max |err|':>10} {'rms':>10} {'err/bound':>9} "
                 f"{'sign test T':>11} {f'(t {threshold:.3g})' if threshold else '':>9}  verdict"]
    for check in report.get("against_exact", []):
        for stats in check["outputs"]:
            verdict = check["verdict"] if check["judged"] else "recorded"
            sign = "-" if stats.get("sign_statistic") is None else f"{stats['sign_statistic']:.2f}"
            rows.append(f"{check['artifact']:<30} {stats['name']:<7} {stats['max_abs']:>10.2e} {stats['rms']:>10.2e} "
                        f"{stats['worst_ratio']:>9.2g} {sign:>11} {'':>9}  {verdict}")
    export = report.get("export_function")
    if export:
        rows.append(f"{'export (graph vs model, exact)':<30} {'logits':<7} {export['max_abs']:>10.2e} {'':>10} "
                    f"{export['worst_ratio']:>9.2g} {'':>21}  {export['verdict']}   allowance: {export['allowance']}")
    walked = (report.get("error_model") or {}).get("bound_walked")
    if walked:
        rows.append(f"B walked on {walked['images']:,} of {walked['of']:,} test images (where an fp32 error passed "
                    "its lower bound L or an answer changed); elsewhere L stands in, so Δ/bound and err/bound are "
                    "ceilings there")
    if report.get("detail"):
        rows.append(report["detail"])
    return "\n".join(rows)
