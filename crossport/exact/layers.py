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


class Permute(nn.Module):
    """``x.permute(perm)``: an ONNX Transpose that keeps the batch first."""

    def __init__(self, perm: tuple[int, ...]) -> None:
        super().__init__()
        self.perm = tuple(perm)

    def forward(self, x):
        return x.permute(*self.perm)
