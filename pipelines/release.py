"""What goes into a published version, and the gate that lets only blessed runs through."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from crossport import __version__
from crossport.errors import PublishError
from crossport.files import sha256_path, size_path, write_json_atomic
from crossport.formats import FORMATS, OPTIONAL
from crossport.interface import ASSETS_EXTRA
from export.publish import publish_version

log = logging.getLogger(__name__)

# run artifact → file name inside assets.extra/ (the published layout contract): every
# format but the SavedModel itself, then the version's other assets.
EXTRA_FILES = {
    **{fmt.name: fmt.path.removeprefix(f"{ASSETS_EXTRA}/") for fmt in FORMATS if fmt.path != "."},
    "labels": "labels.txt",
    "parity": "parity.json",
    "parity_html": "parity.html",
    "parity_errors": "parity_errors.png",
    "confusion_matrix": "confusion_matrix.png",
    "warmup": "tf_serving_warmup_requests",
}


def check_blessed(ctx) -> dict:
    """The parity report, if it passed and validated exactly the artifacts recorded now."""
    parity_path = ctx.input("parity")
    report = json.loads(parity_path.read_text())
    if report.get("verdict") != "pass":
        failing = [hop["hop"] for hop in report.get("hops", []) if hop.get("verdict") != "pass"]
        raise PublishError(f"refusing to publish: parity verdict is {report.get('verdict')!r} "
                           f"(failing hops: {', '.join(failing) or 'none listed'}).",
                           hint="Fix the drift and re-run --stage validate; see parity.json.")
    for name, sha in report.get("artifacts", {}).items():
        current = ctx.manifest.artifacts.get(name)
        if current is None or current.sha256 != sha:
            raise PublishError(f"refusing to publish: artifact {name!r} changed after it was validated.",
                               hint="Re-run --stage validate, then --stage publish.")
    return report


def published_extras(report: dict, policy: str) -> dict[str, str]:
    """The assets.extra files of a version: all of them, less undecided lossy variants under ``--undecided omit``,
    a variant the int8 fallback replaced (``replaced``: int8_full, by int8_mixed), and an optional format the run
    did not make."""
    omitted = set(report.get("undecided", [])) if policy == "omit" else set()
    omitted |= set(report.get("replaced") or {})
    omitted |= {name for name in OPTIONAL if name not in report.get("artifacts", {})}
    return {name: filename for name, filename in EXTRA_FILES.items() if name not in omitted}


# what a deployer runs: a version holding exactly these files (by sha256) is the same servable; the reports
# (parity, plots) and the card describe a run and may differ without changing what is served
REPORTS = frozenset({"parity", "parity_html", "parity_errors", "confusion_matrix", "servable_card",
                     "servable_card_md"})


def identical_version(ctx, names: list[str]) -> tuple[int, Path] | None:
    """The newest published version, if it holds exactly the model files ``names`` with this run's sha256s (and
    still matches its own manifest); else None."""
    from export.publish import versions
    from export.verify import check_version

    base = Path(ctx.config.models_dir) / ctx.config.name
    numbers = versions(base)
    if not numbers:
        return None
    newest = base / str(numbers[-1])
    checked = check_version(newest)
    if not checked.ok:
        return None
    theirs = {entry["name"]: entry["sha256"] for entry in checked.manifest["artifacts"] if entry["name"] not in REPORTS}
    mine = {name: ctx.manifest.artifacts[name].sha256 for name in names if name not in REPORTS}
    return (numbers[-1], newest) if theirs == mine else None


def publish_run(ctx) -> tuple[int, Path]:
    from export.publish import check_repository

    check_repository(Path(ctx.config.models_dir), ctx.config.name)
    report = check_blessed(ctx)
    manifest = ctx.manifest
    extras = published_extras(report, ctx.config.undecided)
    sources = {name: ctx.input(name) for name in ("saved_model", *extras)}
    same = None if ctx.config.republish else identical_version(ctx, list(sources))
    if same is not None:
        version, path = same
        log.info("version %d already holds exactly these model files (the same sha256 for each): not published "
                 "again; --republish publishes a new version anyway", version)
        manifest.facts["published"] = {"version": version, "path": str(path), "identical": True}
        manifest.save()
        return version, path

    def build(staging: Path) -> None:
        from export.contract import replay_warmup, signature_problems

        shutil.copytree(sources["saved_model"], staging, dirs_exist_ok=True)
        extra = staging / ASSETS_EXTRA
        extra.mkdir()
        for name, filename in extras.items():
            shutil.copy2(sources[name], extra / filename)
        problems = signature_problems(staging)  # TF Serving's rules, on the exact files to publish
        if problems:
            raise PublishError("refusing to publish: the SavedModel breaks TF Serving's rules: "
                               + "; ".join(problems) + ".", hint="Re-run --stage package.")
        replay_warmup(staging)

    def finalize(staging: Path, version: int) -> None:
        from export.card import render_markdown

        extra = staging / ASSETS_EXTRA
        card = servable_card(ctx, report, version, staging)
        write_json_atomic(extra / "servable.json", card)
        (extra / "SERVABLE.md").write_text(render_markdown(card))
        write_json_atomic(extra / "manifest.json", version_manifest(ctx, staging, version, extras))

    version, path = publish_version(Path(ctx.config.models_dir), ctx.config.name, build, finalize,
                                    serving_root=ctx.config.serving_root or None)
    manifest.facts["published"] = {"version": version, "path": str(path)}
    manifest.save()
    return version, path


def version_manifest(ctx, staging: Path, version: int, published: dict[str, str]) -> dict:
    """Every file of the version with its sha256, its parent's sha256 and the stage that made it."""
    run = ctx.manifest.artifacts
    extras = {**published, "servable_card": "servable.json", "servable_card_md": "SERVABLE.md"}
    entries = [{
        "name": "saved_model", "path": ".", "stage": "package",
        "sha256": sha256_path(staging, exclude=(ASSETS_EXTRA,)),
        "parents": run["saved_model"].parents,
    }]
    for name, filename in extras.items():
        entries.append({
            "name": name, "path": f"{ASSETS_EXTRA}/{filename}",
            "stage": run[name].stage if name in run else "publish",
            "sha256": sha256_path(staging / ASSETS_EXTRA / filename),
            "parents": run[name].parents if name in run else {"parity": run["parity"].sha256},
        })
    return {
        "name": ctx.config.name,
        "version": version,
        "crossport_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(ctx.run_dir.resolve()),
        "dataset": ctx.manifest.facts.get("dataset"),
        "source": ctx.manifest.facts.get("source"),  # a model brought as an ONNX file: the file, what was changed
        "provenance": ctx.manifest.facts.get("provenance"),
        "mlflow": _mlflow_ids(ctx),
        "config": ctx.manifest.config,
        "artifacts": entries,
        "lineage": {name: {"sha256": a.sha256, "stage": a.stage, "parents": a.parents} for name, a in run.items()},
    }


def _mlflow_ids(ctx) -> dict | None:
    """Where this version's runs are tracked. The registry version is not known yet: the
    register stage runs after publish (docs/tracking.md: publish, then register) and records it in
    the run's manifest and in the registry version's tags."""
    facts = ctx.manifest.facts.get("mlflow")
    if not facts or not ctx.config.tracking:
        return None
    return {**facts, "registered_model": ctx.config.name}


def servable_card(ctx, report: dict, version: int, staging: Path) -> dict:
    from export.card import FORMAT_FILES
    from export.card import servable_card as card
    from export.servable import image_contract

    sizes = {fmt: size_path(staging / path, exclude=(ASSETS_EXTRA,)) for fmt, path in FORMAT_FILES.items()
             if (staging / path).exists()}
    return card(name=ctx.config.name, version=version, labels=ctx.manifest.path("labels").read_text().splitlines(),
                report=report, facts=ctx.manifest.facts, sizes=sizes, mlflow_ids=_mlflow_ids(ctx),
                image=image_contract(staging))

