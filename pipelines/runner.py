"""Run stages from the table in order against one run directory."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from crossport import __version__
from crossport.files import write_json_atomic
from crossport.frameworks import give_back_memory
from crossport.runtimes import close_saved_models
from pipelines.config import PipelineConfig
from pipelines.manifest import MANIFEST, Manifest
from pipelines.memory import peak_gib
from pipelines.stages import STAGES, Context, Stage, needs_on
from pipelines.summary import run_title

log = logging.getLogger(__name__)

RUNS_DIR = Path("runs")


def new_run_dir(root: Path = RUNS_DIR) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return root / f"{stamp}-{uuid.uuid4().hex[:6]}"


def latest_run_dir(root: Path = RUNS_DIR) -> Path | None:
    """The newest run whose stages all succeeded: a failed or unreadable run is never picked by default."""
    import json

    candidates = sorted(p for p in root.glob("*") if (p / MANIFEST).is_file()) if root.is_dir() else []
    for candidate in reversed(candidates):
        try:
            stages = json.loads((candidate / MANIFEST).read_text()).get("stages", {})
            if all(isinstance(info, dict) and info.get("status") == "done" for info in stages.values()):
                return candidate
        except (OSError, ValueError, AttributeError):
            continue
        log.info("run %s has a stage that did not finish; not picked as the latest run", candidate)
    return None


def open_run(run_dir: Path, config: PipelineConfig, *, fresh: bool) -> Manifest:
    """A new run directory (``fresh``) or an existing one whose manifest holds the inputs."""
    from pipelines.lock import lock_run_dir

    if fresh:
        run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.is_dir():
        lock_run_dir(run_dir)  # one writer at a time; held until the process exits
    if fresh and not (run_dir / MANIFEST).is_file():
        manifest = Manifest.create(run_dir, config.to_dict())
    else:
        manifest = Manifest.load(run_dir)
        manifest.config = config.to_dict()
    write_json_atomic(run_dir / "config.json", config.to_dict())
    manifest.save()
    return manifest


def select(stage: str, config: PipelineConfig) -> tuple[Stage, ...]:
    """The stages of the run's route: ``all`` of them, or the one named (which must be on the route)."""
    from crossport.errors import ConfigError
    from pipelines.stages import stages_on

    route = stages_on(config.route)
    if stage == "all":
        return route
    chosen = tuple(s for s in route if s.name == stage)
    if not chosen:
        raise ConfigError(
            f"stage {stage!r} is not part of this run: it was "
            f"{'made from an ONNX file (--onnx)' if config.route == 'import' else 'trained here'}, whose stages "
            f"are {', '.join(s.name for s in route)}.", hint="Run one of those stages.")
    return chosen


def stage_record(manifest: Manifest, config: PipelineConfig, stage: Stage) -> dict:
    """What a stage's result depends on: its inputs' sha256 and the config fields it reads."""
    settings = config.to_dict()
    return {
        "inputs": {need: manifest.artifacts[need].sha256 for need in needs_on(stage, config.route)
                   if need in manifest.artifacts},
        "config": {key: settings[key] for key in stage.reads},
    }


def up_to_date(manifest: Manifest, config: PipelineConfig, stage: Stage) -> bool:
    """True when ``stage`` finished before with the same inputs and config, and its outputs are intact."""
    from crossport.errors import ManifestError

    previous = manifest.stages.get(stage.name, {})
    if previous.get("status") != "done":
        return False
    current = stage_record(manifest, config, stage)
    if previous.get("inputs") != current["inputs"] or previous.get("config") != current["config"]:
        return False
    try:
        for name in stage.makes:
            manifest.require(name, for_stage=stage.name)
    except ManifestError:
        return False
    return stage.intact is None or stage.intact(manifest)


