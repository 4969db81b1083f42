"""The exact reference and its float32 error bound: right values, bounds that hold and scale."""

import numpy as np
import pytest
import torch
from torch import nn

from crossport.errors import CrossportError
from crossport.exact import U32, Exact, exact_outputs, fan_ins, gamma, lam
from training.model import MLP, ModelConfig


def mlp(inputs: int, hidden: tuple[int, ...], classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(ModelConfig(input_size=inputs, hidden_sizes=hidden, num_classes=classes, dropout=0.0)).eval()


def images(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size), dtype=np.float32)


def float32_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_exact_values_match_an_independent_float64_evaluation():
    model, x = mlp(784, (64, 32), 7), images(50, 784)
    exact = exact_outputs(model, x)
    layers = [layer for layer in model.layers if isinstance(layer, nn.Linear)]
    h = x.astype(np.float64)
    for index, layer in enumerate(layers):
        h = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        if index < len(layers) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(exact.values["logits"], h, rtol=1e-12, atol=1e-12)
    expected_scores = np.exp(h - h.max(1, keepdims=True))
    np.testing.assert_allclose(exact.values["scores"], expected_scores / expected_scores.sum(1, keepdims=True),
                               rtol=1e-12, atol=1e-15)
    assert exact.fan_ins == (785, 65, 33) == fan_ins(model)


@pytest.mark.parametrize("inputs", [784, 4096])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_float32_pytorch_stays_within_the_bound_at_any_width_and_logit_scale(inputs, scale):
    model, x = mlp(inputs, (512, 256), 62), images(200, inputs)
    with torch.no_grad():
        model.layers[-1].weight.mul_(scale)
        model.layers[-1].bias.mul_(scale)
    exact = exact_outputs(model, x)
    error = np.abs(float32_logits(model, x) - exact.values["logits"])
    assert np.all(error <= exact.bounds["logits"])
    # the logits really are that scale (scaling float32 weights rounds each by at most u = 6e-8)
    assert np.max(np.abs(exact.values["logits"])) == pytest.approx(scale * np.max(np.abs(
        exact_outputs(mlp(inputs, (512, 256), 62), x).values["logits"])), rel=1e-6)


def test_the_bound_scales_with_the_logits_so_one_rule_serves_every_magnitude():
    x = images(40, 784)
    small, large = mlp(784, (64,), 5), mlp(784, (64,), 5)
    with torch.no_grad():
        large.layers[-1].weight.mul_(1024.0)  # a power of two: float32 results scale exactly too
        large.layers[-1].bias.mul_(1024.0)
    bound_small = exact_outputs(small, x).bounds["logits"]
    bound_large = exact_outputs(large, x).bounds["logits"]
    np.testing.assert_allclose(bound_large, 1024.0 * bound_small, rtol=1e-6)


def test_the_bound_grows_like_the_square_root_of_the_fan_in():
    lam_ = lam(1000, 4096)
    assert gamma(4096, lam_) / gamma(1024, lam_) == pytest.approx(2.0, rel=1e-3)
    assert gamma(785, lam_) == pytest.approx(lam_ * np.sqrt(785) * U32, rel=1e-4)
    # more bounds to hold at once → larger λ, but only logarithmically
    assert 1.0 < lam(10**8, 785) / lam(10**4, 785) < 1.5


def test_a_cnn_of_conv_batchnorm_relu_pool_layers_is_covered():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(0.25), nn.Linear(16 * 7 * 7, 10),
    )
    with torch.no_grad():  # a trained-looking BatchNorm, not the identity it starts as
        for layer in model:
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
                layer.weight.uniform_(0.5, 1.5)
    model.eval()
    x = images(64, 784)
    exact = exact_outputs(model, x)
    assert exact.fan_ins == (10, 2, 73, 2, 785)
    error = np.abs(float32_logits(model, x) - exact.values["logits"])
    assert np.all(error <= exact.bounds["logits"]) and np.all(error > 0).any()


def test_a_layer_without_an_error_model_is_refused_with_a_clear_message():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2))
    with pytest.raises(CrossportError, match=r"no float32 error model for layer type\(s\) Softplus"):
        exact_outputs(model, images(3, 4))


def test_save_and_load_round_trip(tmp_path):
    exact = exact_outputs(mlp(784, (16,), 3), images(5, 784))
    exact.save(tmp_path / "exact.npz")
    loaded = Exact.load(tmp_path / "exact.npz")
    assert loaded.lam == exact.lam and loaded.fan_ins == exact.fan_ins
    for key in ("logits", "scores"):
        np.testing.assert_array_equal(loaded.values[key], exact.values[key])
        np.testing.assert_array_equal(loaded.bounds[key], exact.bounds[key])
    assert loaded.rows(slice(2)).values["logits"].shape == (2, 3)
    assert loaded.bound == exact.bound == "running"
    # a reference saved before error model 5 records a flag, not the bound's name
    with np.load(tmp_path / "exact.npz") as arrays:
        kept = {name: arrays[name] for name in arrays.files if name != "bound"}
    for flag, bound in ((True, "sampled"), (False, "running")):
        np.savez(tmp_path / "old.npz", **kept, sampled=np.bool_(flag))
        assert Exact.load(tmp_path / "old.npz").bound == bound


