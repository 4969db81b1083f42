"""Seeded, deterministic training, in one process or as one rank of a DistributedDataParallel run.

One loop serves every world size (:mod:`training.distributed` starts it under torchrun):
each epoch's order comes from a ``DistributedSampler`` (seed + epoch, ``set_epoch``), each
rank takes its interleaved share, and the global batch stays ``batch_size``: a rank steps on
``batch_size / world_size`` examples and DDP averages the gradients, so step k of every
world size sees the same examples, ``order[k·B : (k+1)·B]``. Dropout masks are drawn per
rank (seed + rank), so runs of different world sizes agree statistically, not bit for bit.
The checkpoint format is in ``training/checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crossport.interface import LOGITS, to_inputs
from crossport.parity import CONFIDENCE
from crossport.runtimes import chunked, examples_per_call
from training.model import ModelConfig, build_model

log = logging.getLogger(__name__)


# One tenth of the training split is held out, seeded, for per-epoch reporting and for choosing the
# epoch to keep: the test split is touched once, at the end (a conventional holdout share, not tuned).
VALIDATION_FRACTION = 0.1



def split_validation(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """(x_fit, y_fit, x_val, y_val): a seeded random tenth of the training split held out (at least one image)."""
    order = np.random.default_rng(seed).permutation(len(y))
    held = max(1, round(len(y) * VALIDATION_FRACTION)) if len(y) > 1 else 0
    fit, val = np.sort(order[held:]), np.sort(order[:held])
    return x[fit], y[fit], x[val], y[val]


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run (torchrun's RANK and WORLD_SIZE)."""

    rank: int = 0
    size: int = 1


