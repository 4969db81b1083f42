"""Self-describing checkpoints: state_dict, model config, label map, dataset digest, metrics.

Loaded with ``torch.load(weights_only=True)``: a checkpoint is tensors and plain data, so
no pickled code can run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from crossport.errors import CheckpointError, CrossportError
from crossport.files import replace_atomic
from crossport.interface import LOGITS, SCORES
from crossport.runtimes import CHUNK, Predict, chunked
from training.model import ModelConfig, build_model

CHECKPOINT_FORMAT = "crossport-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    model: torch.nn.Module
    model_config: ModelConfig
    labels: tuple[str, ...]
    dataset_digest: str
    metrics: dict


def save_checkpoint(path: Path, model: torch.nn.Module, labels: tuple[str, ...], dataset_digest: str, metrics: dict,
                    train_config) -> None:
    """``train_config``: the training loop's config dataclass, recorded as plain data."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "state_dict": model.state_dict(),
        "model_config": asdict(model.config),
        "train_config": asdict(train_config),
        "labels": list(labels),
        "dataset_digest": dataset_digest,
        "metrics": metrics,
    }
    with replace_atomic(path) as partial:
        torch.save(payload, partial)


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint safely (``weights_only=True``: no pickled code runs) and check it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.", hint="Run the train stage first.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(
            f"checkpoint {path} could not be loaded safely ({type(error).__name__}: {str(error).splitlines()[0]}).",
            hint="Only crossport checkpoints (tensors and plain data) are accepted; re-run the train stage.",
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a crossport checkpoint (no format={CHECKPOINT_FORMAT!r} field).",
                              hint="Re-run the train stage to produce one.")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('format_version')}, expected {CHECKPOINT_VERSION}.",
            hint="Re-run the train stage with this version of crossport.",
        )
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = build_model(config)
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError, CrossportError) as error:
        raise CheckpointError(f"checkpoint {path} weights do not match its model config: {error}.") from error
    for name, tensor in payload["state_dict"].items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path} has non-finite values in {name!r}.",
                                  hint="Training diverged; lower the learning rate and re-train.")
    model.eval()
    from crossport.interface import label_problem

    labels = tuple(payload["labels"])
    problem = label_problem(labels, config.num_classes)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}.", hint="Re-run the train stage to produce one.")
    return Checkpoint(model, config, labels, str(payload["dataset_digest"]), dict(payload["metrics"]))


def load_torch(checkpoint_path: Path, threads: int | None = None, chunk: int = CHUNK) -> Predict:
    """Run a checkpoint in PyTorch on float32 [N, 784] inputs (``chunk`` at a time): ``scores`` and ``logits``."""
    if threads:
        torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint_path).model

    @torch.no_grad()
    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        logits = model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return {SCORES: torch.softmax(logits, dim=-1).numpy(), LOGITS: logits.numpy()}

    return chunked(run, chunk)
