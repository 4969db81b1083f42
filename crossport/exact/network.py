"""A network as the exact reference sees it: a directed acyclic graph of layers, each with its error rule.

Two readers make one: :func:`from_torch` traces a PyTorch model (torch.fx) and
:func:`crossport.exact.graph.network_from_onnx` reads an ONNX graph, so one evaluator
(:func:`crossport.exact.exact_outputs`) serves trained models and models brought as files.
Each step is a layer (an ``nn.Module`` whose type has a rule in :mod:`crossport.exact.rules`),
the names of the tensors it reads and the name of the one it writes, in an order where every
tensor is written before it is read. A chain is the special case where each step reads the
one before.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn  # imported only by the stages that compute exact references

from crossport.errors import CrossportError
from crossport.exact.layers import Add, Concat, GlobalAveragePool, Mul, Sub, WithConstant


@dataclass(frozen=True)
class Step:
    layer: nn.Module
    inputs: tuple[str, ...]
    output: str


class Network(nn.Module):
    """Steps from ``source`` to ``target``; a module itself, so that counting and export code can run it."""

    def __init__(self, steps: list[Step], source: str, target: str, config=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(step.layer for step in steps)
        self.wiring = [(step.inputs, step.output) for step in steps]
        self.source, self.target = source, target
        if config is not None:
            self.config = config  # what training.model's counters read from a network (input_shape)

    @property
    def steps(self) -> list[Step]:
        return [Step(layer, inputs, output) for layer, (inputs, output) in zip(self.layers, self.wiring, strict=True)]

    def last_reads(self) -> dict[str, int]:
        """Each tensor's last reader (the step index after which it may be freed)."""
        return {name: steps[-1] for name, steps in self.readers().items()}

    def readers(self) -> dict[str, tuple[int, ...]]:
        """The steps that read each tensor."""
        found: dict[str, tuple[int, ...]] = {}
        for index, (inputs, _) in enumerate(self.wiring):
            for name in dict.fromkeys(inputs):
                found[name] = (*found.get(name, ()), index)
        return found

    def forward(self, x):
        values = {self.source: x}
        for layer, (inputs, output) in zip(self.layers, self.wiring, strict=True):
            values[output] = layer(*(values[name] for name in inputs))
        return values[self.target]


def as_network(model: nn.Module, sample=None) -> Network:
    return model if isinstance(model, Network) else from_torch(model, sample)


# --- PyTorch: torch.fx's graph, functions and methods written as the layers that have rules ---------------------

def _module(node, traced, shapes):
    layer = traced.get_submodule(node.target)
    if isinstance(layer, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool1d):
        size = layer.output_size
        if size not in (1, (1, 1)):
            raise _refuse(node, f"an adaptive average pool to {size}, not to one value per channel")
        return _pool(node, shapes)
    return layer


def _pool(node, shapes):
    shape = shapes[node.args[0].name]
    if len(shape) != 4:
        raise _refuse(node, "a global average pool over a tensor that is not [N, C, H, W]")
    return GlobalAveragePool(shape[2] * shape[3])


def _flatten(node, shapes):
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if start != 1 or end != -1:
        raise _refuse(node, "a flatten other than of every dimension after the batch")
    return nn.Flatten()


def _function(node, shapes):
    from torch.nn import functional as F

    target = node.target
    binary = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", operator.mul: "mul",
              torch.mul: "mul", operator.truediv: "div", torch.div: "div"}.get(target)
    if binary and len(node.args) == 2 and not node.kwargs:
        return _binary(node, binary)
    if target is torch.flatten:
        return _flatten(node, shapes)
    if target in (F.adaptive_avg_pool2d,) and node.args[1] in (1, (1, 1)):
        return _pool(node, shapes)
    if target in (torch.cat, torch.concat):
        return Concat(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))
    if target in (F.relu, torch.relu):
        return nn.ReLU()
    raise _refuse(node, "function not supported")


def _binary(node, op: str):
    """Of two computed tensors, a two-input step; with a number, ``x ∘ c`` (:class:`WithConstant`)."""
    from torch import fx

    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if op == "div":
            raise _refuse(node, "a division of two computed tensors")
        return {"add": Add, "sub": Sub, "mul": Mul}[op]()
    if not isinstance(a, int | float) and not isinstance(b, int | float):
        raise _refuse(node, "an operand that is neither a computed tensor nor a number")
    if isinstance(a, fx.Node):
        return WithConstant(op, torch.tensor(float(b)))
    if op == "div":
        raise _refuse(node, "a number divided by a computed tensor")
    return WithConstant({"sub": "rsub"}.get(op, op), torch.tensor(float(a)))


def _method(node, shapes):
    if node.target == "flatten":
        return _flatten(node, shapes)
    raise _refuse(node, "method not supported")


def _refuse(node, why: str) -> CrossportError:
    from crossport.exact.rules import RULES

    return CrossportError(
        f"no float32 error model for {node.op} {node.name!r} ({node.target}): {why}; the parity gate's exact "
        f"reference covers graphs of {', '.join(t.__name__ for t in RULES)}.",
        hint="Add the layer's rule to crossport/exact/rules.py (how it adds and passes on rounding error) and, "
             "for a function, its entry to crossport/exact/network.py.")


def example_shape(config) -> tuple[int, ...]:
    """One example's shape: a graph read from ONNX declares it (``input_shape``); crossport's own models take
    ``input_size`` values (784 without a config)."""
    from crossport.interface import INPUT_SIZE

    return tuple(getattr(config, "input_shape", None) or (getattr(config, "input_size", INPUT_SIZE),))


def from_torch(model: nn.Module, sample=None) -> Network:
    """``model`` traced by torch.fx into steps (a copy: in-place activations made out-of-place); ``sample``, one
    input, gives the shapes a global average pool needs (default: zeros of :func:`example_shape`)."""
    import copy

    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp
    from torch.nn import functional as F

    model = copy.deepcopy(model).eval()
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:
        raise CrossportError(
            f"the model's forward cannot be traced by torch.fx ({type(error).__name__}: {error}), so the parity "
            "gate cannot read its layers.", hint="Keep data-dependent control flow out of forward().") from None
    needs_shapes = any((node.op == "call_function" and node.target is F.adaptive_avg_pool2d)
                       or (node.op == "call_module" and isinstance(traced.get_submodule(node.target),
                                                                  nn.AdaptiveAvgPool2d))
                       for node in traced.graph.nodes)
    if needs_shapes:  # a global average pool divides by its input's height × width
        if sample is None:
            sample = torch.zeros(1, *example_shape(getattr(model, "config", None)))
        ShapeProp(traced).propagate(sample[:1].float())
    shapes = {node.name: tuple(node.meta["tensor_meta"].shape) for node in traced.graph.nodes
              if "tensor_meta" in node.meta}
    steps, source, target = [], None, None
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            source = node.name
            continue
        if node.op == "output":
            target = node.args[0].name
            continue
        if node.op == "get_attr":
            raise _refuse(node, "a parameter used outside a layer")
        reader = {"call_module": lambda n, s: _module(n, traced, s), "call_function": _function,
                  "call_method": _method}[node.op]
        layer = reader(node, shapes)
        if hasattr(layer, "inplace"):
            layer.inplace = False  # a tensor may be read again after this step (a residual branch)
        inputs = tuple(arg.name for arg in node.args if isinstance(arg, fx.Node))
        if isinstance(layer, Concat):
            inputs = tuple(arg.name for arg in node.args[0])
        steps.append(Step(layer, inputs, node.name))
    return Network(steps, source, target, getattr(model, "config", None))
