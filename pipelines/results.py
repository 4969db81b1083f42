"""What a stage hands back to the runner for tracking."""

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
class StageResult:
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    log_artifacts: list[Path] = field(default_factory=list)
    models: list[ModelToLog] = field(default_factory=list)
    dataset: DatasetToLog | None = None
