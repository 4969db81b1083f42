"""The exact reference on graphs that branch: one rule per op, each bound holding on float32 runs of the op on
inputs built to be hard (cancellations, values at the kinks), and torchvision's own architectures read whole."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from crossport.exact import U32, exact_outputs, layers_of
from crossport.exact.layers import Add, HardSigmoid, Mul
from crossport.exact.network import Network, Step, from_torch
from crossport.exact.rules import Error, rule_of


def hard_inputs(n: int, seed: int) -> torch.Tensor:
    """float64 inputs that are float32 numbers: near the kinks of every op here (0, ±3, 6), wide and tiny ones."""
    rng = np.random.default_rng(seed)
    kinks = rng.choice([0.0, -3.0, 3.0, 6.0], n) + rng.normal(0, 1e-6, n)
    wide = rng.normal(0, 10, n)
    return torch.from_numpy(np.concatenate([kinks, wide, wide * 1e-7]).astype(np.float32).astype(np.float64))


def perturbed(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, Error]:
    """A float32 input already off its exact value by a few ulps, and that error's bound."""
    rng = np.random.default_rng(seed)
    off = (x + torch.from_numpy(rng.uniform(-1, 1, x.shape)) * 4 * U32 * x.abs()).float()
    bound = 5 * U32 * x.abs() + 1e-30  # the 4 ulps, and the rounding to float32
    return off, Error(bound, torch.zeros_like(bound))


UNARY = {
    "relu6": nn.ReLU6(),
    "clip": nn.Hardtanh(-0.5, 2.0),
    "hardsigmoid": nn.Hardsigmoid(),
    "onnx-hardsigmoid": HardSigmoid(0.2, 0.5),
    "hardswish": nn.Hardswish(),
}


@pytest.mark.parametrize("name", list(UNARY))
def test_each_unary_rule_bounds_float32_runs_of_its_op(name):
    layer = UNARY[name]
    x = hard_inputs(2000, seed=1)
    off, error = perturbed(x, seed=2)
    exact, bound = rule_of(layer).propagate(layer.double(), x, error, 1.0)
    # the op as float32 kernels compute it: PyTorch's, and the formula an exporter writes out
    for computed in (layer.float()(off).double(), _by_formula(name, off).double()):
        assert torch.all((computed - exact).abs() <= bound.total), name
    layer.double()


def _by_formula(name, x):
    if name == "hardswish":
        return x * torch.clamp(x * np.float32(1 / 6) + 0.5, 0, 1)  # HardSigmoid then Mul, as opset 13 writes it
    if name == "hardsigmoid":
        return torch.clamp(x * np.float32(1 / 6) + 0.5, 0, 1)
    return UNARY[name].float()(x)


