"""The publish stage (a complete version into the model repository, or nothing) and the register stage (that
version as an MLflow registry version); each can tell whether its result outside the run directory still holds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from crossport.interface import ASSETS_EXTRA
from pipelines.manifest import Manifest
from pipelines.results import StageResult
from pipelines.stages.context import Context, golden_inputs
from pipelines.stages.validate import PLOTS

log = logging.getLogger(__name__)


def publish_stage(ctx: Context) -> StageResult:
    from crossport.errors import ConfigError
    from pipelines.release import publish_run

    packaged = (ctx.manifest.stages.get("package") or {}).get("config", {}).get("name")
    if packaged and packaged != ctx.config.name:  # the warmup records carry the name they were packaged under
        raise ConfigError(f"--name {ctx.config.name} differs from the name this run was packaged as ({packaged}), "
                          "which its warmup records carry.",
                          hint=f"Run --stage all --name {ctx.config.name} (package and the stages after it re-run "
                               "under the new name), or publish as " + packaged + ".")
    version, path = publish_run(ctx)
    return StageResult(params={"published_version": version, "published_path": str(path)},
                       metrics={"published_version": version})


def still_published(manifest: Manifest) -> bool:
    published = manifest.facts.get("published") or {}
    return Path(published.get("path", "")).joinpath("saved_model.pb").is_file()


def registered_as_published(manifest: Manifest) -> bool:
    registry = manifest.facts.get("registry") or {}
    published = manifest.facts.get("published") or {}
    return (registry.get("servable_version"), registry.get("servable_path")) == (
        published.get("version"), published.get("path"))


def headline_metrics(facts: dict, version_dir: Path) -> dict[str, float]:
    """What the pipeline's parent run shows first: test accuracy per runtime, and each published format's size as
    the version's card (servable.json) records it."""
    card = json.loads((version_dir / ASSETS_EXTRA / "servable.json").read_text())
    metrics = {f"accuracy_{name.replace(':', '_')}": value for name, value in (facts.get("accuracy") or {}).items()}
    metrics.update({f"{name}_bytes": info["bytes"] for name, info in card["formats"].items()
                    if info.get("bytes") is not None})
    return metrics


def register_stage(ctx: Context) -> StageResult:
    """Make the published version a registry version (after publish; re-run to repair)."""
    from crossport.errors import PublishError
    from crossport.files import sha256_file

    published = ctx.manifest.facts.get("published")
    if not published:
        raise PublishError("nothing to register: this run has not published a version.",
                           hint="Run --stage publish first.")
    if not ctx.tracker.enabled:
        log.warning("tracking is off (--no-tracking): version %s is not registered in MLflow", published["version"])
        return StageResult()
    path = Path(published["path"])
    report = json.loads(ctx.input("parity").read_text())
    registration = ctx.tracker.register_servable(
        name=ctx.config.name, servable_version=published["version"], path=path,
        saved_model_sha256=sha256_file(path / "saved_model.pb"), verdict=report["verdict"],
        example=golden_inputs(ctx)[:2], source_sha256=(ctx.manifest.facts.get("source") or {}).get("sha256"),
    )
    ctx.tracker.log_headline(headline_metrics(ctx.manifest.facts, path), {"parity_verdict": report["verdict"]},
                             [ctx.input("parity"), ctx.input("parity_html"), *(ctx.run_dir / plot for plot in PLOTS)],
                             model_id=registration.model_id, dataset=ctx.manifest.facts.get("dataset"))
    ctx.manifest.facts["registry"] = {
        "model": registration.model, "version": registration.version, "alias": registration.alias,
        "servable_version": registration.servable_version, "servable_path": str(path),
        "tracking_uri": ctx.tracker.uri,
    }
    ctx.manifest.save()
    log.info("registered %s version %d (servable %d)%s", registration.model, registration.version,
             registration.servable_version, f", alias {registration.alias!r}" if registration.alias else "")
    return StageResult(params={"registered_model": registration.model, "registry_version": registration.version},
                       metrics={"registry_version": registration.version})
