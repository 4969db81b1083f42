"""The test split's lower bound L ≤ B (crossport.exact.walks with ``lower``) and B walked only where an error passes
L (crossport.parity.near_bound, crossport.exact.complete, pipelines.stages.validate.walked_where_near):
every verdict is the one B on every row gives."""

import numpy as np
import pytest
import torch
from torch import nn

from crossport.exact import Exact, complete, exact_outputs
from crossport.parity import compare_exact, near_bound

SIGN_T = 1e9  # a sign-test threshold no error reaches: these tests judge |error| ≤ B alone


class Branching(nn.Module):
    """Convolutions, BatchNorm, ReLU, a depthwise branch with HardSwish, a squeeze-excitation product, a residual add,
    a linear head and a BatchNorm after it (a step past the last accumulating layer, its error drawn with the
    head's)."""

    def __init__(self, flat: bool = True) -> None:
        from crossport.exact.layers import Add, Mul

        super().__init__()
        self.stem = nn.Sequential(nn.Unflatten(1, (1, 12, 12)) if flat else nn.Identity(),
                                  nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Hardswish())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
        self.add, self.mul = Add(), Mul()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 12 * 12, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        h = self.stem(x)
        b = self.branch(h)
        return self.head(self.add(h, self.mul(b, self.gate(b))))


@pytest.fixture(scope="module")
def branching():
    torch.manual_seed(3)
    model = Branching().eval()
    with torch.no_grad():
        for norm in (model.stem[2], model.head[2]):
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
    return model, np.random.default_rng(4).random((13, 144), dtype=np.float32)


@pytest.fixture()
def small_chunks(monkeypatch):
    """Walk chunks of 4 images (the largest tensor is 4·12·12 elements), so that a completion has chunks to skip."""
    import crossport.exact as exact
    from crossport.exact.rounding import SAMPLES

    monkeypatch.setattr(exact, "WALK_BYTES", 4 * 4 * 144 * (32 + 8 * SAMPLES))


def test_the_lower_bound_is_part_of_b_and_a_completed_chunk_is_the_full_walks(branching, small_chunks):
    model, x = branching
    full = exact_outputs(model, x, bound="adjoint")
    low = exact_outputs(model, x, bound="adjoint", lower=True)
    assert full.walked is None and low.walked is not None and not low.walked.any()
    for name in ("logits", "scores"):
        assert np.array_equal(low.values[name], full.values[name]), name  # the same exact values, bit for bit
        assert np.all(low.bounds[name] <= full.bounds[name]), name
        assert np.all(low.systematic[name] <= full.systematic[name]), name
        assert np.all(low.bounds[name] > 0) and np.any(low.bounds[name] < full.bounds[name]), name

    done = complete(model, x, low, [5, 6])  # one chunk: images 4–7
    assert done.walked.tolist() == [i in range(4, 8) for i in range(13)]
    for name in ("logits", "scores"):
        for part in ("bounds", "systematic"):
            ours, whole, lower = (getattr(e, part)[name] for e in (done, full, low))
            assert np.array_equal(ours[4:8], whole[4:8]), (name, part)
            assert np.array_equal(np.delete(ours, range(4, 8), 0), np.delete(lower, range(4, 8), 0)), (name, part)
    assert complete(model, x, done, []).walked.sum() == 4  # nothing asked, nothing walked


def test_the_lower_bounds_sources_are_the_full_walks_last_ones_to_the_bit(branching, small_chunks):
    """L is a part of B's own sum: the variance each of its rounding sources gives every output is the one the full
    walk's last sources give (here the head's BatchNorm, the last layer that accumulates, whose folded constants are
    sized by the Linear's |W|·|x| before it)."""
    from crossport.exact import walks

    model, x = branching
    full, low = [], []
    for record, lower in ((full, False), (low, True)):
        for _ in walks(model, x, bound="adjoint", record=record, lower=lower):
            pass
    assert len(full) == len(low) == 4  # chunks
    for whole, part in zip(full, low, strict=True):
        assert 0 < len(part) < len(whole)
        assert torch.equal(part, whole[len(whole) - len(part):])


def test_only_the_adjoint_walks_a_lower_bound(branching):
    """The running bound is walked whole (it is cheap), and the sampled bound's estimate has no part that is a lower
    bound of it: ``lower`` leaves both as they are."""
    model, x = branching
    for bound in ("running", "sampled"):
        plain, lowered = (exact_outputs(model, x, bound=bound, lower=lower) for lower in (False, True))
        assert lowered.walked is None, bound
        assert np.array_equal(plain.bounds["logits"], lowered.bounds["logits"]), bound


def _exact_with(bounds: float, walked=None) -> Exact:
    values = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.5], [2.0, 1.9, 0.0], [0.0, 0.0, 4.0]])
    return Exact({"logits": values}, {"logits": np.full(values.shape, bounds)}, {"logits": np.zeros(values.shape)},
                 1.0, (), bound="adjoint", walked=walked)