def rank_batches(n: int, batch_size: int, seed: int, epoch: int, world: World) -> list[torch.Tensor]:
    """This rank's batches of epoch ``epoch``: its share of each global batch of ``batch_size``.

    DistributedSampler deals the seeded permutation out round-robin (rank r gets positions
    r, r + W, ...; padded by repeating its start when W does not divide n), so this rank's
    k-th slice of ``batch_size / W`` is its share of positions [k·B, (k+1)·B).
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)  # a new order every epoch, the same on every rank
    order = torch.tensor(list(sampler), dtype=torch.int64)
    share = batch_size // world.size
    return [order[start : start + share] for start in range(0, len(order), share)]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    patience: int | None = None  # stop after this many epochs without a better validation accuracy (None: never)


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    progress: bool | None = None,
    world: World = World(),
    on_epoch=None,
    device: str | None = None,
) -> tuple[nn.Module, dict]:
    """Train the configured architecture; same inputs, seed and world size give the same weights on the same machine.

    ``x_val``/``y_val`` (:func:`split_validation`) are evaluated after every epoch and choose the model kept:
    the epoch with the best validation accuracy (the earliest of equals), not the last one.

    With ``world.size`` > 1 the process group must be initialised: the model is wrapped in
    DistributedDataParallel and the returned model is the unwrapped module (its state_dict
    has no ``module.`` prefix). Rank 0 evaluates and reports; ``on_epoch(row)`` is called on
    every rank after each epoch. ``device`` (a rank's GPU, e.g. ``cuda:1``) holds the model and each batch; the
    returned model is on the CPU.
    """
    with deterministic(True):  # and the process's own setting back afterwards: export and validate are not training
        return _train(x_train, y_train, x_val, y_val, model_config, config, progress, world, on_epoch, device)


def _train(x_train, y_train, x_val, y_val, model_config, config, progress, world, on_epoch, device):
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    model = build_model(model_config)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    torch.manual_seed(config.seed + world.rank)  # dropout masks: independent per rank, rank 0 as one process
    device = torch.device(device or "cpu")
    model.to(device)
    trained = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(trained.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    pixels = torch.from_numpy(np.ascontiguousarray(x_train))  # uint8: each batch scaled as it is drawn (float_batch)
    targets = torch.from_numpy(y_train.astype(np.int64))
    steps = math.ceil(len(pixels) / config.batch_size)
    lead = world.rank == 0
    history = []
    start: dict | None = None
    best: tuple[float, int, dict] | None = None  # (validation accuracy, epoch, weights) of the epoch kept
    for epoch in range(1, config.epochs + 1):
        trained.train()
        total_loss, seen = 0.0, 0
        # progress None: a bar only on a terminal (tqdm's own check), never in a redirected log
        with tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                  disable=(None if progress is None else not progress) if lead else True, leave=False) as bar:
            for batch in rank_batches(len(pixels), config.batch_size, config.seed, epoch - 1, world):
                optimizer.zero_grad(set_to_none=True)
                losses = loss_fn(trained(float_batch(pixels, batch, device)), targets[batch].to(device))
                loss = losses.mean()
                if start is None:  # the untrained model's loss, per example: what divergence is measured against
                    start = _spread(losses.detach())
                loss.backward()  # DDP: gradients averaged over the ranks here
                optimizer.step()
                total_loss += loss.item() * len(batch)
                seen += len(batch)
                bar.update(1)
        row = {"epoch": epoch, "train_loss": _mean_over_ranks(total_loss, seen, world)}
        if lead:
            recalibrate_batch_norm(model, pixels, config.batch_size, config.seed, device)
            row["val_accuracy"] = evaluate(model, x_val, y_val)
            history.append(row)
            log.info("epoch %d/%d  loss %.4f  validation accuracy %.4f", epoch, config.epochs, row["train_loss"],
                     row["val_accuracy"])
            if best is None or row["val_accuracy"] > best[0]:
                best = (row["val_accuracy"], epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if on_epoch is not None:
            on_epoch(row)
        # every rank has the same config: without patience no rank asks, and no epoch pays for a broadcast
        if config.patience is not None and _stop_early(lead and best is not None and epoch - best[1] >= config.patience,
                                                       world, device):
            if lead:
                log.info("early stop after epoch %d: no better validation accuracy for %d epochs (best: epoch %d)",
                         epoch, config.patience, best[1])
            break
    if best is not None:
        model.load_state_dict(best[2])
    model.eval().cpu()
    kept = history[best[1] - 1] if best is not None else {}
    metrics = {
        "train_loss": kept.get("train_loss", float("nan")),
        "val_accuracy": kept.get("val_accuracy", float("nan")),
        "best_epoch": best[1] if best is not None else None,
        "history": history,
        "world_size": world.size,
        "start_loss": start if lead else None,
    }
    return model, metrics


def _spread(losses: torch.Tensor) -> dict:
    values = losses.double().cpu()
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
            "n": len(values)}


def divergence(metrics: dict, learning_rate: float) -> str | None:
    """Why the kept model is a diverged one (None if it is not): a one-line refusal for the train stage.

    Training diverged when the kept epoch's mean training loss is not finite, or is above the untrained
    model's loss on the first batch by more than its one-sided :data:`crossport.parity.CONFIDENCE` bound
    (mean + z·std/√n over that batch's per-example losses): every update made the model worse than
    where it started, which no learning rate that trains does.
    """
    from statistics import NormalDist

    kept, start = metrics.get("train_loss"), metrics.get("start_loss")
    if kept is None or start is None:
        return None
    bound = start["mean"] + NormalDist().inv_cdf(CONFIDENCE) * start["std"] / math.sqrt(start["n"])
    if math.isfinite(kept) and kept <= bound:
        return None
    return (f"training diverged: the kept epoch's mean training loss is {kept:.4g}, against {start['mean']:.4g} "
            f"for the untrained model on its first batch of {start['n']} (above its "
            f"{CONFIDENCE:.0%} bound {bound:.4g}); lower --learning-rate (now {learning_rate:g}) and "
            f"run --stage train again.")


def _stop_early(decided: bool, world: World, device) -> bool:
    """Rank 0's decision (it alone evaluates), the same on every rank: they must leave the loop together."""
    if world.size == 1:
        return decided
    import torch.distributed as dist

    flag = torch.tensor([1 if decided else 0], dtype=torch.int64, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _mean_over_ranks(total: float, count: int, world: World) -> float:
    """The epoch's mean training loss over every example every rank saw."""
    if world.size == 1:
        return total / max(count, 1)
    import torch.distributed as dist

    sums = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(sums)
    return float(sums[0] / max(sums[1], 1.0))


PRECISE_BN_BATCHES = 200  # training batches the BatchNorm statistics are recomputed on, as fvcore's precise BN does


def float_batch(pixels: torch.Tensor, index: torch.Tensor, device) -> torch.Tensor:
    """The model inputs of the uint8 images at ``index``: the bits :func:`crossport.interface.to_inputs` gives (a
    float32 division by 255, correctly rounded either way). Training scales each batch as it draws it: a float32
    copy of EMNIST byclass's 697,932 training images would be 2.2 GB beside their 0.55 GB of pixels."""
    return pixels[index].to(device=device, dtype=torch.float32) / 255.0


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, pixels: torch.Tensor, batch_size: int, seed: int, device) -> None:
    """Recompute every BatchNorm's running mean and variance as the plain average over up to PRECISE_BN_BATCHES
    training batches (a seeded sample), with the current weights and the rest of the network as in eval mode.

    Training keeps them as an exponential average whose start is the untrained network's (torchvision's
    MobileNets and EfficientNets use momentum 0.01): after a few hundred steps they still describe the first
    weights, not the last, and in eval mode a MobileNetV3 trained on digits to a loss of 0.1 answered one class
    (11 % accuracy; 90 % with its statistics recomputed). No-op for a network without BatchNorm."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative: every batch weighs the same
        norm.train()
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(pixels))[: PRECISE_BN_BATCHES * batch_size])
    for start in range(0, len(order), batch_size):
        if len(order) - start > 1:  # a batch of one has no variance to measure (BatchNorm refuses it in training)
            model(float_batch(pixels, order[start : start + batch_size], device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """The model's logits of uint8 ``images``, ``batch_size`` images a call: by default as many as keep one call's
    activations within the runtimes' budget (:func:`crossport.runtimes.examples_per_call`): 8,192 images at once, as
    before, are 0.8 GB of the CNN's first layer's output alone."""
    model.eval()
    device = next(model.parameters()).device
    if len(images) == 0:
        return np.zeros((0, model.config.num_classes), np.float32)

    def call(part: np.ndarray) -> dict[str, np.ndarray]:
        return {LOGITS: model(torch.from_numpy(to_inputs(part)).to(device)).cpu().numpy()}

    if batch_size is None:
        batch_size = examples_per_call(activation_elements(model, lambda: call(images[:1])))
    return chunked(call, batch_size)(images)[LOGITS]


@contextlib.contextmanager
def deterministic(enabled: bool):
    """PyTorch's deterministic algorithms on or off for the body, and the process's own setting back afterwards."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def activation_elements(model: nn.Module, forward) -> int:
    """Values that ``forward()`` (one example through ``model``) makes, summed over every layer's outputs: more than
    a no-grad call holds at once, which frees each output once the next layer has read it."""
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += sum(tensor.numel() for tensor in (output if isinstance(output, tuple) else (output,))
                     if isinstance(tensor, torch.Tensor))

    layers = [module for module in model.modules() if not any(True for _ in module.children())]
    handles = [layer.register_forward_hook(count) for layer in layers]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return total


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    if len(images) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits_of(model, images), axis=1) == labels))


