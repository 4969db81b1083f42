"""The first-order bound (crossport.exact.tangents): the sampled estimate's confidence limits are what they state,
the adjoint computes the variance the samples estimate, the bound holds on float32 runs of deep networks and of
networks built to cross their kinks, and the gate keeps the narrower bound part by part."""

import numpy as np
import pytest
import torch
from torch import nn

from crossport.exact import exact_outputs, walks
from crossport.exact.rounding import FLOAT32_TINY, SAMPLES, sampled_confidence
from crossport.parity import FLOAT64_OVER_FLOAT32


def test_the_chi_square_limit_fails_no_more_often_than_its_share_of_the_false_alarm():
    """S/q ≥ σ² but with probability share/outputs: checked on Gaussians at a false-alarm rate large enough to see."""
    rng = np.random.default_rng(0)
    outputs, false_alarm = 10, 0.2
    _, q = sampled_confidence(outputs, SAMPLES, false_alarm)
    trials = 40_000
    sums = (rng.normal(0.0, 1.0, (trials, SAMPLES)) ** 2).sum(axis=1)
    allowed = false_alarm / 2 / outputs  # the χ² half of the chance, shared by the outputs
    observed = np.mean(sums / q < 1.0)
    # the observed rate of a Bernoulli(allowed) over 40,000 trials stays within 5 of its standard deviations
    assert observed <= allowed + 5 * np.sqrt(allowed * (1 - allowed) / trials)
    assert observed >= allowed - 5 * np.sqrt(allowed * (1 - allowed) / trials)  # and the limit is not loose either


def test_hoeffding_and_chi_square_together_hold_for_a_sum_of_roundings():
    """A sum Σ c_r·δ_r of uniform roundings, its sampled bound t·u·√(S/q) from Gaussian tangents: a run of 20,000
    such sums leaves its bound no more often than the chance stated (here large enough to count)."""
    from crossport.exact.rounding import U32

    rng = np.random.default_rng(1)
    outputs, false_alarm = 20_000, 0.5
    t, q = sampled_confidence(outputs, SAMPLES, false_alarm)
    c = rng.lognormal(0.0, 2.0, (outputs, 50))  # coefficients of every scale
    rounded = (c * rng.uniform(-U32, U32, c.shape)).sum(axis=1)
    tangents = np.einsum("nr,snr->sn", c, rng.normal(size=(SAMPLES, *c.shape)))
    bound = t * U32 * np.sqrt((tangents**2).sum(axis=0) / q)
    assert np.mean(np.abs(rounded) > bound) <= false_alarm / outputs


@pytest.mark.parametrize(("classes", "asked", "bound"), [(4, None, "adjoint"), (2 * SAMPLES + 1, None, "adjoint"),
                                                      (2 * SAMPLES + 1, "sampled", "sampled")])
def test_a_deep_relu_network_whose_units_sit_at_their_kinks_stays_within_the_first_order_bound(classes, asked, bound):
    """Thirty residual ReLU blocks, each bias moved so that every unit's pre-activation is 0 on some input: float32
    runs cross kinks the exact run does not, and the running bound is useless at this depth, so the first-order bound
    is the one used (crossport.exact.tangents), computed by the adjoint whatever the number of classes (above
    2·SAMPLES the sampled estimate would be cheaper, and wider: the gate does not trade power for time), and must
    still hold; so must the sampled one, when asked for."""
    from crossport.exact.layers import Add

    torch.manual_seed(3)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.relu, self.add = nn.Linear(32, 32), nn.ReLU(), Add()

        def forward(self, x):
            return self.add(x, self.relu(self.linear(x)))

    blocks = [Block() for _ in range(30)]
    model = nn.Sequential(nn.Linear(784, 32), *blocks, nn.Linear(32, classes)).eval()
    x = np.random.default_rng(4).random((64, 784), dtype=np.float32)
    with torch.no_grad():
        h = model[0](torch.from_numpy(x).double().float())
        for block in blocks:  # each bias moved so that the block's median pre-activation is 0
            pre = block.linear(h)
            block.linear.bias -= pre.median(dim=0).values
            h = block(h)
        float32 = model(torch.from_numpy(x)).double().numpy()
    exact = exact_outputs(model, x, bound=asked)
    assert exact.bound == bound
    assert np.all(np.abs(float32 - exact.values["logits"]) <= exact.bounds["logits"])


def test_shallow_networks_keep_the_running_bound():
    """(Deep ones get the first-order bound: tests/test_exact_graph.py, the torchvision architectures.)"""
    from training.model import MLP, ModelConfig

    torch.manual_seed(0)
    shallow = MLP(ModelConfig(hidden_sizes=(32,), num_classes=5)).eval()
    x = np.random.default_rng(6).random((9, 784), dtype=np.float32)
    exact = exact_outputs(shallow, x)
    walk = walks(shallow, x, bound="running")
    next(walk)
    _, running = next(walk)
    assert exact.bound == "running" and np.array_equal(exact.bounds["logits"], running.total.numpy())


