"""MLflow tracking: the only module in crossport that imports mlflow.

One parent run per pipeline invocation, one nested child run per stage with its params,
metrics, wall time and artifacts. The default store is SQLite in the repository's
``mlflow/`` folder with artifacts beside it; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``
point elsewhere (a shared ``mlflow server``, for instance).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from crossport.errors import TrackingError

log = logging.getLogger(__name__)

MLFLOW_DIR = Path(__file__).resolve().parents[1] / "mlflow"


def default_tracking_uri() -> str:
    return f"sqlite:///{MLFLOW_DIR / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def artifact_location_for(uri: str) -> str | None:
    """Artifacts beside a SQLite store (``<db dir>/artifacts``); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


class NullTracker:
    """Used with ``--no-tracking``: same interface, records nothing."""

    uri = None

    @contextmanager
    def pipeline_run(self, run_name: str, params: dict, tags: dict):
        yield None

    @contextmanager
    def stage_run(self, stage: str):
        yield None

    def log_stage(self, params: dict, metrics: dict, artifacts: list[Path]) -> None:
        pass


class MlflowTracker:
    def __init__(self, uri: str, experiment: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.uri = uri
        self.experiment = experiment
        self._check_reachable()
        import mlflow

        mlflow.set_tracking_uri(uri)
        try:
            if mlflow.get_experiment_by_name(experiment) is None:
                location = artifact_location_for(uri)
                if location:
                    Path(location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
                mlflow.create_experiment(experiment, artifact_location=location)
            mlflow.set_experiment(experiment)
        except Exception as error:  # mlflow raises MlflowException, sqlalchemy errors, ...
            raise TrackingError(f"MLflow tracking store {uri} cannot be used: {str(error).splitlines()[0]}.",
                                hint="Check --tracking-uri / MLFLOW_TRACKING_URI, or pass --no-tracking.") from error

    def _check_reachable(self) -> None:
        """Fail in one line, before any expensive work, when a tracking server does not answer."""
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return
        if not self.uri.startswith(("http://", "https://")):
            return
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            raise TrackingError(f"MLflow tracking server {self.uri} is unreachable ({error}).",
                                hint="Start it, fix --tracking-uri / MLFLOW_TRACKING_URI, or pass --no-tracking.") \
                from error

    @contextmanager
    def pipeline_run(self, run_name: str, params: dict, tags: dict):
        import mlflow

        with mlflow.start_run(run_name=run_name, tags=tags) as run:
            mlflow.log_params({key: str(value) for key, value in params.items()})
            yield run

    @contextmanager
    def stage_run(self, stage: str):
        import mlflow

        with mlflow.start_run(run_name=stage, nested=True, tags={"crossport.stage": stage}) as run:
            yield run

    def log_stage(self, params: dict, metrics: dict, artifacts: list[Path]) -> None:
        import mlflow

        if params:
            mlflow.log_params({key: str(value)[:6000] for key, value in params.items()})
        numeric = {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
        if numeric:
            mlflow.log_metrics(numeric)
        for path in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.is_file():
                mlflow.log_artifact(str(path))


def make_tracker(enabled: bool, uri: str | None, experiment: str):
    if not enabled:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(uri), experiment)
