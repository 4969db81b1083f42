"""Builders for tiny test inputs in the real formats crossport reads."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from pathlib import Path

import numpy as np


def idx_images(images: np.ndarray) -> bytes:
    """IDX3 (NIST/MNIST format): magic 0x0803, count, rows, cols, then uint8 pixels."""
    count, rows, cols = images.shape
    return struct.pack(">IIII", 0x0803, count, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()


def make_emnist_archive(path: Path, split: str = "byclass", n_train: int = 40, n_test: int = 20,
                        num_classes: int = 62, seed: int = 0, first_label: int = 0) -> dict[str, np.ndarray]:
    """Write a zip laid out like NIST's gzip.zip (``gzip/emnist-<split>-*.gz``) with random images."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(first_label, first_label + num_classes, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(first_label, first_label + num_classes, n_test).astype(np.uint8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as bundle:
        for part in ("train", "test"):
            for kind, payload in (("images-idx3-ubyte", idx_images(arrays[f"{part}_images"])),
                                  ("labels-idx1-ubyte", idx_labels(arrays[f"{part}_labels"]))):
                buffer = io.BytesIO()
                with gzip.GzipFile(fileobj=buffer, mode="wb") as packed:
                    packed.write(payload)
                bundle.writestr(f"gzip/emnist-{split}-{part}-{kind}.gz", buffer.getvalue())
    return arrays


class PicklePayload:
    """Unpickling this calls open(marker, "w"): proof a pickle ran if the file appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