def test_tanh_sigmoid_and_leaky_relu_are_covered_and_their_approximations_counted_as_systematic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 16),
                          nn.LeakyReLU(0.1), nn.Linear(16, 5)).eval()
    x = images(100, 784)
    exact = exact_outputs(model, x)
    error = np.abs(float32_logits(model, x) - exact.values["logits"])
    assert np.all(error <= exact.bounds["logits"])
    # vectorised tanh/sigmoid and LeakyReLU's float32 slope may err the same way on every input: systematic
    assert np.all(exact.systematic["logits"] > 0) and np.all(exact.systematic["logits"] < exact.bounds["logits"])


def test_a_relu_mlp_has_no_systematic_error_but_its_last_bias_add_the_flush_floor_and_its_softmax_exp():
    from crossport.exact import FLOAT32_TINY

    exact = exact_outputs(mlp(784, (64, 32), 7), images(50, 784))
    logits = np.abs(exact.values["logits"])
    half_ulp = np.ldexp(1.0, np.frexp(logits)[1] - 25)  # half an ulp of each float32 logit
    np.testing.assert_allclose(exact.systematic["logits"], half_ulp + FLOAT32_TINY, rtol=1e-12)
    scores = exact.values["scores"]
    assert np.all(exact.systematic["scores"] <= 4 * U32 * scores * (1 - scores) + scores * U32 + FLOAT32_TINY)


def test_batch_norm_folds_and_its_constants_are_systematic():
    from crossport.exact import folds

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 28 * 28, 3)).eval()
    assert folds(cnn) and not folds(mlp(784, (16,), 3))
    exact = exact_outputs(cnn, images(8, 784))
    assert np.all(exact.systematic["logits"] > 100 * np.finfo(np.float32).tiny)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
                                  nn.MaxPool2d(2, stride=1, dilation=2)], ids=["2x2", "3x3-ceil-padded", "dilated"])
def test_the_max_pool_window_gap_is_the_top_two_difference_in_every_window(pool):
    from crossport.exact.rules import _window_gap

    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.concatenate([rng.normal(size=(2, 3, 9, 9)), rng.integers(0, 3, (2, 3, 9, 9))]))  # ties
    top = pool(x)
    gap = _window_gap(pool, x, top)
    assert bool((gap == 0).any())  # tied windows are in the case
    # brute force: lower the maximum of each window by a lot, pool again, and the new maximum is the second one
    for out_h in range(top.shape[2]):
        for out_w in range(top.shape[3]):
            stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
            rows = [out_h * stride - pool.padding + pool.dilation * k for k in range(pool.kernel_size)]
            cols = [out_w * stride - pool.padding + pool.dilation * k for k in range(pool.kernel_size)]
            window = x[:, :, [r for r in rows if 0 <= r < 9]][:, :, :, [c for c in cols if 0 <= c < 9]]
            values = window.flatten(2).sort(dim=2, descending=True).values
            assert torch.equal(gap[:, :, out_h, out_w], values[:, :, 0] - values[:, :, 1])


def test_rounding_that_inputs_share_is_allowed_as_systematic(tmp_path):
    """A colour classifier (tests.onnx_models.rgb_cnn: its ReLU6 saturates whole channels at 6 on flat-coloured
    images) on 2,400 such images dithered as the gate's probe is: every input of a class computes the same numbers
    from the stem on, so those roundings may keep their sign (rules.coherent). ONNX Runtime's correct run passes the
    sign test; an error that leans one way by 0.9 of what the rule moved to the systematic part passes too, and
    would be refused by the model before it (which ONNX Runtime's own run on two threads was, at T = 8.9)."""
    from unittest import mock

    import onnx

    from crossport.exact.graph import network_from_onnx
    from crossport.exact.rounding import sign_threshold
    from crossport.parity import sign_statistics
    from crossport.runtimes import load_onnx
    from pipelines.stages.validate import dithered
    from tests.onnx_models import COLOURS, colour_folder, rgb_cnn
    from translation.onnx_export import EXPORT_OPSET
    from translation.onnx_import import normalize

    rgb_cnn(tmp_path / "colours.onnx", colour_folder(tmp_path / "images"))
    model = normalize(onnx.load(str(tmp_path / "colours.onnx")), orientation="emnist", target_opset=EXPORT_OPSET).model
    rng = np.random.default_rng(1)
    colours = np.array(list(COLOURS.values()), np.float32) / 255
    flat = colours[np.arange(2400) % 4][:, None, None, :] + rng.normal(0, 40 / 255, (2400, 32, 32, 3))
    probe = dithered(np.clip(flat, 0, 1).astype(np.float32))
    exact = exact_outputs(network_from_onnx(model), probe)
    with mock.patch("crossport.exact.rules.coherent", lambda y, error, repeats=None: error):
        before = exact_outputs(network_from_onnx(model), probe)
    bound, values = exact.bounds["logits"], exact.values["logits"]
    assert np.allclose(bound, before.bounds["logits"], rtol=1e-12)  # B unchanged: only its split moved
    moved = exact.systematic["logits"] - before.systematic["logits"]
    assert np.all(moved >= 0) and moved.sum() > before.systematic["logits"].sum()

    def statistic(outputs, model_of):
        assert np.all(np.abs(outputs - values) <= bound)
        return sign_statistics((outputs - values) / bound, model_of.systematic["logits"] / bound).max()

    threshold = sign_threshold(4)
    assert statistic(load_onnx(model)(probe)["logits"].astype(np.float64), exact) < threshold
    leaning = values + 0.9 * moved  # shared roundings, all the same way: within b now, beyond b before
    assert statistic(leaning, exact) < threshold <= statistic(leaning, before)