def run_stages(manifest: Manifest, config: PipelineConfig, stages: tuple[Stage, ...], tracker,
               *, resume: bool = False) -> dict[str, float]:
    """Run ``stages`` in order; returns wall seconds per stage run. Errors propagate unchanged.

    With ``resume``, a stage that is :func:`up_to_date` is skipped; once one stage runs,
    everything after it runs too (its inputs may have changed).
    """
    from pipelines.provenance import package_versions, provenance

    walls: dict[str, float] = {}
    origin = provenance()
    manifest.facts["provenance"] = origin
    tags = {
        "crossport.version": __version__,
        "crossport.run_dir": str(manifest.run_dir.resolve()),
        "crossport.code_commit": str(origin["code"]["commit"]),
        "crossport.code_dirty": str(origin["code"]["dirty"]),
        "mlflow.source.git.commit": str(origin["code"]["commit"]),
    }
    environment = {**origin, "packages": package_versions()}
    title = run_title(manifest, config.name, config.dataset, state="running")
    with tracker.pipeline_run(title, config.to_dict(), tags, environment):
        try:
            _run_each(manifest, config, stages, tracker, resume, walls)
        finally:  # named for what it is once the stages are over, passed or failed
            ran = {stage.name for stage in stages}
            failed = next((name for name, info in manifest.stages.items()
                           if name in ran and info.get("status") in ("failed", "running")), None)
            tracker.name_run(run_title(manifest, config.name, config.dataset, failed))
    return walls


def _run_each(manifest: Manifest, config: PipelineConfig, stages: tuple[Stage, ...], tracker, resume: bool,
              walls: dict[str, float]) -> None:
    optional = {name for other in STAGES for name in other.may_make}  # needs read only where a run made them
    for stage in stages:
        if resume and up_to_date(manifest, config, stage):
            log.info("stage %s is up to date (inputs, config and outputs unchanged): skipped", stage.name)
            continue
        resume = False
        inputs = {need: manifest.require(need, for_stage=stage.name) for need in needs_on(stage, config.route)
                  if need not in optional or need in manifest.artifacts}
        ctx = Context(config, manifest, inputs, tracker)
        record = stage_record(manifest, config, stage)
        log.info("stage %s ...", stage.name)
        with tracker.stage_run(stage.name):
            _record_tracking(manifest, tracker)
            started = time.perf_counter()
            manifest.stages[stage.name] = {"status": "running", "started": _now()}
            manifest.save()
            for name in stage.may_make:  # made again or not at all: an earlier run's copy is never read after
                manifest.artifacts.pop(name, None)
            before = {name: (a.sha256, a.stage) for name, a in manifest.artifacts.items()}
            try:
                result = stage.run(ctx)
                for made in result.made:
                    manifest.record(made.name, made.path, stage.name, parents=made.parents)
                if result.error is not None:
                    raise result.error
                check_makes(manifest, stage, before)
            except BaseException:
                manifest.stages[stage.name].update(status="failed", wall_s=time.perf_counter() - started,
                                                   peak_rss_gib=round(peak_gib(), 3))
                manifest.save()
                raise
            wall = time.perf_counter() - started
            walls[stage.name] = wall
            peak = peak_gib()
            manifest.stages[stage.name] = {"status": "done", "wall_s": round(wall, 3), "peak_rss_gib": round(peak, 3),
                                           "finished": _now(), "makes": list(stage.makes), **record}
            manifest.save()
            tracker.log_stage(result, wall, peak)
            del result, ctx  # what a stage returned (the data stage's test split, its dataset) is not held past it
            if close_saved_models():  # a stage's SavedModel loads are its own: the next stage's peak is not on them
                give_back_memory()
        log.info("stage %s done in %.1f s", stage.name, wall)


def check_makes(manifest: Manifest, stage: Stage, before: dict[str, tuple[str, str]]) -> None:
    """A stage must record exactly the artifacts it declares: each of ``makes``, and nothing else."""
    from crossport.errors import ManifestError

    missing = [name for name in stage.makes
               if name not in manifest.artifacts or manifest.artifacts[name].stage != stage.name]
    undeclared = sorted(name for name, a in manifest.artifacts.items()
                        if before.get(name) != (a.sha256, a.stage) and name not in (*stage.makes, *stage.may_make))
    if missing or undeclared:
        raise ManifestError(
            f"stage {stage.name!r} declares it makes {list(stage.makes)} but recorded "
            f"{'no ' + ', '.join(missing) if missing else ''}{'; ' if missing and undeclared else ''}"
            f"{'undeclared ' + ', '.join(undeclared) if undeclared else ''}.",
            hint="This is a bug in the stage table (pipelines/stages/__init__.py): make the declaration and the "
                 "stage agree.",
        )


def _record_tracking(manifest: Manifest, tracker) -> None:
    """The MLflow ids of this run's stages, in the manifest (and so in what publish writes)."""
    if not tracker.enabled:
        return
    mlflow_facts = manifest.facts.setdefault("mlflow", {"runs": {}})
    mlflow_facts.update(tracking_uri=tracker.uri, experiment_id=tracker.experiment_id)
    mlflow_facts["runs"].update(tracker.run_ids)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