def test_add_and_mul_bound_cancellation_and_broadcasting():
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.normal(0, 1, (64, 8, 4, 4)).astype(np.float32).astype(np.float64))
    # b cancels a to within a few ulps in half the elements: the relative error of the sum is huge there
    b = torch.where(torch.rand(a.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -a * (1 + 1e-6), a)
    b = b.float().double()
    scale = torch.from_numpy(rng.uniform(0, 1, (64, 8, 1, 1)).astype(np.float32).astype(np.float64))
    (fa, ea), (fb, eb), (fs, es) = perturbed(a, 4), perturbed(b, 5), perturbed(scale, 6)
    for layer, inputs, floats, errors in ((Add(), (a, b), (fa, fb), (ea, eb)),
                                          (Mul(), (a, scale), (fa, fs), (ea, es))):
        exact, bound = rule_of(layer).propagate(layer, inputs, errors, 1.0)
        assert torch.all((layer(*floats).double() - exact).abs() <= bound.total)
        assert exact.shape == a.shape


def test_a_residual_network_is_walked_as_a_graph():
    """x → Linear → (ReLU, identity) → Add → Linear: the exact values are float64's, float32 within B."""
    torch.manual_seed(0)
    first, second = nn.Linear(16, 16), nn.Linear(16, 3)
    network = Network([Step(first, ("x",), "h"), Step(nn.ReLU(), ("h",), "r"), Step(Add(), ("h", "r"), "s"),
                       Step(second, ("s",), "y")], "x", "y")
    x = np.random.default_rng(0).normal(0, 1, (32, 16)).astype(np.float32)
    exact = exact_outputs(network, x)
    h = first.double()(torch.from_numpy(x).double())
    expected = second.double()(h + torch.relu(h)).detach().numpy()
    np.testing.assert_allclose(exact.values["logits"], expected, rtol=1e-12)
    network.float()
    with torch.no_grad():
        error = np.abs(network(torch.from_numpy(x)).numpy() - exact.values["logits"])
    assert np.all(error <= exact.bounds["logits"])


def test_arithmetic_with_numbers_in_forward_is_traced_into_steps():
    """torch.fx reads ``2 − h·0.5``, ``/ 4``, ``+``, ``−`` of tensors as steps with rules; the float64 walk computes
    what the model computes in float64, and float32 stays within B."""

    class Arithmetic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc(x)
            return self.head((2.0 - h * 0.5) / 4.0 + torch.relu(h) - h)

    torch.manual_seed(0)
    model = Arithmetic().eval()
    x = np.random.default_rng(0).normal(0, 1, (64, 8)).astype(np.float32)
    exact = exact_outputs(model, x)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
        float32 = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(exact.values["logits"], expected, rtol=1e-12, atol=1e-15)
    assert np.all(np.abs(float32 - exact.values["logits"]) <= exact.bounds["logits"])
    assert {"WithConstant", "Add", "Sub"} <= {type(layer).__name__ for layer in layers_of(model)}


ARCHITECTURES = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")


def seeded(arch: str, classes: int = 5) -> nn.Module:
    from training.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, num_classes=classes)).eval()
    with torch.no_grad():  # batch statistics as training leaves them, not the identity of a fresh BatchNorm
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def torchvision_model(request):
    return request.param, seeded(request.param)


def test_torchvision_architectures_are_read_whole_and_computed_exactly(torchvision_model):
    name, model = torchvision_model
    x = np.random.default_rng(1).random((6, 784), dtype=np.float32)
    exact = exact_outputs(model, x)
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = wide(torch.from_numpy(x).double()).numpy()
        float32 = model(torch.from_numpy(x)).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(exact.values["logits"], expected, rtol=0, atol=1e-12 * scale)
    assert np.all(np.abs(float32 - exact.values["logits"]) <= exact.bounds["logits"])
    # the running bound of these is wider than the logits (docs/parity.md, "Deep networks"): the first-order one is
    # used, computed by the adjoint for their 10 classes, and it is under a hundredth of a logit, so only examples
    # whose top two logits are that close are near-ties
    assert exact.bound == "adjoint" and np.median(exact.bounds["logits"] / np.abs(exact.values["logits"])) < 1e-2
    kinds = {type(layer).__name__ for layer in layers_of(model)}
    assert {"Conv2d", "BatchNorm2d", "Add", "GlobalAveragePool", "Linear"} <= kinds
    if name == "mobilenet_v3_small":
        assert {"Hardswish", "Hardsigmoid", "Mul"} <= kinds


def test_a_function_without_a_rule_is_named():
    from crossport.errors import CrossportError

    class Softplus(nn.Module):
        def forward(self, x):
            return torch.nn.functional.softplus(x)

    with pytest.raises(CrossportError, match=r"no float32 error model for call_function 'softplus'"):
        from_torch(nn.Sequential(nn.Linear(4, 4), Softplus()))


