"""The model family: a small registry of architectures over flattened 28×28 images, all returning logits.

Every architecture takes ``images`` float32 [N, 784] (EMNIST orientation, values in [0, 1])
and returns logits [N, C]; any reshape to [N, 1, 28, 28] happens inside the network, so
the published input contract is the same for every model. Softmax is not part of the
network: it belongs to the exported serving graph (``translation/onnx_export.py``), so the
loss sees logits and parity can compare logits before the softmax flattens differences.

Another architecture is one :data:`ARCHITECTURES` entry: a builder and its defaults. The
benchmark's MAC count (and so its compute ceiling) is counted from the built network by
:func:`macs_per_example`, never from one model's shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from crossport.errors import ConfigError
from crossport.interface import INPUT_SIZE

SIDE = 28  # images are SIDE × SIDE, flattened to INPUT_SIZE


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of any architecture; each reads the fields it needs."""

    arch: str = "mlp"
    input_size: int = INPUT_SIZE
    num_classes: int = 62
    dropout: float = 0.2
    hidden_sizes: tuple[int, ...] = (512, 256)  # mlp: widths of the hidden layers
    channels: tuple[int, ...] = (32, 64)  # cnn: output channels of each conv block

    @classmethod
    def from_dict(cls, payload: dict) -> ModelConfig:
        """From a checkpoint's record; checkpoints written before the registry are MLPs."""
        defaults = cls()
        kept = {f.name: payload.get(f.name, getattr(defaults, f.name)) for f in fields(cls)}
        return cls(arch=str(kept["arch"]), input_size=int(kept["input_size"]), num_classes=int(kept["num_classes"]),
                   dropout=float(kept["dropout"]), hidden_sizes=tuple(int(s) for s in kept["hidden_sizes"]),
                   channels=tuple(int(c) for c in kept["channels"]))


class MLP(nn.Module):
    """Linear → ReLU → Dropout per hidden layer, then a linear head."""

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


class CNN(nn.Module):
    """Per block Conv 3×3 (no bias) → BatchNorm → ReLU → MaxPool 2×2, then Flatten → Dropout → Linear.

    The first layer reshapes [N, 784] to [N, 1, 28, 28]; the conv has no bias because the
    batch norm after it has one (the ONNX export folds the batch norm into the conv).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.Unflatten(1, (1, SIDE, SIDE))]
        width, side = 1, SIDE
        for channels in config.channels:
            layers += [nn.Conv2d(width, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.MaxPool2d(2)]
            width, side = channels, side // 2
        layers += [nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(width * side * side, config.num_classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class Torchvision(nn.Module):
    """A torchvision classifier built by its own constructor (``weights=None``: nothing is downloaded) and adapted to
    28×28 grayscale the way small-image work adapts it (as for CIFAR): the first convolution takes one channel at
    stride 1, and a ResNet's stem max-pool is dropped, so the 28×28 image is not cut to 7×7 before the first block.
    The head has the dataset's classes; the input is reshaped inside the network, as the CNN's."""

    def __init__(self, config: ModelConfig, name: str) -> None:
        super().__init__()
        from torchvision import models

        self.config = config
        options = {} if name.startswith("resnet") else {"dropout": config.dropout}
        network = getattr(models, name)(weights=None, num_classes=config.num_classes, **options)
        if name.startswith("resnet"):
            network.conv1 = _stem(network.conv1)
            network.maxpool = nn.Identity()
        else:  # MobileNets: features[0] is Conv → BatchNorm → activation
            network.features[0][0] = _stem(network.features[0][0])
        self.unflatten = nn.Unflatten(1, (1, SIDE, SIDE))
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.unflatten(images))


def _stem(conv: nn.Conv2d) -> nn.Conv2d:
    """The first convolution on one channel at stride 1 (its kernel, padding and width kept)."""
    return nn.Conv2d(1, conv.out_channels, conv.kernel_size, stride=1, padding=conv.padding, bias=conv.bias is not None)


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[ModelConfig], nn.Module]
    summary: str


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture("mlp", MLP, "784 → 512 → 256 → C, ReLU, dropout 0.2"),
    "cnn": Architecture("cnn", CNN, "2 × (Conv 3×3 → BatchNorm → ReLU → MaxPool 2) with 32, 64 channels, "
                                    "dropout 0.2, linear head"),
    "resnet18": Architecture("resnet18", lambda config: Torchvision(config, "resnet18"),
                             "torchvision resnet18 (weights=None), 1-channel 3×3 stride-1 stem, no stem max-pool"),
    "mobilenet_v2": Architecture("mobilenet_v2", lambda config: Torchvision(config, "mobilenet_v2"),
                                 "torchvision mobilenet_v2 (weights=None), 1-channel stride-1 stem, dropout 0.2"),
    "mobilenet_v3_small": Architecture("mobilenet_v3_small", lambda config: Torchvision(config, "mobilenet_v3_small"),
                                       "torchvision mobilenet_v3_small (weights=None), 1-channel stride-1 stem, "
                                       "dropout 0.2"),
}


def build_model(config: ModelConfig) -> nn.Module:
    if config.arch not in ARCHITECTURES:
        raise ConfigError(f"unknown model architecture {config.arch!r}: expected one of {', '.join(ARCHITECTURES)}.",
                          hint="Pass --model with one of those names.")
    return ARCHITECTURES[config.arch].build(config)


def gemm_shapes(model: nn.Module, batch: int = 1) -> list[tuple[int, int, int]]:
    """The network's arithmetic as matrix products (m, k, n) at ``batch``: a Linear is (batch, in, out), a Conv2d
    its im2col product (batch·H_out·W_out, in/groups·k_h·k_w, out). Counted on the built network."""
    shapes: list[tuple[int, int, int]] = []

    def record(layer, _inputs, output) -> None:
        if isinstance(layer, nn.Linear):
            shapes.append((batch, layer.in_features, layer.out_features))
        else:
            depth = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            shapes.append((batch * output.shape[-2] * output.shape[-1], depth, layer.out_channels))

    hooks = [layer.register_forward_hook(record) for layer in model.modules()
             if isinstance(layer, nn.Linear | nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            from crossport.exact.network import example_shape

            model(torch.zeros(1, *example_shape(model.config)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def macs_per_example(model: nn.Module) -> int:
    """Multiply-accumulates of one example's forward pass (Linear and Conv2d; the rest is negligible)."""
    return sum(m * k * n for m, k, n in gemm_shapes(model))
