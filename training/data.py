"""Datasets as plain arrays: uint8 images [N, 784] in EMNIST orientation, int64 labels.

EMNIST orientation is the NIST files' own: each 28×28 image is stored transposed
relative to how a person reads it (torchvision does not transpose it back). Every
dataset here, the bundled ``digits`` included, is delivered in that orientation so one
input contract serves every model crossport publishes.

EMNIST is read with torchvision from NIST's ``gzip.zip``. The archive is looked for in
the data directory (``--data-dir`` / ``CROSSPORT_DATA_DIR``), where the ``emnist``
package caches it (``~/.cache/emnist/emnist.zip``), and is otherwise downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossport.errors import ConfigError, DataError
from crossport.files import replace_atomic
from crossport.interface import INPUT_SIZE

log = logging.getLogger(__name__)

EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
DATASETS = (*tuple(f"emnist-{split}" for split in EMNIST_SPLITS), "digits", "auto")
DEFAULT_DATA_DIR = Path("~/.cache/crossport/data")
EMNIST_PACKAGE_CACHE = Path("~/.cache/emnist/emnist.zip")
HOW_TO_GET_EMNIST = (
    f"To use EMNIST, put NIST's gzip.zip ({EMNIST_URL}) in the data directory "
    "(--data-dir or CROSSPORT_DATA_DIR) or at ~/.cache/emnist/emnist.zip, or run where NIST's site "
    "can be reached so it is downloaded."
)


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    labels: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def digest(self) -> str:
        """sha256 over the arrays and the label map: the dataset's identity."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update("\n".join(self.labels).encode())
        return digest.hexdigest()


