"""Seeded, deterministic CPU training and self-describing checkpoints."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crossport.errors import CheckpointError
from training.model import MLP, ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "crossport-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Checkpoint:
    model: MLP
    model_config: ModelConfig
    labels: tuple[str, ...]
    dataset_digest: str
    metrics: dict


def to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 784] → float32 in [0, 1]: the scaling every servable expects."""
    return images.astype(np.float32) / np.float32(255.0)


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    progress: bool | None = None,
) -> tuple[MLP, dict]:
    """Train an MLP; same inputs and seed give the same weights on the same machine."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(config.seed)
    model = MLP(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    inputs = torch.from_numpy(to_inputs(x_train))
    targets = torch.from_numpy(y_train.astype(np.int64))
    steps = math.ceil(len(inputs) / config.batch_size)
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        with tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=progress is False,
                  leave=False) as bar:
            for start in range(0, len(inputs), config.batch_size):
                batch = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs[batch]), targets[batch])
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(batch)
                bar.update(1)
        epoch_loss = total_loss / len(inputs)
        accuracy = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch, "train_loss": epoch_loss, "test_accuracy": accuracy})
        log.info("epoch %d/%d  loss %.4f  test accuracy %.4f", epoch, config.epochs, epoch_loss, accuracy)
    model.eval()
    metrics = {
        "train_loss": history[-1]["train_loss"] if history else float("nan"),
        "test_accuracy": evaluate(model, x_test, y_test),
        "history": history,
    }
    return model, metrics


@torch.no_grad()
def logits_of(model: MLP, images: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    chunks = [model(torch.from_numpy(to_inputs(images[i : i + batch_size]))).numpy()
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.config.num_classes), np.float32)


def evaluate(model: MLP, images: np.ndarray, labels: np.ndarray) -> float:
    if len(images) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits_of(model, images), axis=1) == labels))


def save_checkpoint(path: Path, model: MLP, labels: tuple[str, ...], dataset_digest: str, metrics: dict,
                    train_config: TrainConfig) -> None:
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
    torch.save(payload, path)


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
    config = ModelConfig.from_dict(payload["model_config"])
    model = MLP(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} weights do not match its model config: {error}.") from error
    for name, tensor in payload["state_dict"].items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path} has non-finite values in {name!r}.",
                                  hint="Training diverged; lower the learning rate and re-train.")
    model.eval()
    labels = tuple(payload["labels"])
    if len(labels) != config.num_classes:
        raise CheckpointError(f"checkpoint {path} has {len(labels)} labels for {config.num_classes} classes.")
    return Checkpoint(model, config, labels, str(payload["dataset_digest"]), dict(payload["metrics"]))
