"""MLflow tracking: the only module in crossport that imports mlflow.

One parent run per pipeline invocation, one nested child run per stage with its params,
metrics, wall time and artifacts; the dataset as a run input; the checkpoint, the ONNX
model and the SavedModel as MLflow models (pytorch, onnx and tensorflow flavors) with a
signature and an input example; published versions as registry versions. The default
store is SQLite in the repository's ``mlflow/`` folder with artifacts beside it;
``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere (a shared ``mlflow server``).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossport.errors import TrackingError
from crossport.interface import INPUT, LOGITS, PREDICT_KEY, SCORES
from pipelines.results import DatasetToLog, ModelToLog, StageResult

log = logging.getLogger(__name__)

MLFLOW_DIR = Path(__file__).resolve().parents[1] / "mlflow"
ALIAS = "validated"  # registry alias: the newest published (hence validated) version
TAG_PREFIX = "crossport."
# A server that stops answering mid-run fails the run within a stated time instead of MLflow's
# default 7 retries with backoff factor 2 (about 4 minutes of silence per call): 2 retries,
# backoff 1 s (waits 1 + 2 s, plus up to 1 s jitter each) and 15 s per request make any one
# call give up within 3 × 15 + 5 = 50 s; a Retry-After header may not stretch that. Environment
# variables set by the user win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
PROBE_TIMEOUT_S = 5


@dataclass
class Registration:
    model: str
    version: int
    alias: str | None
    servable_version: int
    created: bool
    model_id: str | None = None  # the MLflow LoggedModel the version was made from


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
    enabled = False

    def __init__(self) -> None:
        self.run_ids: dict[str, str] = {}
        self.experiment_id = None

    @contextmanager
    def pipeline_run(self, run_name: str, params: dict, tags: dict, environment: dict):
        yield None

    @contextmanager
    def stage_run(self, stage: str):
        yield None

    def log_stage(self, result: StageResult, wall_s: float, peak_rss_gib: float) -> None:
        pass

    def register_servable(self, **_) -> Registration | None:
        return None

    def log_headline(self, metrics: dict, tags: dict, artifacts: list[Path], **_) -> None:
        pass

    def name_run(self, title: str) -> None:
        pass


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _route_mlflow_logging() -> None:
    """MLflow's loggers print through a handler of their own ("Creating initial MLflow database tables...");
    without it their records go where every library's do: the root handler (run.log while a run is quiet)."""
    import logging

    logger = logging.getLogger("mlflow")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