def test_the_same_images_get_the_same_bound_run_to_run():
    from training.model import MLP, ModelConfig

    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden_sizes=(16,), num_classes=3)).eval()
    x = np.random.default_rng(5).random((7, 784), dtype=np.float32)
    first, second = (list(walks(model, x, bound="sampled"))[1][1] for _ in range(2))
    assert torch.equal(first.random, second.random) and torch.equal(first.systematic, second.systematic)


def test_no_walk_holds_more_images_at_once_than_its_chunk_the_pilot_included(monkeypatch):
    """The pilot that chooses the bound walks in chunks too: resnet18's 64 pilot images at once were validate's peak
    (2 GB above the imports), where its sampled walks, 8 images at a time, stayed well below."""
    import crossport.exact as exact
    from training.model import MLP, ModelConfig

    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden_sizes=(64,), num_classes=5)).eval()
    x = np.random.default_rng(7).random((100, 784), dtype=np.float32)
    whole = exact_outputs(model, x)
    walked, real = [], exact._walk
    monkeypatch.setattr(exact, "_walk", lambda network, narrow, batch, *rest, **options: (
        walked.append((rest[-1], len(batch))), real(network, narrow, batch, *rest, **options))[1])
    # the largest tensor is the input's, 784 elements: 5 images per chunk of a sampled walk, 25 of a running one
    monkeypatch.setattr(exact, "WALK_BYTES", 5 * 784 * (32 + 8 * SAMPLES))
    chunked = exact_outputs(model, x)
    assert whole.bound == chunked.bound == "running"  # the same choice of bound (a shallow network: running)
    pilots = -(-exact.PILOT // 5)
    assert [size for _, size in walked[:pilots]] == [5] * (pilots - 1) + [exact.PILOT - 5 * (pilots - 1)]
    assert [size for _, size in walked[pilots:]] == [25, 25, 25, 25]  # then the walk itself, in its own chunks
    # the same values to float64 rounding, the allowance crossport.parity.compare_graph gives two exact evaluations:
    # a float64 BLAS may sum a batch of 25 in another order than a batch of 100 (an AMD EPYC's did: 1.1e-16 apart)
    allowed = FLOAT64_OVER_FLOAT32 * (whole.bounds["logits"] + chunked.bounds["logits"])
    assert np.all(np.abs(chunked.values["logits"] - whole.values["logits"]) <= allowed)


def test_the_adjoint_computes_the_variance_the_sampled_tangents_estimate():
    """Both carriers walk one network (convolutions, BatchNorm, ReLU, a max pool, a squeeze-excitation product, a
    residual add, HardSwish, a linear head): the adjoint's Σ c_r², per output and part, is the mean square of the
    sampled tangents over 60 independent walks (960 Gaussian tangents per set: a relative standard error of 4.6 %)."""
    from crossport.exact import _walk, precisions
    from crossport.exact import tangents as carry
    from crossport.exact.layers import Add, Mul
    from crossport.exact.network import as_network

    torch.manual_seed(11)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6),
                                      nn.ReLU(), nn.MaxPool2d(2))
            self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Hardswish())
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 6, 1), nn.Sigmoid())
            self.add, self.mul = Add(), Mul()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 14 * 14, 5))

        def forward(self, x):
            h = self.stem(x)
            b = self.branch(h)
            return self.head(self.add(h, self.mul(b, self.gate(b))))

    model = Net().eval()
    with torch.no_grad():
        model.stem[2].running_mean.normal_(0, 0.1)
        model.stem[2].running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(12).random((6, 784), dtype=np.float32)
    network = as_network(model, torch.from_numpy(x[:1]))
    wide, narrow = precisions(network)
    batch = torch.from_numpy(x).double()
    with torch.no_grad():
        _, adjoint = _walk(wide, narrow, batch, 1.0, carry.Adjoint(1.0))  # t = 1: B is √Σ c_r² itself
        sums = [_walk(wide, narrow, batch, 1.0, carry.Sampled((1.0, 1.0), torch.Generator().manual_seed(seed)))[1]
                for seed in range(60)]  # t = q = 1: B is √S, S the sum of squares of SAMPLES tangents
    floor = FLOAT32_TINY  # the walk adds the flush-to-zero floor to the systematic part of either bound
    for part, added in (("random", 0.0), ("systematic", floor)):
        computed = (getattr(adjoint, part).numpy() - added) ** 2
        estimated = np.mean([(getattr(s, part).numpy() - added) ** 2 for s in sums], axis=0) / SAMPLES
        assert computed.min() > 0
        ratio = estimated / computed
        # 5.5 standard errors either side, over the 30 outputs of each part
        assert np.all(np.abs(ratio - 1) < 5.5 * np.sqrt(2 / (60 * SAMPLES))), (part, ratio)
