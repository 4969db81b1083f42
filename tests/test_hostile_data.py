"""Hostile EMNIST archives and IDX files: one DataError line naming the file and what to do,
nothing past the header's declared size ever written, no partial files left behind."""

import gzip
import io
import struct
import zipfile

import numpy as np
import pytest

from crossport.errors import DataError
from tests.helpers import idx_images, idx_labels, make_emnist_archive, run_cli


def member(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as packed:
        packed.write(data)
    return buffer.getvalue()


def archive_with(path, split="digits", **replace) -> None:
    """A valid small archive whose members named in ``replace`` (e.g. train_images) get other bytes."""
    make_emnist_archive(path, split=split, num_classes=10)
    with zipfile.ZipFile(path) as bundle:
        members = {name: bundle.read(name) for name in bundle.namelist()}
    for key, data in replace.items():
        part, kind = key.split("_")
        name = f"gzip/emnist-{split}-{part}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        members[name] = member(data)
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)


def load(tmp_path):
    from training.data import load_dataset

    return load_dataset("emnist-digits", tmp_path / "data", allow_download=False)


def images(count, rows=28, cols=28):
    return idx_images(np.zeros((count, rows, cols), dtype=np.uint8))


BOMB_COUNT = 10
CASES = [
    ("wrong-magic", {"train_images": struct.pack(">IIII", 0x0801, 40, 28, 28) + bytes(40 * 784)},
     "is not an IDX images file: magic number 0x00000801, expected 0x00000803"),
    ("wrong-label-magic", {"test_labels": struct.pack(">II", 0x0803, 20) + bytes(20)},
     "is not an IDX labels file: magic number 0x00000803"),
    ("header-only-part", {"train_labels": b"\0\0\x08"}, "shorter than its header"),
    ("wrong-image-size", {"train_images": images(40, 28, 29)}, "holds 28×29 images, expected 28×28"),
    ("declares-more-than-nist", {"train_images": struct.pack(">IIII", 0x0803, 2**32 - 1, 28, 28)},
     "declares 4,294,967,295 images; NIST's file has 240,000"),
    ("truncated-member", {"train_images": images(40)[:-100]}, "is truncated: 31,260 of 31,360 bytes"),
    ("decompression-bomb", {"train_images": images(BOMB_COUNT) + bytes(50_000_000)},
     f"holds more than the {BOMB_COUNT * 784:,} bytes its header declares"),
    ("counts-differ", {"test_labels": idx_labels(np.zeros(19, dtype=np.uint8))},
     "EMNIST digits test has 20 images but 19 labels"),
    ("label-outside-classes", {"train_labels": idx_labels(np.full(40, 10, dtype=np.uint8))},
     "labels in", "include 10, outside the split's 10 classes (0..9)"),
]


@pytest.mark.parametrize(("replace", "fragments"), [(case[1], case[2:]) for case in CASES],
                         ids=[case[0] for case in CASES])
def test_hostile_archive(tmp_path, replace, fragments):
    archive_with(tmp_path / "data" / "gzip.zip", **replace)
    with pytest.raises(DataError) as raised:
        load(tmp_path)
    assert raised.value.exit_code == 1 and "\n" not in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)
    raw = tmp_path / "data" / "EMNIST" / "raw"
    leftovers = [p.name for p in raw.iterdir() if p.suffix == ".part"] if raw.is_dir() else []
    assert not leftovers
    written = sum(p.stat().st_size for p in raw.iterdir()) if raw.is_dir() else 0
    assert written <= 2 * (16 + 40 * 784) + 2 * (8 + 40), "extraction wrote more than the headers declare"


def test_letters_label_zero_is_outside_the_split(tmp_path):
    from training.data import load_dataset

    make_emnist_archive(tmp_path / "data" / "gzip.zip", split="letters", num_classes=27, first_label=0)
    with pytest.raises(DataError, match=r"outside the split's 26 classes \(1\.\.26\)"):
        load_dataset("emnist-letters", tmp_path / "data", allow_download=False)


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda data: b"\0\0\x09\x03" + data[4:], "magic number 0x00000903"),
    (lambda data: data + b"\0", "its header declares"),
    (lambda data: data[:-1], "its header declares"),
])
def test_hostile_extracted_files(tmp_path, edit, fragment):
    """Files already in the raw folder (extracted earlier, or put there by hand) are checked too."""
    make_emnist_archive(tmp_path / "data" / "gzip.zip", split="digits", num_classes=10)
    load(tmp_path)
    path = tmp_path / "data" / "EMNIST" / "raw" / "emnist-digits-train-images-idx3-ubyte"
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(DataError) as raised:
        load(tmp_path)
    assert fragment in str(raised.value) and str(path) in str(raised.value)


@pytest.mark.slow
def test_a_hostile_archive_through_the_command_line(tmp_path):
    archive_with(tmp_path / "data" / "gzip.zip", train_images=images(BOMB_COUNT) + bytes(5_000_000))
    result = run_cli("--dataset", "emnist-digits", "--data-dir", str(tmp_path / "data"), "--run-dir",
                     str(tmp_path / "run"), "--models-dir", str(tmp_path / "models"), "--no-tracking",
                     env={"CROSSPORT_EMNIST_URL": (tmp_path / "none.zip").as_uri()})
    errors = [line for line in result.stderr.splitlines() if line.startswith("crossport: error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "holds more than the 7,840 bytes its header declares" in errors[0]
    assert not (tmp_path / "models").exists()


def test_a_stage_reads_only_the_arrays_it_names_and_a_missing_one_is_one_line(tmp_path):
    """validate reads the test split alone (EMNIST byclass's training images are 0.55 GB it never uses); an array it
    needs that the file lacks is still one DataError naming it."""
    import numpy as np

    from crossport.errors import DataError
    from crossport.files import read_npz

    path = tmp_path / "data.npz"
    np.savez(path, x_train=np.zeros((5, 784), np.uint8), y_train=np.zeros(5), x_test=np.ones((2, 784), np.uint8),
             y_test=np.zeros(2))
    read = read_npz(path, redo="data", need=("x_test", "y_test"), only=True)
    assert sorted(read) == ["x_test", "y_test"] and read["x_test"].shape == (2, 784)
    assert sorted(read_npz(path, redo="data", need=("x_test",))) == ["x_test", "x_train", "y_test", "y_train"]
    with pytest.raises(DataError, match=r"lacks the array\(s\) \['labels'\]"):
        read_npz(path, redo="data", need=("x_test", "labels"), only=True)