class MlflowTracker:
    enabled = True

    def __init__(self, uri: str, experiment: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tqdm on the console otherwise
        self.uri = uri
        self.experiment = experiment
        self.run_ids: dict[str, str] = {}
        self._check_reachable()
        import mlflow
        from mlflow.tracking import MlflowClient

        _route_mlflow_logging()
        mlflow.set_tracking_uri(uri)
        try:
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_location_for(uri)
                if location:
                    Path(location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
                self.experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
            mlflow.set_experiment(experiment_id=self.experiment_id)
            # the UI opens an experiment in model-training mode, not GenAI mode (its own tag for the choice)
            MlflowClient(tracking_uri=uri).set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG,
                                                              EXPERIMENT_KIND)
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
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        base = self.uri.rstrip("/")
        probe = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={urllib.parse.quote(self.experiment)}"
        for url, what in ((f"{base}/health", "is unreachable"), (probe, "answers /health but its API fails")):
            try:
                with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
                    response.read()
            except urllib.error.HTTPError as error:
                if error.code == 404 and url == probe:  # the experiment does not exist yet: the API works
                    continue
                raise TrackingError(f"MLflow tracking server {self.uri} {what} (HTTP {error.code} from {url}).",
                                    hint="Check the server's log, fix --tracking-uri / MLFLOW_TRACKING_URI, or pass "
                                         "--no-tracking.") from error
            except (urllib.error.URLError, OSError) as error:
                raise TrackingError(f"MLflow tracking server {self.uri} {what} ({error}).",
                                    hint="Start it, fix --tracking-uri / MLFLOW_TRACKING_URI, or pass --no-tracking.") \
                    from error

    @contextmanager
    def pipeline_run(self, run_name: str, params: dict, tags: dict, environment: dict):
        import mlflow

        with mlflow.start_run(run_name=run_name, tags=tags) as run:
            self.run_ids["pipeline"] = run.info.run_id
            mlflow.log_params({key: str(value) for key, value in params.items()})
            mlflow.log_dict(environment, "environment.json")
            yield run

    def name_run(self, title: str) -> None:
        """Name the pipeline's parent run for what it is (summary.run_title), once the run knows."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_id = self.run_ids.get("pipeline")
        if run_id is not None:
            try:  # after the stages, failed ones included: a name that cannot be set must not hide their outcome
                MlflowClient(tracking_uri=self.uri).update_run(run_id, name=title)
            except (MlflowException, OSError) as error:
                log.warning("could not name MLflow run %s %r: %s", run_id, title, str(error).splitlines()[0])

    @contextmanager
    def stage_run(self, stage: str):
        import mlflow

        with mlflow.start_run(run_name=stage, nested=True, tags={f"{TAG_PREFIX}stage": stage}) as run:
            self.run_ids[stage] = run.info.run_id
            yield run

    def log_stage(self, result: StageResult, wall_s: float, peak_rss_gib: float) -> None:
        import mlflow

        if result.params:
            mlflow.log_params({key: str(value)[:6000] for key, value in result.params.items()})
        numeric = {key: float(value) for key, value in result.metrics.items() if isinstance(value, int | float)}
        mlflow.log_metrics({**numeric, "wall_s": wall_s, "peak_rss_gib": peak_rss_gib})
        for path in result.log_artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.is_file():
                mlflow.log_artifact(str(path))
        if result.dataset is not None:
            self._log_dataset(result.dataset, self.run_ids.get("pipeline"))
        for model in result.models:
            self._log_model(model)

    def _log_dataset(self, dataset: DatasetToLog, parent_run_id: str | None) -> None:
        """The dataset as an input of the stage's run and of the pipeline's parent run."""
        import mlflow
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.tracking import MlflowClient

        logged = mlflow.data.from_numpy(dataset.features, targets=dataset.targets, source=str(dataset.path),
                                        name=dataset.name, digest=dataset.digest[:36])
        tags = {"source": dataset.source, "sha256": dataset.digest}
        mlflow.log_input(logged, context="training", tags=tags)
        if parent_run_id is not None:
            MlflowClient(tracking_uri=self.uri).log_inputs(parent_run_id, datasets=[DatasetInput(
                logged._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training"),
                                                  *(InputTag(k, v) for k, v in tags.items())])])

    def _log_model(self, model: ModelToLog) -> None:
        """Log an artifact as an MLflow model of its flavour (:data:`MODEL_LOGGERS`), loaded from the file the stage
        wrote."""
        from pipelines.provenance import package_versions

        if model.flavor not in MODEL_LOGGERS:
            raise ValueError(f"unknown model flavor {model.flavor!r}")
        example = np.asarray(model.input_example, dtype=np.float32)
        MODEL_LOGGERS[model.flavor](model.path, example,
                                    package_versions(("torch", "onnxruntime", "onnx", "tensorflow")))

    def log_headline(self, metrics: dict, tags: dict, artifacts: list[Path], *, model_id: str | None = None,
                     dataset: dict | None = None) -> None:
        """The pipeline's parent run: its headline metrics and tags, and the parity report under ``parity/``
        (the registry version's source run, so the version page leads straight to them). The accuracies are
        also the registered model's own metrics, measured on ``dataset`` (its test split)."""
        import time

        import mlflow
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        run_id = self.run_ids.get("pipeline")
        if run_id is None:
            return
        client = MlflowClient(tracking_uri=self.uri)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                         tags=[RunTag(f"{TAG_PREFIX}{key}", str(value)) for key, value in tags.items()])
        active = mlflow.active_run()
        if model_id and active is not None:
            linked = {"dataset_name": dataset["name"], "dataset_digest": dataset["digest"][:36]} if dataset else {}
            client.log_batch(active.info.run_id, metrics=[
                Metric(key, float(value), now, 0, model_id=model_id, **linked)
                for key, value in metrics.items() if key.startswith("accuracy_")])
        for path in artifacts:
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), artifact_path="parity")

    # --- registry ------------------------------------------------------------------------

    def _version_description(self, name: str, servable_version: int, path: Path) -> str:
        """Markdown, as the registry page renders it: what the version is, and a link to its parity report in the
        source run's artifacts (the artifact viewer renders the page)."""
        report = (f"#/experiments/{self.experiment_id}/runs/{self.run_ids.get('pipeline')}/artifacts/parity/"
                  "parity.html")
        return (f"crossport servable version {servable_version} ({path}): a TF Serving SavedModel; load it with "
                f"mlflow.pyfunc.load_model('models:/{name}@{ALIAS}'). [Parity report]({report}) (also "
                f"{Path(path) / 'assets.extra' / 'parity.html'}).")

    def register_servable(self, *, name: str, servable_version: int, path: Path, saved_model_sha256: str,
                          verdict: str, example: np.ndarray, source_sha256: str | None = None) -> Registration:
        """Make published version N a registry version (idempotent: repairs a missing one).

        The version is an MLflow model: a pyfunc (:mod:`pipelines.mlflow_model`) logged in the
        active (register) run, holding a byte-identical copy of the published directory as its
        artifact ``servable``, with the signature ``images`` [N, *shape] (the version's image contract, [N, 784]
        for a 28×28 grayscale model) → ``scores`` [N, C] and
        ``example`` as its input example. Its source run is the pipeline's parent run, which
        carries the headline metrics, the dataset and the parity report. The tags name the
        published path, its version number and the sha256 of its ``saved_model.pb``.
        """
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        tags = {
            f"{TAG_PREFIX}servable_version": str(servable_version),
            f"{TAG_PREFIX}servable_path": str(Path(path).resolve()),
            f"{TAG_PREFIX}saved_model_sha256": saved_model_sha256,
            f"{TAG_PREFIX}parity_verdict": verdict,
            # a model brought as an ONNX file: the file's sha256, the lineage root
            **({f"{TAG_PREFIX}source_onnx_sha256": source_sha256} if source_sha256 else {}),
        }
        try:
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name, description="crossport servables (TF Serving SavedModels)")
            existing = find_registry_version(client, name, servable_version, str(Path(path).resolve()))
            created = existing is None
            if created:
                logged = _log_servable_model(Path(path), saved_model_sha256, example)
                version = client.create_model_version(
                    name, source=logged.model_uri, run_id=self.run_ids.get("pipeline", mlflow.active_run().info.run_id),
                    model_id=logged.model_id, tags=tags,
                    description=self._version_description(name, servable_version, path))
                number, model_id = int(version.version), logged.model_id
            else:
                number, model_id = int(existing.version), getattr(existing, "model_id", None)
                for key, value in tags.items():
                    client.set_model_version_tag(name, str(number), key, value)
                client.update_model_version(name, str(number),
                                            description=self._version_description(name, servable_version, path))
            newest = max(servable_versions_registered(client, name), default=servable_version)
            alias = None
            if servable_version >= newest and verdict == "pass":
                client.set_registered_model_alias(name, ALIAS, str(number))
                alias = ALIAS
        except MlflowException as error:
            raise TrackingError(f"registering {path} as a version of {name!r} in {self.uri} failed: "
                                f"{str(error).splitlines()[0]}.",
                                hint="The servable is published; re-run --stage register to register it.") from error
        return Registration(name, number, alias, servable_version, created, model_id)


