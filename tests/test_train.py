import pickle

import numpy as np
import pytest
import torch

from crossport.errors import CheckpointError
from crossport.interface import to_inputs
from tests.helpers import PicklePayload, tiny_data, tiny_model_config
from training.checkpoint import load_checkpoint, save_checkpoint
from training.model import MLP
from training.train import TrainConfig, divergence, train

CONFIG = tiny_model_config()


def test_training_is_deterministic_for_a_seed():
    runs = [train(*tiny_data(), CONFIG, TrainConfig(epochs=2, batch_size=8, seed=3), progress=False)
            for _ in range(2)]
    other = train(*tiny_data(), CONFIG, TrainConfig(epochs=2, batch_size=8, seed=4), progress=False)
    first, second = (model.state_dict() for model, _ in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[0].state_dict()[key]) for key in first)
    assert runs[0][1]["history"] == runs[1][1]["history"]
    assert len(runs[0][1]["history"]) == 2


def test_training_reduces_loss():
    _, metrics = train(*tiny_data(), CONFIG, TrainConfig(epochs=8, batch_size=8, learning_rate=3e-3), progress=False)
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_diverging_learning_rate_is_told_apart_from_one_that_trains():
    """lr 1e6 sends the loss far above the untrained model's; lr 3e-3 brings it below: only the first is refused."""
    for rate, refused in ((1e6, True), (3e-3, False)):
        _, metrics = train(*tiny_data(), CONFIG, TrainConfig(epochs=3, batch_size=8, learning_rate=rate),
                           progress=False)
        assert metrics["start_loss"]["n"] == 8
        reason = divergence(metrics, rate)
        assert (reason is not None) == refused, (rate, metrics["train_loss"], metrics["start_loss"])


def test_divergence_is_measured_against_the_untrained_models_upper_bound():
    start = {"mean": 2.0, "std": 0.4, "n": 16}  # one-sided 99 % bound: 2.0 + 2.326 * 0.4 / 4 = 2.233
    assert divergence({"train_loss": 2.2, "start_loss": start}, 1e-3) is None  # worse, but within the bound
    reason = divergence({"train_loss": 2.3, "start_loss": start}, 1e-3)
    assert reason.startswith("training diverged: the kept epoch's mean training loss is 2.3")
    assert "bound 2.233" in reason and "lower --learning-rate (now 0.001)" in reason
    assert divergence({"train_loss": float("nan"), "start_loss": start}, 1.0) is not None
    assert divergence({"train_loss": float("inf"), "start_loss": start}, 1.0) is not None
    assert divergence({"train_loss": float("nan"), "start_loss": None}, 1.0) is None  # not rank 0: nothing measured


def test_network_outputs_logits_not_probabilities():
    torch.manual_seed(0)
    logits = MLP(CONFIG).eval()(torch.rand(4, 784))
    assert logits.shape == (4, 3)
    assert not torch.allclose(logits.sum(dim=1), torch.ones(4))  # softmax lives in the serving graph
    assert (logits < 0).any()


def save(tmp_path, model=None, labels=("x", "y", "z")):
    torch.manual_seed(0)
    model = model or MLP(CONFIG).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, labels, "d" * 64, {"test_accuracy": 0.5}, TrainConfig())
    return path, model


