"""The reference network: an MLP over flattened 28×28 images that outputs logits.

Softmax is not part of the network: it belongs to the exported serving graph
(``translation/onnx_export.py``), so the loss sees logits and parity can compare logits
before the softmax flattens differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crossport.interface import INPUT_SIZE


@dataclass(frozen=True)
class ModelConfig:
    input_size: int = INPUT_SIZE
    hidden_sizes: tuple[int, ...] = (512, 256)
    num_classes: int = 62
    dropout: float = 0.2

    @classmethod
    def from_dict(cls, payload: dict) -> ModelConfig:
        return cls(
            input_size=int(payload["input_size"]),
            hidden_sizes=tuple(int(size) for size in payload["hidden_sizes"]),
            num_classes=int(payload["num_classes"]),
            dropout=float(payload["dropout"]),
        )


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.input_size
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