def _log_servable_model(path: Path, saved_model_sha256: str, example: np.ndarray):
    """The published version directory as a pyfunc model in the active run (MLflow's models from code)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import pipelines.mlflow_model as code
    from crossport.interface import ASSETS_EXTRA
    from export.servable import image_contract
    from pipelines.provenance import package_versions

    classes = len((path / ASSETS_EXTRA / "labels.txt").read_text().splitlines())
    image = image_contract(path)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image.shape), INPUT)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), SCORES)]))
    versions = package_versions(("tensorflow", "numpy", "mlflow"))
    return mlflow.pyfunc.log_model(
        name=code.SERVABLE, python_model=code.__file__, artifacts={code.SERVABLE: str(path)}, signature=signature,
        input_example={INPUT: np.asarray(example, dtype=np.float32)},
        model_config={code.SHA256_KEY: saved_model_sha256},
        pip_requirements=[f"{package}=={version}" for package, version in versions.items()])


def find_registry_version(client, name: str, servable_version: int, path: str):
    """The registry version whose tags name this servable, or None."""
    for version in client.search_model_versions(f"name = '{name}'"):
        tags = version.tags or {}
        if (tags.get(f"{TAG_PREFIX}servable_version") == str(servable_version)
                and tags.get(f"{TAG_PREFIX}servable_path") == path):
            return version
    return None


def servable_versions_registered(client, name: str) -> list[int]:
    numbers = []
    for version in client.search_model_versions(f"name = '{name}'"):
        value = (version.tags or {}).get(f"{TAG_PREFIX}servable_version")
        if value and value.isdigit():
            numbers.append(int(value))
    return numbers


def registry_lookup(uri: str, name: str, *, servable_version: int | None = None, path: str | None = None,
                    registry_version: int | None = None) -> dict | None:
    """A registry version as plain data, found by servable (version + path) or by number."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        if registry_version is None:
            found = find_registry_version(client, name, servable_version, path)
            if found is None:
                return None
            registry_version = int(found.version)
        version = client.get_model_version(name, str(registry_version))  # carries the aliases
        aliases = list(getattr(version, "aliases", []) or [])
    except MlflowException:
        return None
    return {"model": name, "version": int(version.version), "tags": dict(version.tags or {}),
            "aliases": aliases, "run_id": version.run_id, "source": version.source}