def data_dir_from(explicit: str | os.PathLike | None) -> Path:
    chosen = explicit or os.environ.get("CROSSPORT_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def load_dataset(name: str, data_dir: Path, *, seed: int = 0, allow_download: bool = True) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`); ``auto`` falls back to ``digits`` with a warning."""
    if name not in DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}.",
            hint="Pass --dataset with one of those names.",
        )
    if name == "digits":
        return load_digits(seed=seed)
    if name == "auto":
        try:
            return load_emnist("byclass", data_dir, allow_download=allow_download)
        except DataError as error:
            log.warning("EMNIST byclass unavailable: %s Using the bundled 'digits' dataset instead. %s",
                        error.message, HOW_TO_GET_EMNIST)
            return load_digits(seed=seed)
    return load_emnist(name.removeprefix("emnist-"), data_dir, allow_download=allow_download)


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8×8 digits, upscaled to 28×28 like MNIST, with a seeded split."""
    from PIL import Image

    smalls, labels = sklearn_digits()
    images = np.empty((len(smalls), 28, 28), dtype=np.uint8)
    for index, small in enumerate(smalls):
        # 8×8 values 0..16 → 20×20 glyph centred in a 28×28 frame, as MNIST digits are.
        glyph = Image.fromarray((small * (255.0 / 16.0)).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        images[index] = np.pad(np.asarray(glyph), 4)
    images = images.transpose(0, 2, 1)  # upright → EMNIST orientation

    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    flat = images.reshape(len(images), INPUT_SIZE)
    return Dataset(
        name="digits",
        source="sklearn.datasets.load_digits (8x8, upscaled to 28x28)",
        labels=tuple(str(d) for d in range(10)),
        x_train=flat[train],
        y_train=labels[train],
        x_test=flat[test],
        y_test=labels[test],
    )


DIGITS_CSV = "sklearn/datasets/data/digits.csv.gz"  # inside the scikit-learn distribution: 64 pixels, then the label


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, as its ``load_digits`` returns them (8×8 float64 images of values 0..16, and
    int64 labels), read from the CSV file the scikit-learn distribution ships, as ``load_digits`` reads it, without
    importing scikit-learn: that import was 1.1 s of every digits run (of a 16 s run of three epochs)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution("scikit-learn").locate_file(DIGITS_CSV))
        table = np.loadtxt(path, delimiter=",")
    except (metadata.PackageNotFoundError, OSError, ValueError) as error:
        raise DataError(f"scikit-learn's bundled digits ({DIGITS_CSV}) could not be read: {error}.",
                        hint="Reinstall the project's requirements (make install).") from error
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_emnist(split: str, data_dir: Path, *, allow_download: bool = True) -> Dataset:
    """Read an EMNIST split with torchvision, preparing its raw files from NIST's archive."""
    from torchvision.datasets import EMNIST

    if split not in EMNIST_SPLITS:
        raise ConfigError(f"unknown EMNIST split {split!r}: expected one of {', '.join(EMNIST_SPLITS)}.")
    raw = data_dir / "EMNIST" / "raw"
    _ensure_raw_files(split, data_dir, raw, allow_download)
    _check_raw_files(split, raw)
    try:
        train = EMNIST(str(data_dir), split=split, train=True, download=False)
        test = EMNIST(str(data_dir), split=split, train=False, download=False)
    except (RuntimeError, TypeError, ValueError, OSError) as error:
        raise DataError(
            f"EMNIST {split} files in {raw} could not be read: {error}.",
            hint="Delete that directory and run again to re-extract them from the archive.",
        ) from error

    classes = list(train.classes)
    y_train, y_test = train.targets.numpy().astype(np.int64), test.targets.numpy().astype(np.int64)
    if split == "letters":
        # NIST labels letters 1..26 and torchvision lists an unused 'N/A' class 0.
        classes, y_train, y_test = classes[1:], y_train - 1, y_test - 1
    for part, labels in (("train", y_train), ("test", y_test)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            bad = int(labels.min() if labels.min() < 0 else labels.max())
            first = 1 if split == "letters" else 0
            raise DataError(f"EMNIST {split} {part} labels in {raw} include {bad + first}, outside the split's "
                            f"{len(classes)} classes ({first}..{len(classes) - 1 + first}).",
                            hint="Delete that directory and run again with NIST's archive.")
    return Dataset(
        name=f"emnist-{split}",
        source=f"NIST EMNIST gzip.zip ({EMNIST_URL}) via torchvision, split {split}",
        labels=tuple(classes),
        x_train=train.data.numpy().reshape(-1, INPUT_SIZE),
        y_train=y_train,
        x_test=test.data.numpy().reshape(-1, INPUT_SIZE),
        y_test=y_test,
    )


# NIST's per-split image counts (train, test): a member declaring more is not NIST's archive,
# and the declared count bounds how many bytes extraction may write.
NIST_COUNTS = {
    "byclass": (697_932, 116_323), "bymerge": (697_932, 116_323), "balanced": (112_800, 18_800),
    "letters": (124_800, 20_800), "digits": (240_000, 40_000), "mnist": (60_000, 10_000),
}
IDX_MAGIC = {"images": (0x0803, 3), "labels": (0x0801, 1)}  # IDX type ubyte, dimension count
SIDE = 28


def idx_header(head: bytes, kind: str, where: str, most: int) -> tuple[int, int]:
    """Check an IDX header (``kind`` images or labels); return (header size, payload size) in bytes."""
    magic, dims = IDX_MAGIC[kind]
    size = 4 + 4 * dims
    if len(head) < size:
        raise DataError(f"{where} is not an IDX {kind} file: {len(head)} bytes, shorter than its header.",
                        hint=HOW_TO_GET_EMNIST)
    found_magic, *shape = struct.unpack(f">I{dims}I", head[:size])
    if found_magic != magic:
        raise DataError(f"{where} is not an IDX {kind} file: magic number 0x{found_magic:08x}, expected "
                        f"0x{magic:08x}.", hint=HOW_TO_GET_EMNIST)
    if kind == "images" and shape[1:] != [SIDE, SIDE]:
        raise DataError(f"{where} holds {shape[1]}×{shape[2]} images, expected {SIDE}×{SIDE}.", hint=HOW_TO_GET_EMNIST)
    if shape[0] > most:
        raise DataError(f"{where} declares {shape[0]:,} {kind}; NIST's file has {most:,}.", hint=HOW_TO_GET_EMNIST)
    return size, shape[0] * (SIDE * SIDE if kind == "images" else 1)


def _raw_names(split: str) -> list[str]:
    return [f"emnist-{split}-{part}-{kind}" for part in ("train", "test")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


def _check_raw_files(split: str, raw: Path) -> None:
    """Every IDX file is what its header says, and each part has as many labels as images."""
    for part, most in zip(("train", "test"), NIST_COUNTS[split], strict=True):
        counts = []
        for kind in ("images", "labels"):
            path = raw / f"emnist-{split}-{part}-{kind}-idx{IDX_MAGIC[kind][1]}-ubyte"
            with open(path, "rb") as handle:
                size, payload = idx_header(handle.read(16), kind, str(path), most)
            if path.stat().st_size != size + payload:
                raise DataError(f"{path} has {path.stat().st_size:,} bytes; its header declares {size + payload:,}.",
                                hint="Delete that directory and run again to re-extract it from the archive.")
            counts.append(payload // (SIDE * SIDE if kind == "images" else 1))
        if counts[0] != counts[1]:
            raise DataError(f"EMNIST {split} {part} has {counts[0]:,} images but {counts[1]:,} labels in {raw}.",
                            hint="Delete that directory and run again with NIST's archive.")


def _ensure_raw_files(split: str, data_dir: Path, raw: Path, allow_download: bool) -> None:
    names = _raw_names(split)
    if all((raw / name).is_file() for name in names):
        return
    archive = find_archive(data_dir)
    if archive is None:
        if not allow_download:
            raise DataError(f"no EMNIST archive found in {data_dir} or {EMNIST_PACKAGE_CACHE}.", hint=HOW_TO_GET_EMNIST)
        archive = download_archive(raw / "gzip.zip")
    extract_split(archive, split, raw)


def find_archive(data_dir: Path) -> Path | None:
    """The first NIST ``gzip.zip`` found where users and tools usually keep it."""
    candidates = [
        data_dir if data_dir.suffix == ".zip" else None,
        data_dir / "EMNIST" / "raw" / "gzip.zip",
        data_dir / "gzip.zip",
        data_dir / "emnist.zip",
        EMNIST_PACKAGE_CACHE.expanduser(),
    ]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            log.info("using EMNIST archive %s", candidate)
            return candidate
    return None


def download_archive(target: Path) -> Path:
    """Download NIST's archive with a progress bar (``CROSSPORT_EMNIST_URL`` overrides the URL)."""
    from tqdm import tqdm

    url = os.environ.get("CROSSPORT_EMNIST_URL", EMNIST_URL)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading EMNIST from %s", url)
    try:
        with (replace_atomic(target) as partial, urllib.request.urlopen(url, timeout=15) as response,
              open(partial, "wb") as out):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="EMNIST gzip.zip") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        raise DataError(f"EMNIST download from {url} failed: {error}.", hint=HOW_TO_GET_EMNIST) from error
    return target


def extract_split(archive: Path, split: str, raw: Path) -> None:
    """Unpack one split's four IDX files from NIST's zip (``gzip/<name>.gz``) into ``raw``."""
    raw.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            from crossport.console import progress

            members = {Path(member).name: member for member in bundle.namelist()}
            for name in progress(_raw_names(split), desc=f"extracting EMNIST {split}", unit="file"):
                member = members.get(f"{name}.gz")
                if member is None:
                    raise DataError(
                        f"{archive} is not NIST's EMNIST archive: expected a member gzip/{name}.gz, "
                        f"found {len(members)} other members.",
                        hint=HOW_TO_GET_EMNIST,
                    )
                with (replace_atomic(raw / name) as partial, bundle.open(member) as packed,
                      gzip.open(packed) as unpacked, open(partial, "wb") as out):
                    _copy_idx(unpacked, out, name, f"{archive}:{member}", split)
    except (zipfile.BadZipFile, gzip.BadGzipFile, EOFError, OSError, struct.error) as error:
        raise DataError(f"EMNIST archive {archive} is corrupt or unreadable: {error}.",
                        hint=HOW_TO_GET_EMNIST) from error


def _copy_idx(unpacked, out, name: str, where: str, split: str) -> None:
    """Copy one IDX member, writing no more than its header declares (NIST's count at most)."""
    kind = "images" if "-images-" in name else "labels"
    most = NIST_COUNTS[split]["-test-" in name]
    head = unpacked.read(4 + 4 * IDX_MAGIC[kind][1])
    _, payload = idx_header(head, kind, where, most)
    out.write(head)
    remaining = payload
    while remaining:
        chunk = unpacked.read(min(remaining, 1 << 20))
        if not chunk:
            raise DataError(f"{where} is truncated: {payload - remaining:,} of {payload:,} bytes its header declares.",
                            hint=HOW_TO_GET_EMNIST)
        out.write(chunk)
        remaining -= len(chunk)
    if unpacked.read(1):
        raise DataError(f"{where} holds more than the {payload:,} bytes its header declares.", hint=HOW_TO_GET_EMNIST)
