"""The run manifest: every artifact a stage made, its sha256 and its parents' sha256.

``<run-dir>/manifest.json`` is the only state passed between stages: a stage reads its
inputs through :meth:`Manifest.require`, which refuses files whose bytes changed since
they were recorded, and records what it made with :meth:`Manifest.record`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from crossport import __version__
from crossport.errors import ManifestError
from crossport.files import sha256_path, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DatasetFacts(TypedDict):
    """Written by the data (or import) stage."""

    name: str
    source: str
    digest: str  # sha256 of the arrays, the dataset's identity in lineage and MLflow
    num_classes: int
    train_examples: int
    test_examples: int


class ModelFacts(TypedDict):
    """Written by the train (or import) stage."""

    arch: str  # "mlp", "cnn" or "onnx"
    summary: str
    parameters: int
    macs_per_example: int


class PublishedFacts(TypedDict, total=False):
    """Written by publish: the version this run's files are (``identical``: an existing one already held them)."""

    version: int
    path: str
    identical: bool


class RegistryFacts(TypedDict):
    """Written by register."""

    model: str
    version: int
    alias: str | None
    servable_version: int
    servable_path: str
    tracking_uri: str


class MlflowFacts(TypedDict, total=False):
    """Written by the runner when tracking: where the run's MLflow runs are."""

    tracking_uri: str
    experiment_id: str
    runs: dict[str, str]  # stage (and "parent") -> MLflow run id


class Facts(TypedDict, total=False):
    """What a run learned about itself, for the summary, the card, tracking and lineage (``manifest.json``'s
    ``facts``): each key is written by one stage and read by the ones after it."""

    dataset: DatasetFacts
    source: dict  # import: the ONNX file as brought (path, sha256, producer, opset, normalization, labels_from...)
    model: ModelFacts
    test_accuracy: float  # train: PyTorch on the test split
    best_epoch: int | None  # train: the epoch kept
    layout: dict[str, dict[str, int]]  # tflite: per format, Transposes and where (export.layout.placement)
    parity_verdict: str  # validate: "pass" or "fail"
    accuracy: dict[str, float]  # validate: test accuracy per runtime
    published: PublishedFacts
    registry: RegistryFacts
    provenance: dict  # runner: code commit, packages, machine (pipelines.provenance)
    mlflow: MlflowFacts


@dataclass
class Artifact:
    name: str
    path: str  # relative to the run directory
    sha256: str
    stage: str
    parents: dict[str, str] = field(default_factory=dict)  # parent name → parent sha256


@dataclass
class Manifest:
    run_dir: Path
    config: dict
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    facts: Facts = field(default_factory=dict)

    @classmethod
    def create(cls, run_dir: Path, config: dict) -> Manifest:
        manifest = cls(Path(run_dir), config)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{run_dir} is not a crossport run directory: no {MANIFEST}.",
                                hint="Run --stage all first, or pass the --run-dir of an existing run.")
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ManifestError(f"{path} is unreadable: {error}.", hint="Start a new run with --stage all.") from error
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
            raise ManifestError(
                f"{path} has manifest format {found}, this crossport ({__version__}) reads format {FORMAT_VERSION}.",
                hint="Start a new run with --stage all in a new --run-dir.",
            )
        try:
            artifacts = {name: Artifact(**entry) for name, entry in payload.get("artifacts", {}).items()}
            parts = [payload.get(key, {}) for key in ("config", "stages", "facts")]
            if not all(isinstance(part, dict) for part in parts) or not all(
                    isinstance(a.path, str) and isinstance(a.sha256, str) for a in artifacts.values()):
                raise TypeError("a section is not an object")
        except (AttributeError, TypeError) as error:
            raise ManifestError(f"{path} does not have a manifest's layout ({error}).",
                                hint="Start a new run with --stage all in a new --run-dir.") from error
        return cls(Path(run_dir), *parts[:1], artifacts, *parts[1:])

    def save(self) -> None:
        write_json_atomic(self.run_dir / MANIFEST, self.to_dict())

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "crossport_version": __version__,
            "config": self.config,
            "facts": self.facts,
            "stages": self.stages,
            "artifacts": {name: asdict(artifact) for name, artifact in self.artifacts.items()},
        }

    def path(self, name: str) -> Path:
        return self.confined(self.artifacts[name])

    def confined(self, artifact: Artifact) -> Path:
        """The artifact's path, refused unless it and everything under it stay inside the run directory.

        A manifest is a file a user can edit: ``..``, an absolute path or a symlink must not
        make a stage read (or publish) a file from elsewhere.
        """
        root = self.run_dir.resolve()
        path = self.run_dir / artifact.path
        inside = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
        for entry in inside:
            if not entry.resolve().is_relative_to(root):
                raise ManifestError(
                    f"artifact {artifact.name!r} path {artifact.path!r} leads outside the run directory {self.run_dir} "
                    f"({entry} → {entry.resolve()}).",
                    hint="A manifest may only name files inside its run directory; re-run the stage that makes it.",
                )
        return path

    def record(self, name: str, path: Path, stage: str, parents: tuple[str, ...] = ()) -> Artifact:
        """Record ``path`` (inside the run directory) as artifact ``name`` made by ``stage``."""
        path = Path(path)
        artifact = Artifact(
            name=name,
            path=path.relative_to(self.run_dir).as_posix(),
            sha256=sha256_path(path),
            stage=stage,
            parents={parent: self.artifacts[parent].sha256 for parent in parents},
        )
        self.artifacts[name] = artifact
        self.save()
        return artifact

    def require(self, name: str, *, for_stage: str) -> Path:
        """The path of a recorded artifact whose bytes still match the recorded sha256."""
        artifact = self.artifacts.get(name)
        if artifact is None:
            raise ManifestError(
                f"stage {for_stage!r} needs artifact {name!r}, which {self.run_dir / MANIFEST} does not record.",
                hint=f"Run the stage that makes it first (or --stage all) with --run-dir {self.run_dir}.",
            )
        path = self.confined(artifact)
        if not path.exists():
            raise ManifestError(f"artifact {name!r} ({path}) is recorded but missing on disk.",
                                hint=f"Re-run stage {artifact.stage!r}.")
        actual = sha256_path(path)
        if actual != artifact.sha256:
            raise ManifestError(
                f"artifact {name!r} ({path}) changed since stage {artifact.stage!r} recorded it: "
                f"sha256 {actual[:12]}…, expected {artifact.sha256[:12]}….",
                hint=f"Re-run stage {artifact.stage!r} and the stages after it.",
            )
        return path