def log_benchmark(uri: str, experiment: str, results: dict, out: Path) -> str:
    """One ``bench`` run: throughput, latency and cold-start numbers plus bench.json/.md/.png."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    metrics = {"ceiling_gflops": results["ceiling"]["gflops"]}
    for name, info in results["runtimes"].items():
        metrics[f"{name}_batch1_p50_ms"] = info["batch1"]["p50_ms"]
        metrics[f"{name}_batch128_examples_per_s"] = info["batch128"]["examples_per_s"]
        metrics[f"{name}_batch128_all_cores_examples_per_s"] = info["batch128_all_cores"]
        if info["cold_start"]:
            metrics[f"{name}_cold_start_s"] = info["cold_start"]["median_s"]
    for variant, info in results["serverless"].items():
        metrics[f"serverless_{variant}_cold_start_s"] = info["cold_start"]["median_s"]
    return _measurement_run("bench", results, metrics, out)


def _measurement_run(kind: str, results: dict, metrics: dict, out: Path) -> str:
    """A ``kind`` run (bench, peers) of one version: its parameters, ``metrics`` and ``<kind>.json/.md/.png``."""
    import mlflow

    with mlflow.start_run(run_name=kind, tags={f"{TAG_PREFIX}{kind}": results["version_dir"]}) as run:
        mlflow.log_params({"version_dir": results["version_dir"], "quick": results["quick"]})
        mlflow.log_metrics(metrics)
        for suffix in ("json", "md", "png"):
            mlflow.log_artifact(str(out / f"{kind}.{suffix}"))
        return run.info.run_id


def log_peers(uri: str, experiment: str, results: dict, out: Path) -> str:
    """One ``peers`` run: each converter's conversion time and each file's latency and error, plus
    peers.json/.md/.png."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from pipelines.tools.bench.peers import files_of

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    metrics = {}
    for row in results["peers"]:
        if "error" not in row:
            metrics[f"{row['peer']}_conversion_wall_s"] = row["conversion_wall_s"]
            metrics[f"{row['peer']}_import_s"] = row["import_s"]
            if row.get("conversion_vs_crossport"):  # crossport's converting ÷ this peer's whole process, per round
                metrics[f"crossport_converting_over_{row['peer']}"] = row["conversion_vs_crossport"]["median"]
    for name, entry in files_of(results):
        key = name.replace(" ", "_")
        for batch, figure in (("batch1", "p50_ms"), ("batch128", "examples_per_s")):
            if entry.get(batch):
                metrics[f"{key}_{batch}_{figure}"] = entry[batch][figure]
                if "vs_crossport" in entry[batch]:  # the median ratio to crossport's file within a round
                    metrics[f"{key}_{batch}_{figure}_over_crossport"] = entry[batch]["vs_crossport"]["median"]
        if "scores" in entry["exact"]:
            metrics[f"{key}_scores_rms_vs_exact"] = entry["exact"]["scores"]["rms"]
            if "vs_crossport" in entry["exact"]["scores"]:
                metrics[f"{key}_scores_rms_over_crossport"] = entry["exact"]["scores"]["vs_crossport"]["ratio"]
    return _measurement_run("peers", results, metrics, out)


