"""EMNIST at the user's scale: the stand-in archive is NIST's layout, and the gate passes a correct run on it."""

import gzip
import json
import struct
import zipfile

import numpy as np
import pytest

from tests.helpers import run_cli
from tools.standin import SPLITS, write_archive
from training.data import load_dataset


def test_standin_archive_has_nists_members_formats_counts_and_labels(tmp_path):
    scale = 0.002
    archive = write_archive(tmp_path, tuple(SPLITS), scale=scale, seed=3)
    with zipfile.ZipFile(archive) as bundle:
        names = set(bundle.namelist())
        for split, (n_train, n_test, chars, first_label) in SPLITS.items():
            assert f"gzip/emnist-{split}-mapping.txt" in names
            for part, full in (("train", n_train), ("test", n_test)):
                images = gzip.decompress(bundle.read(f"gzip/emnist-{split}-{part}-images-idx3-ubyte.gz"))
                labels = gzip.decompress(bundle.read(f"gzip/emnist-{split}-{part}-labels-idx1-ubyte.gz"))
                magic, count, rows, cols = struct.unpack(">IIII", images[:16])
                assert (magic, count, rows, cols) == (0x0803, round(full * scale), 28, 28)
                assert struct.unpack(">II", labels[:8]) == (0x0801, count)
                values = np.frombuffer(labels[8:], dtype=np.uint8)
                assert values.min() >= first_label and values.max() < first_label + len(chars)
    dataset = load_dataset("emnist-byclass", tmp_path, allow_download=False)
    assert len(dataset.labels) == 62 and dataset.x_train.shape == (round(697_932 * scale), 784)
    assert dataset.x_train.mean() > 5  # ink, not an empty canvas
    assert write_archive(tmp_path / "again", tuple(SPLITS), scale=scale, seed=3).read_bytes() == archive.read_bytes()


@pytest.mark.slow
def test_reduced_size_byclass_run_passes_the_gate(tmp_path):
    """1/10 of EMNIST byclass, 10 epochs (as many training steps as one epoch at full size): the round-1
    gate refused a correct run of this size (20 epochs) exactly as it refused full size — fp32 logits 7.6e-5
    apart against its fixed 1e-5 + 1e-5·|ref| in 6 elements, blamed on 'packaging or TFLite conversion'. On
    today's stand-in the logits stay within that fixed tolerance (docs/training.md): what this guards is the
    derived gate on 11,632 test images and 62 classes at a 1-epoch full-size run's logit magnitudes (`make
    scale` runs the full size itself)."""
    write_archive(tmp_path / "data", ("byclass",), scale=0.1)
    result = run_cli("--stage", "all", "--dataset", "emnist-byclass", "--data-dir", str(tmp_path / "data"),
                     "--epochs", "10", "--run-dir", str(tmp_path / "run"), "--models-dir", str(tmp_path / "models"),
                     "--no-tracking", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "parity.json").read_text())
    assert report["verdict"] == "pass" and report["examples"] == round(116_323 * 0.1)
    assert report["error_model"]["fan_ins"] == [785, 513, 257]
    assert (tmp_path / "models" / "emnist_mlp" / "1" / "saved_model.pb").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_the_verdict_does_not_depend_on_threads_or_onednn(pipeline_run, tmp_path, threads, onednn):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pipeline_run.run_dir, run)
    result = run_cli("--stage", "validate", "--run-dir", str(run), "--no-tracking", "--threads", threads,
                     env={"TF_ENABLE_ONEDNN_OPTS": onednn})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "parity.json").read_text())["verdict"] == "pass"
