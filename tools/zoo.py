"""``python -m tools.zoo --out DIR``: foreign ONNX models for the gate's no-false-alarm matrix (``make matrix``).

Models crossport did not design, made the way other projects made theirs: small MLPs trained here
on ``digits`` (seeded, a few epochs) with other activations, without biases, with a Softmax head or
62 classes, and exported by PyTorch's legacy TorchScript exporter at old opsets, weights listed as
graph inputs, batch fixed at 1. ``byclass-2018`` has the shape of the 2018 file that round 2's gate
refused wrongly: 784 → 512 → 256 → 62, ELU, a Softmax output, opset 6, IR 3, evaluated on digits
where 52 of its 62 classes are never predicted. Each is brought back with ``--onnx`` and must pass.

    python -m tools.zoo --out runs/zoo        # writes DIR/<name>.onnx, one line per model
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from crossport.cli import summary_line

log = logging.getLogger("crossport.zoo")


@dataclass(frozen=True)
class Spec:
    name: str
    opset: int
    activation: str  # a torch.nn module name
    hidden: tuple[int, ...] = (128, 64)
    classes: int = 10
    bias: bool = True
    softmax_head: bool = False  # the file's only output is probabilities, as old exports were
    weights_as_inputs: bool = False  # initializers also listed as graph inputs (IR < 4 files)
    batch_one: bool = False  # no dynamic batch axis


ZOO = (
    Spec("byclass-2018", 6, "ELU", hidden=(512, 256), classes=62, softmax_head=True, weights_as_inputs=True,
         batch_one=True),
    Spec("opset7-elu", 7, "ELU", softmax_head=True, weights_as_inputs=True, batch_one=True),
    Spec("opset9-tanh", 9, "Tanh", weights_as_inputs=True),
    Spec("opset11-sigmoid", 11, "Sigmoid"),
    Spec("opset13-leakyrelu", 13, "LeakyReLU", batch_one=True),
    Spec("opset13-relu-no-bias", 13, "ReLU", bias=False),
    Spec("opset11-tanh-62-classes", 11, "Tanh", classes=62, softmax_head=True, bias=False),
)


def build(spec: Spec, out: Path, *, epochs: int = 5, seed: int = 0) -> Path:
    """Train ``spec``'s MLP on digits and export it to ``out/<name>.onnx``."""
    import torch
    from torch import nn

    from crossport.files import replace_atomic
    from crossport.interface import to_inputs
    from training.data import load_digits

    torch.manual_seed(seed)
    data = load_digits(seed=seed)
    sizes = (784, *spec.hidden, spec.classes)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out, bias=spec.bias))
        if index < len(sizes) - 2:
            layers.append(getattr(nn, spec.activation)())
    model = nn.Sequential(*layers)
    x, y = torch.from_numpy(to_inputs(data.x_train)), torch.from_numpy(data.y_train.astype("int64"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    exported = nn.Sequential(model, nn.Softmax(dim=1)) if spec.softmax_head else model
    target = out / f"{spec.name}.onnx"
    out.mkdir(parents=True, exist_ok=True)
    with replace_atomic(target) as partial:
        torch.onnx.export(exported.eval(), torch.zeros(1, 784), str(partial), opset_version=spec.opset, dynamo=False,
                          input_names=["input.1"], output_names=["output"],
                          dynamic_axes=None if spec.batch_one else {"input.1": {0: "N"}, "output": {0: "N"}},
                          keep_initializers_as_inputs=spec.weights_as_inputs, do_constant_folding=True)
    return target


EVAL_DATA = "digits-all.npz"  # every digits image (1,797), for the models with 62 classes


def eval_data_for(spec: Spec, out: Path) -> str:
    """What ``--eval-data`` each model is brought back with: the digits for 10 classes; for 62 the same images in
    an ``.npz`` of class ids, where classes 10-61 (the letters) are never the answer."""
    return "digits" if spec.classes == 10 else str(out / EVAL_DATA)


def write_eval_data(out: Path) -> Path:
    import numpy as np

    from crossport.files import save_npz_atomic
    from training.data import load_digits

    data = load_digits()
    path = out / EVAL_DATA
    save_npz_atomic(path, images=np.concatenate([data.x_train, data.x_test]),
                    labels=np.concatenate([data.y_train, data.y_test]))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.zoo", allow_abbrev=False, description=summary_line(__doc__))
    parser.add_argument("--out", type=Path, required=True, help="where the .onnx files go")
    parser.add_argument("--only", nargs="+", choices=[spec.name for spec in ZOO], help="build only these")
    args = parser.parse_args(argv)
    write_eval_data(args.out)
    for spec in ZOO:
        if args.only and spec.name not in args.only:
            continue
        path = build(spec, args.out)
        shape = " → ".join(map(str, (784, *spec.hidden, spec.classes)))
        traits = [f"opset {spec.opset}", spec.activation, shape, *(["no bias"] if not spec.bias else []),
                  *(["Softmax output"] if spec.softmax_head else []),
                  *(["weights as inputs"] if spec.weights_as_inputs else []), *(["batch 1"] if spec.batch_one else [])]
        sys.stdout.write(f"{path}  {', '.join(traits)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
