"""What a stage hands back to the runner: the artifacts it made, and what to track."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ModelToLog:
    """An artifact to log as an MLflow model: ``flavor`` is pytorch, onnx or tensorflow."""

    flavor: str
    path: Path
    input_example: np.ndarray


@dataclass
class DatasetToLog:
    name: str
    digest: str
    source: str
    path: Path  # the run's data.npz
    features: np.ndarray
    targets: np.ndarray


@dataclass
class Made:
    """An artifact a stage wrote: the runner records it in the manifest (sha256, parents, stage)."""

    name: str
    path: Path
    parents: tuple[str, ...] = ()


@dataclass
class StageResult:
    made: list[Made] = field(default_factory=list)
    # A failure the stage reports after writing what it made (validate's failing parity report,
    # which publish must be able to read and refuse): the runner records ``made``, then raises it.
    error: Exception | None = None
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    log_artifacts: list[Path] = field(default_factory=list)
    models: list[ModelToLog] = field(default_factory=list)
    dataset: DatasetToLog | None = None