def test_near_bound_names_every_row_a_check_needs_b_on():
    exact = _exact_with(1e-3, walked=np.zeros(5, dtype=bool))
    reference = {"logits": exact.values["logits"] + 5e-4}  # within L everywhere
    candidate = {"logits": exact.values["logits"].copy()}
    candidate["logits"][1, 2] += 2e-3  # beyond L
    candidate["logits"][2, 0] = np.nan  # not finite
    candidate["logits"][3, :2] = [1.9, 2.0]  # a changed answer (within L of nothing: the top two swapped)
    outputs = {"pytorch": reference, "onnx": candidate}
    assert near_bound(exact, outputs, "pytorch").tolist() == [1, 2, 3]
    # rows already walked hold B itself: nothing to walk again
    walked = _exact_with(1e-3, walked=np.array([False, True, False, True, False]))
    assert near_bound(walked, outputs, "pytorch").tolist() == [2]
    assert near_bound(exact, {"pytorch": reference}, "pytorch").tolist() == []


def test_validate_walks_b_where_a_check_comes_near_and_judges_as_b_everywhere_would(branching, small_chunks,
                                                                                      tmp_path):
    """An error between L and B on one image: that image's chunk is walked, and the check passes, as with B on every
    row; judged against L alone it would fail. An error beyond B fails after the walk too."""
    import onnx

    from crossport.exact.graph import network_from_onnx
    from pipelines.gate import ONNX
    from pipelines.stages.validate import walked_where_near

    flat, x = branching
    model = Branching(flat=False).eval()
    model.load_state_dict(flat.state_dict())
    x = x.reshape(-1, 1, 12, 12)  # images [N, 1, 12, 12], as a graph brought with --onnx may take them
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:1]),), str(path), dynamo=False, opset_version=13,
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    model = network_from_onnx(onnx.load(str(path)))  # a model brought as a graph: validate reads its exact values
    full = exact_outputs(model, x, bound="adjoint")
    low = exact_outputs(model, x, bound="adjoint", lower=True)
    gap = full.bounds["logits"][9, 2] - low.bounds["logits"][9, 2]
    assert gap > 0
    for error, passes in ((low.bounds["logits"][9, 2] + gap / 2, True), (1.5 * full.bounds["logits"][9, 2], False)):
        outputs = {name: values.copy() for name, values in full.values.items()}
        outputs["logits"][9, 2] += error
        judged = walked_where_near({"onnx": path}, ONNX, x, low, {ONNX: outputs})
        assert judged.walked.tolist() == [i in range(8, 12) for i in range(13)]
        assert np.array_equal(judged.bounds["logits"], np.where(judged.walked[:, None], full.bounds["logits"],
                                                                low.bounds["logits"]))
        assert compare_exact(ONNX, outputs, judged, SIGN_T).passed is passes
        assert compare_exact(ONNX, outputs, full, SIGN_T).passed is passes
        assert not compare_exact(ONNX, outputs, low, SIGN_T).passed
    untouched = walked_where_near({"onnx": path}, ONNX, x, low,
                                  {ONNX: {name: v.copy() for name, v in full.values.items()}})
    assert not untouched.walked.any()  # every check within L: no walk at all



def test_the_report_reads_the_probes_figures_where_the_test_split_held_l():
    """Where B was not walked on every test image, the test split's error / B is a ceiling: the tools take the
    probe's figure, and the tables say which is which."""
    from pipelines.parity_html import _exact
    from pipelines.summary import exact_ratio, parity_table

    check = {"artifact": "tflite_fp32", "judged": True, "verdict": "pass", "threshold": 6.0,
             "outputs": [{"name": "scores", "max_abs": 1e-7, "rms": 1e-8, "worst_ratio": 0.05, "probe_ratio": 0.004,
                          "sign_statistic": -9.0}]}
    lossy = {**check, "artifact": "tflite_int8_full", "judged": False,
             "outputs": [{**check["outputs"][0], "worst_ratio": 900.0, "probe_ratio": 80.0}]}
    report = {"hops": [], "against_exact": [check, lossy], "error_model": {"bound_walked": None}}
    assert exact_ratio(report) == 0.05  # B on every image: the test split's own figure
    assert "B walked on" not in parity_table(report) and "L stands in" not in _exact(report)
    report["error_model"]["bound_walked"] = {"images": 3, "of": 359}
    assert exact_ratio(report) == 0.004  # the judged artifacts' figure on the probe, the lossy one left out
    assert "B walked on 3 of 359 test images" in parity_table(report)
    assert "B was walked on 3 of 359 test images" in _exact(report) and "0.004" in _exact(report)