def test_checkpoint_describes_itself_and_round_trips(tmp_path):
    path, model = save(tmp_path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.model_config == CONFIG
    assert checkpoint.labels == ("x", "y", "z")
    assert checkpoint.dataset_digest == "d" * 64
    assert checkpoint.metrics["test_accuracy"] == 0.5
    images = torch.rand(5, 784)
    assert torch.equal(checkpoint.model(images), model(images))
    assert not checkpoint.model.training


def test_checkpoint_with_pickle_payload_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pickle-executed"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "crossport-checkpoint", "evil": PicklePayload(str(marker))}, handle, protocol=2)
    with pytest.raises(CheckpointError, match=r"could not be loaded safely.*Only crossport checkpoints"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    model = MLP(CONFIG).eval()
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("nan")
    path, _ = save(tmp_path, model)
    with pytest.raises(CheckpointError, match=r"non-finite values in 'layers.0.weight'"):
        load_checkpoint(path)


def test_missing_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist. Run the train stage first."):
        load_checkpoint(tmp_path / "absent.pt")
    path, _ = save(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="is not a crossport checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_labels_must_match_class_count(tmp_path):
    path, _ = save(tmp_path, labels=("x", "y"))
    with pytest.raises(CheckpointError, match="lists 2 labels; the model outputs 3 classes"):
        load_checkpoint(path)


def test_the_validation_split_is_seeded_disjoint_and_a_tenth():
    from training.train import split_validation

    x = np.arange(1000)[:, None].repeat(2, axis=1)
    y = np.arange(1000)
    _, y_fit, x_val, y_val = split_validation(x, y, seed=1)
    assert len(y_val) == 100 and len(y_fit) == 900 and not set(y_fit) & set(y_val)
    assert np.array_equal(split_validation(x, y, seed=1)[3], y_val)
    assert not np.array_equal(split_validation(x, y, seed=2)[3], y_val)
    assert np.array_equal(x_val[:, 0], y_val)  # images and labels stay paired


def test_the_epoch_kept_is_the_one_with_the_best_validation_accuracy():
    from training.train import evaluate

    x_train, y_train, x_val, y_val = tiny_data()
    model, metrics = train(x_train, y_train, x_val, y_val, CONFIG,
                           TrainConfig(epochs=8, batch_size=8, learning_rate=3e-2, seed=0), progress=False)
    accuracies = [row["val_accuracy"] for row in metrics["history"]]
    best = int(np.argmax(accuracies)) + 1  # the earliest of equals
    assert best < len(accuracies) and accuracies[-1] < max(accuracies)  # this seed's last epoch is not the best
    assert metrics["best_epoch"] == best and metrics["val_accuracy"] == max(accuracies)
    assert evaluate(model, x_val, y_val) == max(accuracies)  # the model returned is that epoch's
    assert "test_accuracy" not in metrics  # the test split is the caller's, evaluated once


def test_early_stopping_ends_after_patience_epochs_without_improvement():
    """A learning rate of 0 never improves on epoch 1: with patience 2 the loop stops after epoch 3, keeps epoch 1;
    without patience every epoch runs."""
    stopped = train(*tiny_data(), CONFIG, TrainConfig(epochs=10, batch_size=8, learning_rate=0.0, patience=2),
                    progress=False)[1]
    assert [row["epoch"] for row in stopped["history"]] == [1, 2, 3] and stopped["best_epoch"] == 1
    full = train(*tiny_data(), CONFIG, TrainConfig(epochs=4, batch_size=8, learning_rate=0.0), progress=False)[1]
    assert len(full["history"]) == 4


def test_batch_norm_statistics_are_recomputed_from_training_batches_with_the_rest_in_eval_mode():
    """After training, a BatchNorm's running statistics are the plain average over training batches of its input's
    batch mean and (unbiased) variance, its input computed as in eval mode (Dropout off): one batch here, so they
    equal that batch's own, which torch computes independently below. Its momentum is restored, and the random
    stream is untouched (no dropout mask drawn)."""
    from torch import nn

    from training.train import recalibrate_batch_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Dropout(0.5), nn.BatchNorm2d(3, momentum=0.01), nn.ReLU())
    pixels = torch.randint(0, 256, (16, 1, 6, 6), dtype=torch.uint8)  # training's uint8 images
    state = torch.get_rng_state()
    recalibrate_batch_norm(model, pixels, batch_size=16, seed=0, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        features = model[0](torch.from_numpy(to_inputs(pixels.numpy())))  # what the BatchNorm reads, Dropout off
    norm = model[2]
    torch.testing.assert_close(norm.running_mean, features.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(norm.running_var, features.var(dim=(0, 2, 3), unbiased=True))
    assert norm.momentum == 0.01 and not model.training


def test_a_network_without_batch_norm_is_left_as_it_is():
    from training.train import recalibrate_batch_norm

    model = MLP(tiny_model_config())
    before = {key: value.clone() for key, value in model.state_dict().items()}
    recalibrate_batch_norm(model, torch.randint(0, 256, (8, 784), dtype=torch.uint8), batch_size=4, seed=0,
                           device="cpu")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_training_batch_is_scaled_to_the_very_bits_every_servable_is_fed():
    """Training keeps the uint8 images and scales each batch as it draws it: the same float32 bits as
    crossport.interface.to_inputs, which every runtime's inputs go through, for every pixel value."""
    from training.train import float_batch

    images = np.random.default_rng(0).permutation(np.arange(256, dtype=np.uint8).repeat(3)).reshape(24, 32)
    index = torch.tensor([5, 0, 23, 5])
    scaled = float_batch(torch.from_numpy(images), index, "cpu").numpy()
    assert scaled.dtype == np.float32
    assert np.array_equal(scaled.view(np.uint32), to_inputs(images[index.numpy()]).view(np.uint32))


def test_the_logits_of_a_split_are_computed_within_the_runtimes_activation_budget(monkeypatch):
    """Training's evaluation is called with as many images as keep one call's activations (every layer's outputs,
    summed) within crossport.runtimes.CHUNK_BYTES, as every runtime is (8,192 images at once are 0.8 GB of the CNN's
    first layer's output alone). The logits are those of one call on every image."""
    import crossport.runtimes
    from training.model import ModelConfig, build_model
    from training.train import logits_of

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn", num_classes=5)).eval()
    images = np.random.default_rng(0).integers(0, 256, (40, 784), dtype=np.uint8)
    with torch.no_grad():
        whole = model(torch.from_numpy(to_inputs(images))).numpy()
    monkeypatch.setattr(crossport.runtimes, "CHUNK_BYTES", 2**20)
    calls = []  # per call: its images and every layer's output bytes

    def record(module, inputs, output):
        if not any(True for _ in module.children()):
            calls[-1][1] += output.nbytes
    hooks = [layer.register_forward_hook(record) for layer in model.modules()]
    model.register_forward_pre_hook(lambda module, inputs: calls.append([len(inputs[0]), 0]))
    logits = logits_of(model, images)
    for hook in hooks:
        hook.remove()
    np.testing.assert_allclose(logits, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    (probe, per_image), *chunks = calls  # one image, to count its activations, then the split
    assert probe == 1 and sum(size for size, _ in chunks) == len(images) and len(chunks) > 2
    assert all(activations <= 2**20 for _, activations in chunks)
    assert (chunks[0][0] + 1) * per_image > 2**20  # as many as fit, not fewer


@pytest.mark.parametrize("before", [False, True])
def test_training_is_deterministic_and_gives_the_process_its_own_setting_back(before):
    """train() runs with PyTorch's deterministic algorithms and leaves the process as it found it: the stages after it
    (export, validate's PyTorch runtime) are not training, and once ran under a setting train had left behind."""
    during, original = [], torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(before)
    try:
        train(*tiny_data(), CONFIG, TrainConfig(epochs=1, batch_size=8), progress=False,
              on_epoch=lambda row: during.append(torch.are_deterministic_algorithms_enabled()))
        assert during == [True] and torch.are_deterministic_algorithms_enabled() is before
    finally:
        torch.use_deterministic_algorithms(original)
