"""Hashing and atomic writes for artifacts (files or directories)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def not_a_file(path: Path) -> str:
    """What stands at ``path`` where a regular file was expected, for an error line: "is a folder", "is not a
    regular file" (a device such as /dev/null, a socket) or "does not exist"."""
    path = Path(path)
    return "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 of a file, or of a directory tree (relative names and contents, sorted).

    ``exclude`` names top-level entries of a directory to leave out (``assets.extra`` when
    hashing the SavedModel part of a published version).
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    files = (p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude)
    for child in sorted(files):
        digest.update(child.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_file(child).encode() + b"\n")
    return digest.hexdigest()


@contextmanager
def replace_atomic(path: Path) -> Iterator[Path]:
    """The one way crossport writes a file: yields a temporary path for any writer to fill; when the block ends, the
    file is flushed to disk (fsync) and renamed over ``path``, so readers see the old file or the new one, never
    half; on an error it is removed. The temporary file has ``path``'s own name, in a new hidden directory beside
    it, so writers that record the file's name in its bytes (``torch.save``'s archive) write the same bytes."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    tmp = staging / path.name
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # whatever mode the writer chose: published files are read by TF Serving's user
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    with replace_atomic(path) as tmp:
        tmp.write_bytes(data)


def save_npz_atomic(path: Path, **arrays) -> None:
    """``numpy.savez`` of ``arrays`` to ``path``, atomically."""
    import numpy as np

    with replace_atomic(path) as tmp:
        np.savez(tmp, **arrays)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_npz(path: Path, *, redo: str, need: tuple[str, ...] = (), only: bool = False) -> dict:
    """Every array of an ``.npz`` crossport wrote (with ``only``, just those in ``need``), each read whole; one
    DataError line for a file that is not one (a truncated zip, a pickled object array, which is never unpickled, a
    missing array in ``need``). ``redo``: the stage that makes it, for the hint."""
    import zipfile

    import numpy as np

    from crossport.errors import DataError

    hint = f"Re-run the {redo} stage; crossport writes plain numeric arrays and never loads pickled objects."
    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in arrays.files if not only or key in need}
    except ValueError as error:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise DataError(f"{path} holds an array of Python objects ({error}).", hint=hint) from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{path} is not a readable .npz file ({error}).", hint=hint) from None
    missing = [key for key in need if key not in found]
    if missing:
        raise DataError(f"{path} lacks the array(s) {missing}; it holds {sorted(found)}.", hint=hint)
    return found


def size_path(path: Path, exclude: tuple[str, ...] = ()) -> int:
    """Bytes of a file, or of a directory tree less the top-level entries named in ``exclude``."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude)


def fingerprint(directory: Path) -> tuple:
    """Every file under ``directory`` with its size, modification time and inode: changes when a file is written, in
    place or replaced by another (a copy keeps the modification time, not the inode). Empty for a missing directory;
    a file that vanishes while it is read is left out. A file given instead of a directory is its own one entry."""
    if os.path.isfile(directory):
        stat = os.stat(directory)
        return ((os.path.basename(directory), stat.st_size, stat.st_mtime_ns, stat.st_ino),)
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:
                continue
            found.append((os.path.relpath(os.path.join(root, name), directory), stat.st_size, stat.st_mtime_ns,
                          stat.st_ino))
    return tuple(sorted(found))


def model_repository_around(path: Path) -> Path | None:
    """The model repository (a published version, or a folder with ``models.config``) holding ``path``."""
    from crossport.interface import MODELS_CONFIG

    resolved = Path(path).resolve()
    for place in (resolved, *resolved.parents):
        if (place / "saved_model.pb").is_file() or (place / MODELS_CONFIG).is_file():
            return place
    return None


def foreign_entries(directory: Path, ours: frozenset[str] | set[str]) -> list[str]:
    """Names in ``directory`` other than ``ours`` (empty when it is absent or empty)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(child.name for child in directory.iterdir() if child.name not in ours)