@pytest.mark.parametrize("rows", [2, 7, 16, 17, 40])
def test_values_shared_across_the_batch_are_found_by_either_search(rows):
    """rules.repeated compares shifted copies up to PAIRWISE rows and sorts above: both mark exactly the elements
    another row repeats in the same column (checked against a plain count)."""
    from crossport.exact.rules import PAIRWISE, repeated

    flat = torch.from_numpy(np.random.default_rng(rows).integers(0, 4 * rows, (rows, 300)).astype(np.float64))
    counts = np.array([[np.sum(column == value) for value in column] for column in flat.numpy().T]).T
    assert torch.equal(repeated(flat), torch.from_numpy(counts > 1))
    assert (rows <= PAIRWISE) == (rows in (2, 7, 16))  # both searches are exercised


def _batch_norm() -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -0.5, 0.0]))  # rising, falling, and flat: every input one output
        layer.running_var.fill_(3.0)
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return layer.double()


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Dropout(0.5).eval(), nn.Identity(), nn.Flatten(),
                                   nn.Unflatten(1, (3, 2, 2)), _batch_norm(), nn.Hardtanh(-1.0, 1.5),
                                   nn.Hardsigmoid(), nn.LeakyReLU(0.1)],
                         ids=["relu", "dropout", "identity", "flatten", "unflatten", "batchnorm", "clip",
                              "hardsigmoid", "leaky-relu"])
def test_a_layer_that_keeps_repeats_gives_what_a_search_of_its_output_finds(layer):
    """Rule.repeats carries rules.repeated through a layer instead of searching its output again: off the zeros
    (which coherent ignores) it must mark exactly what a search marks, ties, sign changes, ReLU's zeros, a clamp's
    saturation and values a rounding makes equal included (a monotone layer: along the input's sort order)."""
    from crossport.exact import rules
    from crossport.exact.rules import repeated, rule_of, search

    x = torch.from_numpy(np.random.default_rng(3).integers(-60, 61, (40, 3, 2, 2)).astype(np.float64) / 10)
    x = x + torch.from_numpy(np.random.default_rng(4).integers(0, 2, x.shape) * 2.0**-50)  # ties a rounding makes
    if isinstance(layer, nn.Unflatten):
        x = x.flatten(1)
    y = rule_of(layer).propagate(layer, x, rules.Error(torch.zeros_like(x), torch.zeros_like(x)), 1.0)[0]
    inputs = search(x.flatten(1))
    carried = rule_of(layer).repeats(layer, inputs._replace(found=inputs.found.reshape(x.shape)), y)
    searched = repeated(y.flatten(1)).reshape(y.shape)
    assert torch.equal(carried.found & (y != 0), searched & (y != 0))
    assert bool((searched & (y != 0)).any())  # the case has repeats to carry
    if carried.order is not None:  # and the order carried is one that sorts the output
        ordered = y.flatten(1).gather(0, carried.order)
        assert bool(torch.all((ordered[1:] >= ordered[:-1]).all(dim=0) | (ordered[1:] <= ordered[:-1]).all(dim=0)))


def test_the_walk_gives_the_same_bounds_whether_it_carries_repeats_or_searches_each_output():
    """The walk carries repeats through the layers that keep them (Rule.repeats): on a batch with shared values
    (duplicated images, saturated pixels) and more images than a pairwise search takes (so BatchNorm's search runs
    along its input's order), the bounds are bit for bit those of searching every output."""
    import dataclasses
    from unittest import mock

    from crossport.exact import rules

    model = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4).eval(), nn.ReLU(),
                          nn.Flatten(),
                          nn.Dropout(0.2), nn.Linear(4 * 26 * 26, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    x = images(40, 784)
    x[:, :200] = 1.0  # saturated pixels: shared by every image
    x[20:] = x[:20]  # every image twice
    carried = exact_outputs(model, x)
    searching = {kind: dataclasses.replace(rule, repeats=None) for kind, rule in rules.RULES.items()}
    with mock.patch.dict(rules.RULES, searching):
        searched = exact_outputs(model, x)
    for part in ("bounds", "systematic"):
        for output in ("logits", "scores"):
            assert np.array_equal(getattr(carried, part)[output], getattr(searched, part)[output])
