"""One error rule per layer type: how a float32 evaluation of the layer adds rounding error and passes on the error
already in its input. :func:`crossport.exact.exact_outputs` runs a chain of layers through these rules; a new layer
type is one entry of :data:`RULES` (the model is in the package docstring, :mod:`crossport.exact`).

Each rule takes the layer (in float64), its exact input ``x``, the bound ``error`` on a float32 input's distance
from ``x`` and λ, and returns the layer's exact output and the bound on a float32 output's distance from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch  # imported only by the stages that compute exact references
from torch import nn
from torch.nn import functional as F

from crossport.exact.layers import Permute, Reshape
from crossport.exact.rounding import EXP_ULPS, U32, gamma


@dataclass(frozen=True)
class Rule:
    propagate: Callable  # (layer, x, error, λ) -> (exact output, its float32 error bound)
    terms: Callable | None = None  # layer -> rounded multiply-adds behind one output (None: the layer sums nothing)


def _linear(layer, x, error, lam_):
    g = gamma(layer.in_features + 1, lam_)
    weight = layer.weight.abs()
    bias = layer.bias.abs() if layer.bias is not None else 0.0
    return layer(x), F.linear(error, weight) + g * (F.linear(x.abs(), weight) + bias)


def _conv_terms(layer) -> int:
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


def _conv2d(layer, x, error, lam_):
    g = gamma(_conv_terms(layer) + 1, lam_)
    weight = layer.weight.abs()

    def conv(value, bias=None):
        return F.conv2d(value, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    bias = layer.bias.abs() if layer.bias is not None else None
    return layer(x), conv(error) + g * conv(x.abs(), bias)


def _batch_norm(layer, x, error, lam_):
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    shift = layer.bias - layer.running_mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale, shift = scale.view(shape), shift.view(shape)
    return x * scale + shift, scale.abs() * error + gamma(2, lam_) * (scale.abs() * x.abs() + shift.abs())


def _relu(layer, x, error, lam_):
    return torch.relu(x), error * (x > -error)  # a unit off by more than its error is off in float32 too


def _elu(layer, x, error, lam_):
    negative = x < 0
    rounding = layer.alpha * EXP_ULPS * U32 * torch.exp(torch.clamp(x, max=0)) + 2 * U32 * layer(x).abs()
    return layer(x), max(1.0, layer.alpha) * error + negative * rounding


def _max_pool(layer, x, error, lam_):
    return layer(x), layer(error)  # |max(a + δ) − max(a)| ≤ max|δ| over the window


def _moves_values(layer, x, error, lam_):
    return layer(x), layer(error)  # no arithmetic: values and their errors move together


RULES: dict[type, Rule] = {
    nn.Linear: Rule(_linear, lambda layer: layer.in_features + (layer.bias is not None)),
    nn.Conv2d: Rule(_conv2d, lambda layer: _conv_terms(layer) + (layer.bias is not None)),
    nn.ReLU: Rule(_relu),
    nn.ELU: Rule(_elu),
    nn.MaxPool2d: Rule(_max_pool),
    nn.Flatten: Rule(_moves_values),
    nn.Unflatten: Rule(_moves_values),
    nn.Dropout: Rule(_moves_values),  # evaluation mode: the identity
    nn.Identity: Rule(_moves_values),
    nn.BatchNorm2d: Rule(_batch_norm, lambda layer: 2),  # one multiply, one add
    nn.BatchNorm1d: Rule(_batch_norm, lambda layer: 2),
    Reshape: Rule(_moves_values),
    Permute: Rule(_moves_values),
}


def rule_of(layer) -> Rule | None:
    """The rule of the layer's type, or of the nearest base class that has one."""
    return next((RULES[cls] for cls in type(layer).__mro__ if cls in RULES), None)
