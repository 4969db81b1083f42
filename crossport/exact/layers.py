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
    over the spatial axes (the head of a ResNet or MobileNet); [N, C] without ``keepdims``."""

    def __init__(self, size: int, keepdims: bool = True) -> None:
        super().__init__()
        self.size, self.keepdims = int(size), bool(keepdims)

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


class Permute(nn.Module):
    """``x.permute(perm)``: an ONNX Transpose that keeps the batch first."""

    def __init__(self, perm: tuple[int, ...]) -> None:
        super().__init__()
        self.perm = tuple(perm)

    def forward(self, x):
        return x.permute(*self.perm)


class Add(nn.Module):
    """``a + b`` of two computed tensors, with broadcasting: a residual connection."""

    def forward(self, a, b):
        return a + b


class Sub(nn.Module):
    """``a − b`` of two computed tensors, with broadcasting."""

    def forward(self, a, b):
        return a - b


class Mul(nn.Module):
    """``a * b`` of two computed tensors, with broadcasting: a squeeze-excitation's channel scale, a HardSwish
    written as ``x * HardSigmoid(x)``."""

    def forward(self, a, b):
        return a * b


class Concat(nn.Module):
    """The inputs joined along ``dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)

    def forward(self, *parts):
        import torch

        return torch.cat(parts, dim=self.dim)


class HardSigmoid(nn.Module):
    """``clip(alpha·x + beta, 0, 1)``: ONNX HardSigmoid (PyTorch's Hardsigmoid is alpha 1/6, beta 1/2)."""

    def __init__(self, alpha: float = 1 / 6, beta: float = 0.5) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, x):
        return (self.alpha * x + self.beta).clamp(0.0, 1.0)


class WithConstant(nn.Module):
    """``x ∘ c`` for a constant ``c`` (broadcast), ``op`` one of add, sub, rsub (c − x), mul, div: an input
    normalisation written into the graph, ``(x − mean) / std``."""

    def __init__(self, op: str, constant) -> None:
        import torch

        super().__init__()
        self.op = op
        self.register_buffer("constant", torch.as_tensor(constant))

    def forward(self, x):
        c = self.constant
        return {"add": lambda: x + c, "sub": lambda: x - c, "rsub": lambda: c - x, "mul": lambda: x * c,
                "div": lambda: x / c}[self.op]()


class Pad(nn.Module):
    """Constant padding of the last two dimensions by ``pads`` (left, right, top, bottom), as F.pad takes them."""

    def __init__(self, pads: tuple[int, int, int, int], value: float = 0.0) -> None:
        super().__init__()
        self.pads, self.value = tuple(int(p) for p in pads), float(value)

    def forward(self, x):
        from torch.nn import functional as F

        return F.pad(x, self.pads, value=self.value)


class HardSwish(HardSigmoid):
    """``x · clip(alpha·x + beta, 0, 1)``: ONNX HardSwish, defined by its function body as a HardSigmoid with alpha
    the float32 number nearest 1/6 (PyTorch's Hardswish is exactly 1/6)."""

    def forward(self, x):
        return x * super().forward(x)
