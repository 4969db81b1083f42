"""The short report printed when a run ends."""

from __future__ import annotations

import json

from pipelines.manifest import Manifest
from pipelines.stages import parity_table


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
        lines.append(f"  test accuracy  {facts['test_accuracy']:.2%} (PyTorch)")
    published = facts.get("published")
    if published and "publish" in walls:
        lines.append(f"  published      version {published['version']} at {published['path']}")
    registry = facts.get("registry")
    if registry and "register" in walls:
        alias = f", alias {registry['alias']!r}" if registry.get("alias") else ""
        lines.append(f"  registered     {registry['model']} version {registry['version']} in MLflow{alias}")
    if walls:
        lines.append("  wall time      " + ", ".join(f"{name} {wall:.1f}s" for name, wall in walls.items())
                     + f" (total {sum(walls.values()):.1f}s)")
    if skipped:
        lines.append("  up to date     " + ", ".join(skipped) + " (skipped; --force redoes them)")
    lines.append(f"  peak memory    {peak_rss_gib():.2f} GiB (this process)")
    if tracking_uri:
        lines.append(f"  MLflow         {tracking_uri}")
    if "parity" in manifest.artifacts and "validate" in walls:
        report = json.loads(manifest.path("parity").read_text())
        lines += ["", f"parity on {report['examples']} test examples: {report['verdict'].upper()}",
                  parity_table(report)]
    return "\n".join(lines)
