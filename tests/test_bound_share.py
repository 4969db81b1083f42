"""tools/bound_share.py: the share of the adjoint bound B that the last rounding steps carry (a lower bound L ≤ B)."""

import json

import numpy as np
import pytest
import torch

from tools.bound_share import shares


def test_the_last_steps_share_grows_to_the_whole_bound_and_recording_it_changes_nothing(pipeline_run):
    from crossport.exact import walks
    from crossport.interface import to_inputs
    from training.checkpoint import load_checkpoint

    run = pipeline_run.run_dir
    found = shares(run, 8, (1, 2, 1000))  # 1000: every source, whatever the walk has
    lows = [found["last"][k][0] for k in (1, 2, 1000)]
    assert 0 < lows[0] <= lows[1] <= lows[2]  # more of the same sum, never less
    assert found["last"][1000] == pytest.approx((1.0, 1.0))  # all of it is B itself
    assert found["sources"] >= 3  # the MLP's three layers each round
    report = json.loads((run / "parity.json").read_text())
    judged = [output["worst_ratio"] for check in report["against_exact"] if check["judged"]
              for output in check["outputs"]]
    assert found["fp32_worst"] == max(judged)

    with np.load(run / "data.npz") as data:
        images = to_inputs(data["x_test"][:8])
    model = load_checkpoint(run / "model.pt").model
    plain, recorded = ([*walks(model, images, bound="adjoint", record=record)][1:] for record in (None, []))
    for (z, error), (z2, error2) in zip(plain, recorded, strict=True):
        assert torch.equal(z, z2) and torch.equal(error.random, error2.random)
        assert torch.equal(error.systematic, error2.systematic)
