"""Layers the exact reference reads from an ONNX graph that PyTorch has no module for (no arithmetic: their rule
passes values and errors through, :mod:`crossport.exact.rules`)."""

from __future__ import annotations

from torch import nn  # imported only by the stages that compute exact references


class Reshape(nn.Module):
    """``x.reshape(batch, *shape)``: an ONNX Reshape or Flatten."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


class GlobalAveragePool(nn.Module):
    """The mean over each channel's ``size`` positions, kept as [N, C, 1, 1]: ONNX GlobalAveragePool, or ReduceMean
    over the spatial axes (the head of a ResNet or MobileNet)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)


class Permute(nn.Module):
    """``x.permute(perm)``: an ONNX Transpose that keeps the batch first."""

    def __init__(self, perm: tuple[int, ...]) -> None:
        super().__init__()
        self.perm = tuple(perm)

    def forward(self, x):
        return x.permute(*self.perm)
