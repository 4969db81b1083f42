"""Seeded, deterministic CPU training (the checkpoint format is in ``training/checkpoint.py``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crossport.interface import to_inputs
from training.model import ModelConfig, build_model

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    progress: bool | None = None,
) -> tuple[nn.Module, dict]:
    """Train the configured architecture; same inputs and seed give the same weights on the same machine."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(model_config)
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
def logits_of(model: nn.Module, images: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    chunks = [model(torch.from_numpy(to_inputs(images[i : i + batch_size]))).numpy()
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.config.num_classes), np.float32)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    if len(images) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits_of(model, images), axis=1) == labels))