@pytest.mark.slow  # a MobileNetV3 through import, translate, package, tflite, validate and publish (about 100 s)
def test_a_mobilenet_v3_brought_as_onnx_passes_the_gate_and_is_published(tmp_path, capfd):
    """A 54-layer network: its running bound is far wider than its logits, so the gate uses the first-order bound
    (docs/parity.md, "Deep networks"); the graph (HardSigmoid, Mul, Add, GlobalAveragePool) is read as
    onnx.reference computes it, every fp32 hop passes against it, and a version is published."""
    import json

    import onnx

    from crossport.exact.graph import check_network, network_from_onnx
    from tests.helpers import pipeline_here

    model = seeded("mobilenet_v3_small")
    path = tmp_path / "mobilenet_v3_small.onnx"
    torch.onnx.export(model, (torch.zeros(1, 784),), str(path), dynamo=False, opset_version=13,
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (248, 784), dtype=np.uint8)  # 48 to judge on, 200 to calibrate full int8 with
    np.savez(tmp_path / "eval.npz", x_test=pixels[:48], y_test=rng.integers(0, 5, 48), x_train=pixels[48:])
    run = tmp_path / "run"
    result = pipeline_here("--onnx", str(path), "--eval-data", str(tmp_path / "eval.npz"), "--orientation",
                           "emnist", "--run-dir", str(run), "--models-dir", str(tmp_path / "models"), "--no-tracking",
                           capsys=capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run / "parity.json").read_text())
    assert report["verdict"] == "pass" and report["error_model"]["bound"] == "adjoint"
    assert "B on this run: the first-order bound, the sum of squares of its coefficients computed" in (
        run / "parity.html").read_text()
    # every float hop and every float artifact against the exact values (48 random labelled images cannot decide the
    # full-int8 file's accuracy drop: "undecided", which publishes under the default policy)
    assert all(hop["verdict"] == "pass" for hop in report["hops"] if "int8" not in hop["candidate"])
    assert report["against_exact"] and all(check["verdict"] == "pass" for check in report["against_exact"])
    assert list((tmp_path / "models").glob("*/1/saved_model.pb"))
    # the test split held the lower bound L, B walked only where an error passed it (tests/test_lower_bound.py);
    # the probe's B is whole, and every fp32 artifact is within it there too
    walked = report["error_model"]["bound_walked"]
    assert walked["of"] == 48 and 0 <= walked["images"] <= 48
    assert all(0 <= output["probe_ratio"] <= 1 for check in report["against_exact"] if check["judged"]
               for output in check["outputs"])
    # pipelines.check judges a file the same way: L on the test split, B where the file's error passes it
    from pipelines.tools.check import check

    checked = check(run / "model_fp32.tflite", run)
    assert checked["verdict"] == "pass", checked["failures"]
    assert checked["error_model"]["bound"] == "adjoint" and checked["error_model"]["bound_walked"]["of"] == 48

    graph = onnx.load(str(run / "model.onnx"))
    # opset 13 has no HardSwish: the exporter writes x·HardSigmoid(x)
    assert {"HardSigmoid", "Mul", "Add", "GlobalAveragePool"} <= {node.op_type for node in graph.graph.node}
    x = rng.random((2, 784), dtype=np.float32)
    assert check_network(graph, x, exact_outputs(network_from_onnx(graph), x)) <= 1.0


