"""Training on several processes with the real torchrun: same batches, same checkpoint format, same lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crossport.errors import ConfigError, TrainingError
from crossport.files import sha256_file
from crossport.parity import CONFIDENCE
from tests.helpers import ROOT, free_port, one_line_error, run_cli, wait_until
from training.train import World, rank_batches


@pytest.mark.parametrize("size", [2, 3, 4])
def test_each_step_of_every_world_size_sees_the_same_examples(size):
    n, batch = 960, 24  # n divisible by the world size: no padding
    single = rank_batches(n, batch, seed=5, epoch=2, world=World(0, 1))
    shares = [rank_batches(n, batch, seed=5, epoch=2, world=World(rank, size)) for rank in range(size)]
    assert all(len(s) == len(single) for s in shares)
    for step, expected in enumerate(single):
        together = torch.cat([share[step] for share in shares])
        assert len(together) == batch and sorted(together.tolist()) == sorted(expected.tolist())


def test_the_order_changes_every_epoch_and_pads_only_the_last_step():
    first = torch.cat(rank_batches(1000, 10, seed=0, epoch=0, world=World(0, 1)))
    second = torch.cat(rank_batches(1000, 10, seed=0, epoch=1, world=World(0, 1)))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(1000)) and not torch.equal(first, second)
    shares = [torch.cat(rank_batches(1001, 10, seed=0, epoch=0, world=World(r, 2))) for r in range(2)]
    seen = torch.cat(shares).tolist()
    assert len(seen) == 1002 and set(seen) == set(range(1001))  # one example repeated to even the ranks


def test_world_settings_are_checked_where_they_are_parsed():
    from pipelines.config import PipelineConfig

    with pytest.raises(ConfigError, match=r"--batch-size 100 is the global batch and must divide evenly over the 3"):
        PipelineConfig(batch_size=100, nproc=3)
    with pytest.raises(ConfigError, match=r"--nnodes 2 needs --rdzv-endpoint HOST:PORT"):
        PipelineConfig(nnodes=2)
    with pytest.raises(ConfigError, match=r"--node-rank 2 must be below --nnodes 2"):
        PipelineConfig(nnodes=2, node_rank=2, rdzv_endpoint="127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"--nproc must be at least 1, found 0"):
        PipelineConfig(nproc=0)


def test_threads_are_shared_out_between_the_ranks_of_a_machine():
    from training.distributed import threads_per_rank

    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank(1) == cores and threads_per_rank(cores * 4) == 1
    assert threads_per_rank(2) == max(1, cores // 2)


# --- the real torchrun --------------------------------------------------------------------------

def pipeline(root, name, *extra):
    result = run_cli("--stage", "all", "--dataset", "digits", "--epochs", "3", "--seed", "0", "--run-dir",
                     str(root / name), "--models-dir", str(root / f"{name}-models"), "--no-tracking", *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / name


def retrain(root, name, source, *extra):
    """``--stage train`` again on a copy of ``source`` (its data stage's output): a second training of the same data
    without the stages after it, which these tests do not read."""
    import shutil

    run = root / name
    shutil.copytree(source, run, ignore=shutil.ignore_patterns(".lock", "model.pt"))  # a checkpoint of its own
    result = run_cli("--stage", "train", "--run-dir", str(run), *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # one thread per rank, stated: float sums in PyTorch's kernels may depend on the thread count
    ddp = pipeline(root, "ddp", "--nproc", "2", "--threads", "1")
    return {"ddp": ddp, "again": retrain(root, "again", ddp), "single": retrain(root, "single", ddp, "--nproc", "1")}


@pytest.mark.slow
def test_two_processes_publish_like_one_and_record_the_world_size(runs):
    from training.checkpoint import load_checkpoint

    run = runs["ddp"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["nproc"] == 2 and manifest["stages"]["publish"]["status"] == "done"
    payload = torch.load(run / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in payload["state_dict"])  # rank 0 saved the bare module
    assert payload["metrics"]["world_size"] == 2
    assert load_checkpoint(run / "model.pt").model_config.arch == "mlp"
    assert manifest["artifacts"]["onnx"]["parents"] == {"checkpoint": manifest["artifacts"]["checkpoint"]["sha256"]}
    assert (run.parent / "ddp-models" / "emnist_mlp" / "1" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_two_process_training_is_deterministic(runs):
    assert sha256_file(runs["ddp"] / "model.pt") == sha256_file(runs["again"] / "model.pt")


@pytest.mark.slow
def test_two_processes_train_as_well_as_one(runs):
    """Same seed, same global batch, the same examples at every step (tested above); only dropout's masks (drawn
    per rank) and the gradient sums' rounding differ, so the two are two equally valid trainings. On the test split:
    their accuracies may not differ significantly at the 1 % level (exact McNemar test on the examples one gets
    right and the other wrong), and the two-process model's mean loss must lie within the 99 % confidence
    half-width of the one-process model's mean loss on these n examples (2.576 standard errors: the precision with
    which this test split measures a mean loss at all). A paired test on the losses would be the wrong question:
    two different valid trainings do differ, by amounts a paired test on 359 examples resolves."""
    from scipy.stats import binomtest, norm

    from training.checkpoint import load_checkpoint
    from training.train import logits_of

    with np.load(runs["single"] / "data.npz") as arrays:
        images, labels = arrays["x_test"], arrays["y_test"]
    outputs = {name: logits_of(load_checkpoint(runs[name] / "model.pt").model, images) for name in ("single", "ddp")}
    right = {name: np.argmax(out, axis=1) == labels for name, out in outputs.items()}
    only_single, only_ddp = int(np.sum(right["single"] & ~right["ddp"])), int(np.sum(right["ddp"] & ~right["single"]))
    discordant = only_single + only_ddp
    assert discordant == 0 or binomtest(only_single, discordant, 0.5).pvalue >= 1 - CONFIDENCE
    losses = {name: -torch.log_softmax(torch.from_numpy(out), dim=1)[np.arange(len(labels)), labels].numpy()
              for name, out in outputs.items()}
    half_width = norm.ppf(1 - (1 - CONFIDENCE) / 2) * losses["single"].std(ddof=1) / np.sqrt(len(labels))
    assert abs(losses["ddp"].mean() - losses["single"].mean()) <= half_width
    final = {name: json.loads((runs[name] / "manifest.json").read_text())["facts"]["test_accuracy"] for name in runs}
    assert final["ddp"] == final["again"]


@pytest.mark.slow
def test_a_killed_rank_fails_the_stage_in_one_line_and_train_reruns(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "pipelines.run", "--dataset", "digits", "--epochs", "400",
                                "--run-dir", str(run), "--models-dir", str(tmp_path / "models"), "--no-tracking",
                                "--nproc", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def rank_1_in_its_fourth_epoch():
        for log in run.glob("torchrun/*/attempt_0/1/stdout.log"):
            lines = log.read_text().splitlines()
            if any("epoch 3 done" in line for line in lines):
                return int(lines[0].split(" pid ")[1].split()[0])
        return None

    try:
        killed = wait_until(rank_1_in_its_fourth_epoch, "rank 1's line 'epoch 3 done'", timeout=240,
                            process=process, interval=0.05)
    except AssertionError:
        process.kill()
        raise
    os.kill(killed, signal.SIGKILL)
    out, err = process.communicate(timeout=240)
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    one_line_error(result, 1, "training rank 1 of 2 failed (killed by signal SIGKILL); its last lines:",
                   f"rank 1 pid {killed}", "Nothing was recorded or published", "re-run --stage train")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("saved_model.pb"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "failed" and "checkpoint" not in manifest["artifacts"]
    again = run_cli("--stage", "train", "--run-dir", str(run), "--epochs", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "done"
    assert manifest["artifacts"]["checkpoint"]["sha256"] == sha256_file(run / "model.pt")


@pytest.mark.slow
def test_two_machines_give_the_same_checkpoint_as_two_processes_on_one(runs, tmp_path):
    """docs/training.md's two-node commands, both nodes on this machine (the static rendezvous fixes the ranks)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["ddp"], run, ignore=shutil.ignore_patterns(".lock"))
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--stage", "train", "--run-dir", str(run), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
              "--threads", "1"]
    env = {**os.environ}
    nodes = [subprocess.Popen([sys.executable, "-m", "pipelines.run", *common, "--node-rank", str(rank)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert "node 1 of 2: its 1 rank(s) finished; node 0 records the checkpoint" in results[1][0]
    assert sha256_file(run / "model.pt") == sha256_file(runs["ddp"] / "model.pt")


def _early_stopping_rank(rank: int, size: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from tests.helpers import tiny_data, tiny_model_config
    from training.train import TrainConfig, World, train

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        _, metrics = train(*tiny_data(), tiny_model_config(),
                           TrainConfig(epochs=10, batch_size=8, learning_rate=0.0, patience=2), world=World(rank, size),
                           progress=False)
        epochs = [row["epoch"] for row in metrics["history"]] if rank == 0 else None
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump({"epochs": epochs, "done": True}, handle)
        # as training/distributed.py does: rank 0 leaves the last broadcast as soon as it has sent it, and closing
        # the group then could cut rank 1 off while it still reads it (a rank left in the loop still fails: its next
        # collective is not this barrier)
        dist.barrier()
        (Path(out) / f"rank{rank}.passed").touch()  # past the final barrier, as the product's rank logs "done"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_stops_early_when_rank_0_decides(tmp_path):
    """Only rank 0 evaluates; the others learn its decision, so both leave the loop after the same epoch (a rank
    left in the loop would wait forever in its next all-reduce)."""
    import json

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    context = mp.spawn(_early_stopping_rank, args=(2, init, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    for process in context.processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(process.is_alive() for process in context.processes):
        for process in context.processes:
            process.kill()
        pytest.fail("a rank is still training: the ranks did not stop together")
    # gloo may abort a rank whose peer closed the group first (SIGABRT, "terminate called without an active
    # exception"): after the final barrier that ends no work, and training.launch accepts it the same way
    # (launch.finished); before it, it is a failure
    for rank, process in enumerate(context.processes):
        assert process.exitcode == 0 or (tmp_path / f"rank{rank}.passed").is_file(), (rank, process.exitcode)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0]["epochs"] == [1, 2, 3] and results[1]["done"]


@pytest.mark.slow
def test_the_rank_killed_from_outside_is_blamed_not_the_peer_that_aborted_after_it(tmp_path, monkeypatch):
    """The race torchrun loses: rank 1 is killed, rank 0 aborts a moment later, torchrun sees both in one poll and
    calls rank 0 the root cause (both stamped with the same second; the lower rank wins the tie). The stage must
    name rank 1, killed by SIGKILL, and still mention rank 0."""
    from training.launch import run_distributed

    log_dir = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
               "--standalone", "--monitor-interval", "2", "--log-dir", str(log_dir), "--redirects", "3",
               "-m", "tests.fault_ranks", str(tmp_path)]
    seen = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: seen.append(real_run(*a, **k)) or seen[-1])
    with pytest.raises(TrainingError) as caught:
        run_distributed(command, log_dir=log_dir, out=tmp_path / "out", world_size=2)
    root_cause = seen[0].stderr.split("Root Cause", 1)[1]
    assert "rank      : 0" in root_cause.split("[", 2)[1], root_cause  # torchrun's own blame: the old mis-blame
    message = str(caught.value)
    assert message.startswith("training rank 1 of 2 failed (killed by signal SIGKILL); its last lines:"), message
    assert "rank 1 pid" in message and "Rank 0 ended too (killed by signal SIGABRT)" in message, message


def test_torchruns_summary_is_read_for_every_failed_rank():
    """torchrun's own summary (the format of torch.distributed.elastic's ChildFailedError), root cause first."""
    from training.launch import blame, rank_failures

    summary = """
    ============================================================
    training.distributed FAILED
    ------------------------------------------------------------
    Failures:
    [1]:
      time      : 2026-12-04_20:41:07
      host      : build-7
      rank      : 1 (local_rank: 1)
      exitcode  : -9 (pid: 4243) (SIGKILL)
      error_file: <N/A>
      traceback : Signal 9 (SIGKILL) received by PID 4243
    ------------------------------------------------------------
    Root Cause (first observed failure):
    [0]:
      time      : 2026-12-04_20:41:07
      host      : build-7
      rank      : 0 (local_rank: 0)
      exitcode  : -6 (pid: 4242) (SIGABRT)
      error_file: <N/A>
      traceback : Signal 6 (SIGABRT) received by PID 4242
    ============================================================
    """
    failures = rank_failures(summary)
    assert [(f.rank, f.exitcode, f.signal, f.error_file) for f in failures] == [
        (0, -6, "SIGABRT", False), (1, -9, "SIGKILL", False)]
    assert [f.rank for f in blame(failures, {})] == [1, 0]
    # a rank that failed on its own (an exception, with an error file) beats one whose peer vanished
    own = summary.replace("-9 (pid: 4243) (SIGKILL)", "1 (pid: 4243)").replace(
        "error_file: <N/A>\n      traceback : Signal 9", "error_file: /tmp/x/error.json\n      traceback : Signal 9")
    failures = rank_failures(own)
    assert [f.rank for f in blame(failures, {0: ["RuntimeError: Connection reset by peer"], 1: []})] == [1, 0]
    # two ranks failing on their own: the error files' timestamps say which was first
    both = own.replace("-6 (pid: 4242) (SIGABRT)\n      error_file: <N/A>",
                       "1 (pid: 4242)\n      error_file: /tmp/x/0.json").replace(
        "2026-12-04_20:41:07\n      host      : build-7\n      rank      : 0",
        "2026-12-04_20:41:09\n      host      : build-7\n      rank      : 0")
    assert [f.rank for f in blame(rank_failures(both), {})] == [1, 0]


@pytest.mark.slow
def test_a_rank_dying_while_closing_its_group_after_the_work_is_done_does_not_fail_training(tmp_path, caplog):
    """Seen once in 30 loops of the killed-rank test: after the final barrier both ranks logged "done", then one
    died closing the process group (SIGABRT), and torchrun stopped the other (SIGTERM). The checkpoint was whole;
    the stage must keep it, with a warning, not fail."""
    from training.launch import run_distributed

    log_dir = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
               "--standalone", "--log-dir", str(log_dir), "--redirects", "3",
               "-m", "tests.fault_ranks", str(tmp_path), "teardown"]
    with caplog.at_level("WARNING", logger="training.launch"):
        metrics = run_distributed(command, log_dir=log_dir, out=tmp_path / "out", world_size=2)
    assert metrics == {"test_accuracy": 0.5}
    assert ("training finished, then rank(s) 1, 0 ended while closing the process group (killed by signal SIGABRT; "
            "killed by signal SIGTERM); the checkpoint is complete") in caplog.text


def test_a_rank_stopped_by_sigterm_beside_another_failure_is_blamed_last():
    """torchrun stops the ranks still running with SIGTERM once one failed: that is not where the failure was."""
    from training.launch import RankFailure, blame

    stopped = RankFailure(rank=0, exitcode=-15, signal="SIGTERM", error_file=False, timestamp="t")
    aborted = RankFailure(rank=1, exitcode=-6, signal="SIGABRT", error_file=False, timestamp="t")
    assert [f.rank for f in blame([stopped, aborted], {})] == [1, 0]