def make_tracker(enabled: bool, uri: str | None, experiment: str):
    if not enabled:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(uri), experiment)


# --- one MLflow model logger per flavour: (the stage's file, an input example, package versions) ----------------

def _log_pytorch(path: Path, example: np.ndarray, versions: dict) -> None:
    import mlflow
    from mlflow.models import infer_signature

    from training.checkpoint import load_checkpoint, load_torch

    signature = infer_signature(example, load_torch(path)(example)[LOGITS])
    mlflow.pytorch.log_model(load_checkpoint(path).model, name="pytorch_model", signature=signature,
                             input_example=example, pip_requirements=[f"torch=={versions['torch']}"])


def _log_onnx(path: Path, example: np.ndarray, versions: dict) -> None:
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from crossport.runtimes import load_onnx

    signature = infer_signature(example, load_onnx(path)(example))
    mlflow.onnx.log_model(onnx.load(str(path), load_external_data=False), name="onnx_model",
                          signature=signature, input_example=example,
                          # the CPU build crossport runs; MLflow's default lists CUDA and warns it is absent
                          onnx_execution_providers=["CPUExecutionProvider"], pip_requirements=[
                              f"onnx=={versions['onnx']}", f"onnxruntime=={versions['onnxruntime']}"])


def _log_tensorflow(path: Path, example: np.ndarray, versions: dict) -> None:
    import mlflow
    from mlflow.models import infer_signature

    from crossport.runtimes import load_saved_model

    signature = infer_signature(example, load_saved_model(path)(example)[SCORES])
    mlflow.tensorflow.log_model(_serving_default(path), name="saved_model", signature=signature,
                                input_example=example, pip_requirements=[f"tensorflow=={versions['tensorflow']}"])


def _serving_default(path: Path):
    """The published SavedModel's predict signature as the tf.Module MLflow logs."""
    import tensorflow as tf

    from export.servable import image_contract

    image = image_contract(path)

    class ServingDefault(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.servable = tf.saved_model.load(str(path))

        @tf.function(input_signature=[tf.TensorSpec(image.batch_shape(), tf.float32, name=INPUT)])
        def __call__(self, images):
            return self.servable.signatures[PREDICT_KEY](**{INPUT: images})[SCORES]

    return ServingDefault()


MODEL_LOGGERS = {"pytorch": _log_pytorch, "onnx": _log_onnx, "tensorflow": _log_tensorflow}