def _one_op_graph(make_nodes, channels: int = 2, side: int = 5, opset: int = 17):
    """images [N, C·H·W] → [N, C, H, W] → the nodes ``make_nodes("x")`` returns (ending in tensor "y") → logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = make_nodes("x")
    shape = numpy_helper.from_array(np.array([-1, channels, side, side], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["images", "shape"], ["x"]), *nodes,
         helper.make_node("Flatten", ["y"], ["logits"], axis=1)],
        "one_op", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, channels * side * side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None])],
        [shape, *(numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f"
                                                     else np.int64), k) for k, v in initializers.items())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _node(op, inputs, output="y", **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, [output], **attrs)


# name -> (nodes from tensor x to tensor y, their constants): every op of the ONNX reader that a chain of
# Conv/Gemm models never exercised, on inputs in [0, 1] that cross the ops' kinks
ONNX_OPS = {
    "normalise": lambda x: ([_node("Sub", [x, "mean"], "c"), _node("Div", ["c", "std"])],
                            {"mean": [[[0.45]], [[0.5]]], "std": [[[0.22]], [[0.3]]]}),
    "add-and-mul-constants": lambda x: ([_node("Add", ["bias", x], "c"), _node("Mul", ["c", "gain"])],
                                        {"bias": [[[-0.5]], [[0.25]]], "gain": [[[3.0]], [[-1.5]]]}),
    "constant-minus-x": lambda x: ([_node("Sub", ["one", x])], {"one": [1.0]}),
    "average-pool": lambda x: ([_node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], {}),
    "average-pool-counting-pads": lambda x: ([_node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2],
                                                    pads=[1, 1, 1, 1], count_include_pad=1)], {}),
    "pad": lambda x: ([_node("Pad", [x, "pads", "value"])], {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "value": 0.5}),
    "clip": lambda x: ([_node("Clip", [x, "lo", "hi"])], {"lo": 0.2, "hi": 0.7}),
    "hard-sigmoid": lambda x: ([_node("HardSigmoid", [x], alpha=1.5, beta=-0.2)], {}),
    "hard-swish": lambda x: ([_node("Mul", [x, "six"], "c"), _node("HardSwish", ["c"])], {"six": 6.0}),
    "concat-and-sub": lambda x: ([_node("Sub", [x, "half"], "c"), _node("Relu", ["c"], "r"),
                                  _node("Sub", ["c", "r"], "d"), _node("Concat", ["d", "r"], axis=1)],
                                 {"half": 0.5}),
}


@pytest.mark.parametrize("name", list(ONNX_OPS))
def test_each_onnx_op_is_read_as_onnx_reference_computes_it_and_bounds_onnx_runtime(name):
    from crossport.exact.graph import check_network, network_from_onnx
    from crossport.runtimes import load_onnx

    model = _one_op_graph(ONNX_OPS[name])
    x = np.random.default_rng(2).random((300, 50), dtype=np.float32)
    exact = exact_outputs(network_from_onnx(model), x)
    assert check_network(model, x, exact) <= 1.0  # onnx.reference, in float64, computes the same function
    float32 = load_onnx(model)(x)["logits"]
    assert float32.shape == exact.values["logits"].shape
    assert np.all(np.abs(float32 - exact.values["logits"]) <= exact.bounds["logits"])


def test_the_hard_swish_bound_holds_for_both_forms_runtimes_compute():
    """ONNX Runtime computes HardSwish as x·clip(x/6 + 1/2, 0, 1), PyTorch as x·relu6(x + 3)/6. On exact inputs
    (the table above feeds HardSwish a rounded product, whose own allowance hides the difference) the rule bounds
    both, around both kinks and in (−3, −1.5), where the first form's rounding of x/6, u·|x|·|x/6|, is larger than
    u·|x|·h(x) (docs/parity.md, "HardSwish's rule")."""
    from crossport.exact.graph import network_from_onnx
    from crossport.runtimes import load_onnx
    from tests.helpers import around_kinks

    model = _one_op_graph(lambda x: ([_node("HardSwish", [x])], {}), channels=4, side=4, opset=14)
    x = around_kinks((-3.0, 3.0), width=64)  # 703 of them in (−3, −1.5)
    exact = exact_outputs(network_from_onnx(model), x)
    values, bound = exact.values["logits"], exact.bounds["logits"]
    onnx_runtime = load_onnx(model)(x)["logits"]
    pytorch = nn.functional.hardswish(torch.from_numpy(x)).numpy()
    assert np.all(np.abs(onnx_runtime - values) <= bound) and np.all(np.abs(pytorch - values) <= bound)
    wide = x.astype(np.float64)
    three_roundings = 3 * U32 * np.abs(wide) * np.clip(wide / 6 + 0.5, 0, 1)
    assert np.any(np.abs(onnx_runtime - values) > three_roundings)  # the first form is in the inputs


def test_a_constant_divided_by_data_is_refused_naming_the_node():
    from crossport.errors import CrossportError
    from crossport.exact.graph import network_from_onnx

    model = _one_op_graph(lambda x: ([_node("Div", ["one", x])], {"one": 1.0}))
    with pytest.raises(CrossportError, match=r"\(Div\): a constant divided by a computed tensor"):
        network_from_onnx(model)


def test_a_matmul_read_by_more_than_its_bias_add_keeps_its_own_value():
    """MatMul → Add(bias) is one Linear, unless the product is read elsewhere too: then the bias is its own step."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from crossport.exact.graph import check_network, network_from_onnx

    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [_node("MatMul", ["images", "w"], "m"), _node("Add", ["m", "b"], "a"), _node("Add", ["a", "m"], "logits")],
        "shared_product", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    x = rng.random((20, 6), dtype=np.float32)
    assert check_network(model, x, exact_outputs(network_from_onnx(model), x)) <= 1.0
