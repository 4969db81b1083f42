import logging
import sys

import numpy as np
import pytest

from crossport.errors import ConfigError, DataError
from tests.helpers import make_emnist_archive
from training import data


@pytest.fixture
def no_emnist(tmp_path, monkeypatch):
    """No archive anywhere and a download that fails at once (no network in tests)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CROSSPORT_EMNIST_URL", (tmp_path / "nowhere" / "gzip.zip").as_uri())
    return tmp_path / "data"


def test_digits_are_28x28_uint8_in_emnist_orientation():
    dataset = data.load_digits(seed=0)
    assert dataset.x_train.shape[1] == 784 and dataset.x_train.dtype == np.uint8
    assert len(dataset.y_train) + len(dataset.y_test) == 1797
    assert dataset.labels == tuple("0123456789")
    # The glyph is framed like MNIST (4-pixel border)...
    images = dataset.x_train.reshape(-1, 28, 28)
    assert images[:, :4, :].max() == 0 and images[:, :, -4:].max() == 0
    # ...and transposed: upright "1"s are tall and thin, so in EMNIST orientation their ink
    # spreads along the first axis' columns rather than its rows.
    ones = images[dataset.y_train == 1].astype(float).mean(axis=0)
    col_spread = np.count_nonzero(ones.sum(axis=0) > 0.1 * ones.sum(axis=0).max())
    row_spread = np.count_nonzero(ones.sum(axis=1) > 0.1 * ones.sum(axis=1).max())
    assert col_spread > row_spread


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    from sklearn.datasets import load_digits as scikit_learns

    bunch = scikit_learns()
    for name in [name for name in sys.modules if name == "sklearn" or name.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of scikit-learn now fails
    images, labels = data.sklearn_digits()
    assert images.dtype == bunch.images.dtype and np.array_equal(images, bunch.images)
    assert labels.dtype == np.int64 and np.array_equal(labels, bunch.target)
    monkeypatch.setattr(data, "DIGITS_CSV", "sklearn/datasets/data/no-such-digits.csv.gz")  # a broken install
    with pytest.raises(DataError, match=r"scikit-learn's bundled digits \(sklearn/datasets/data/no-such-digits"):
        data.load_dataset("digits", None)


def test_digits_split_is_seeded():
    a, b, c = data.load_digits(seed=1), data.load_digits(seed=1), data.load_digits(seed=2)
    assert a.digest == b.digest
    assert a.digest != c.digest


def test_emnist_read_from_archive_in_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    arrays = make_emnist_archive(tmp_path / "data" / "gzip.zip", split="balanced", num_classes=47)
    dataset = data.load_dataset("emnist-balanced", tmp_path / "data", allow_download=False)
    assert dataset.name == "emnist-balanced"
    assert len(dataset.labels) == 47
    np.testing.assert_array_equal(dataset.x_train, arrays["train_images"].reshape(-1, 784))
    np.testing.assert_array_equal(dataset.y_test, arrays["test_labels"])
    # the raw IDX files were extracted for torchvision and are reused next time
    assert (tmp_path / "data" / "EMNIST" / "raw" / "emnist-balanced-test-images-idx3-ubyte").is_file()


def test_emnist_found_in_emnist_package_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    make_emnist_archive(tmp_path / "home" / ".cache" / "emnist" / "emnist.zip", split="digits", num_classes=10)
    dataset = data.load_dataset("emnist-digits", tmp_path / "empty", allow_download=False)
    assert dataset.labels == tuple("0123456789")


def test_emnist_letters_labels_shift_to_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    arrays = make_emnist_archive(tmp_path / "d" / "emnist.zip", split="letters", num_classes=26, first_label=1)
    dataset = data.load_dataset("emnist-letters", tmp_path / "d", allow_download=False)
    assert dataset.labels == tuple("abcdefghijklmnopqrstuvwxyz")
    np.testing.assert_array_equal(dataset.y_train, arrays["train_labels"].astype(np.int64) - 1)


def test_emnist_downloaded_with_progress_when_missing(tmp_path, monkeypatch):
    """The download path, offline: the 'remote' archive is a local file:// URL."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    remote = tmp_path / "remote" / "gzip.zip"
    make_emnist_archive(remote, split="mnist", num_classes=10)
    monkeypatch.setenv("CROSSPORT_EMNIST_URL", remote.as_uri())
    dataset = data.load_dataset("emnist-mnist", tmp_path / "data")
    assert (tmp_path / "data" / "EMNIST" / "raw" / "gzip.zip").read_bytes() == remote.read_bytes()
    assert len(dataset.y_test) == 20


def test_auto_prefers_emnist_byclass(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    make_emnist_archive(tmp_path / "data" / "gzip.zip", split="byclass")
    assert data.load_dataset("auto", tmp_path / "data").name == "emnist-byclass"


def test_auto_falls_back_to_digits_with_one_warning(no_emnist, caplog):
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = data.load_dataset("auto", no_emnist)
    assert dataset.name == "digits"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Using the bundled 'digits' dataset instead" in warnings[0].getMessage()
    assert "gzip.zip" in warnings[0].getMessage()  # says how to get EMNIST


def test_explicit_emnist_that_cannot_be_had_fails_clearly(no_emnist):
    with pytest.raises(DataError, match=r"EMNIST download from .* failed.*To use EMNIST, put NIST's gzip.zip"):
        data.load_dataset("emnist-byclass", no_emnist)


def test_corrupt_archive_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gzip.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match=r"corrupt or unreadable"):
        data.load_dataset("emnist-byclass", tmp_path / "data", allow_download=False)


def test_archive_without_the_split_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    make_emnist_archive(tmp_path / "data" / "gzip.zip", split="digits", num_classes=10)
    with pytest.raises(DataError, match=r"not NIST's EMNIST archive: expected a member gzip/emnist-byclass"):
        data.load_dataset("emnist-byclass", tmp_path / "data", allow_download=False)


def test_unknown_dataset_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar10': expected one of .*emnist-byclass"):
        data.load_dataset("cifar10", tmp_path)


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSPORT_DATA_DIR", str(tmp_path))
    assert data.data_dir_from(None) == tmp_path
    assert data.data_dir_from(tmp_path / "x") == tmp_path / "x"
