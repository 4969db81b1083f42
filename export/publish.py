"""Publish a version into the TF Serving model repository, atomically and never overwriting.

``<models-dir>/<name>/<N>/`` is built in a hidden temporary directory beside it (TF Serving
only loads integer-named directories) and renamed into place last, so TF Serving and
readers see either no version N or a complete one. ``models.config`` is rewritten
atomically to list every published model.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from crossport.errors import PublishError
from crossport.files import write_bytes_atomic
from crossport.interface import MODELS_CONFIG

log = logging.getLogger(__name__)

TEMP_PREFIX = ".partial-"


def versions(base: Path) -> list[int]:
    """Published version numbers under ``base`` (integer-named directories only)."""
    if not base.is_dir():
        return []
    return sorted(int(child.name) for child in base.iterdir() if child.is_dir() and child.name.isdigit())


# Where TF Serving sees the model repository: the path the usual container mount gives it
# (docker run -v "$PWD/models:/models" tensorflow/serving --model_config_file=/models/models.config).
SERVING_ROOT = "/models"
VALIDATED_LABEL = "validated"  # the registry alias, mirrored as a TF Serving version label


def base_path_here(base_path: str, repository: Path, serving_root: str = SERVING_ROOT) -> Path:
    """A ``models.config`` base path on this machine: one under ``serving_root`` (where TF Serving's container
    mounts the repository, as crossport writes it) is read from ``repository``; any other stands as it is."""
    root = serving_root.rstrip("/") + "/"
    if base_path.startswith(root):
        return Path(repository).resolve() / base_path[len(root):]
    return Path(base_path)


def publish_version(
    models_dir: Path,
    name: str,
    build: Callable[[Path], None],
    finalize: Callable[[Path, int], None],
    *,
    attempts: int = 20,
    serving_root: str | None = SERVING_ROOT,
) -> tuple[int, Path]:
    """Build a version with ``build(tmp)``, stamp it with ``finalize(tmp, N)``, rename to ``N``."""
    base = Path(models_dir) / name
    try:
        base.mkdir(parents=True, exist_ok=True)
        remove_leftovers(base)
        staging = base / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as error:
        raise PublishError(f"cannot write to models directory {models_dir}: {error.strerror}.",
                           hint="Check its permissions and free space, or pass another --models-dir.") from error
    try:
        build(staging)
        for _ in range(attempts):
            version = (versions(base) or [0])[-1] + 1
            finalize(staging, version)
            target = base / str(version)
            try:
                os.rename(staging, target)  # atomic; fails if another run took N meanwhile
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            _fsync_dir(base)
            write_models_config(Path(models_dir), serving_root)
            return version, target
        raise PublishError(f"could not claim a free version number under {base} in {attempts} attempts.",
                           hint="Another process keeps publishing there; try again.")
    except OSError as error:
        raise PublishError(f"publishing under {base} failed: {error}.",
                           hint="Nothing was published; check free space and permissions, then re-run "
                                "--stage publish.") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


CONFIG_HEADER = "# TF Serving ModelServerConfig, rewritten by crossport on every publish: lists each model here.\n"
DOCS = ("README.md",)  # a folder's own documentation (the checkout's models/README.md) is left alone


def is_crossport_model(folder: Path) -> bool:
    """Every entry is a crossport version (with its manifest) or a hidden staging directory."""
    return folder.is_dir() and all(
        child.name.startswith(TEMP_PREFIX)
        or (child.name.isdigit() and (child / "assets.extra" / "manifest.json").is_file())
        for child in folder.iterdir())


def check_repository(models_dir: Path, name: str) -> None:
    """Refuse a models directory crossport did not make (see :func:`foreign_content`), in one line."""
    problem = foreign_content(Path(models_dir), name)
    if problem:
        raise PublishError(f"--models-dir {models_dir} {problem}; publishing would mix crossport's versions and "
                           "models.config with files crossport did not write.",
                           hint="Pass a new or empty --models-dir, or one crossport publishes into.")


def foreign_content(models_dir: Path, name: str) -> str | None:
    """Why ``models_dir`` is not a repository crossport may publish ``name`` into, or None.

    It may be absent or empty, or hold only crossport models, crossport's ``models.config``
    and a README. Publishing adds ``<name>/<N>`` and rewrites ``models.config``: a model
    folder or a config written by something else would be mixed with ours.
    """
    if models_dir.exists() and not models_dir.is_dir():
        return "is a file, not a directory"
    if not models_dir.is_dir():
        return None
    for child in sorted(models_dir.iterdir()):
        if child.name in DOCS:
            continue
        if child.name == MODELS_CONFIG:
            if child.is_file() and (child.read_text(errors="replace").startswith(CONFIG_HEADER)
                                    or all(is_crossport_model(c) for c in models_dir.iterdir() if c.is_dir())):
                continue
            return f"holds a {MODELS_CONFIG} that crossport did not write"
        if not is_crossport_model(child):
            what = "a model folder" if child.name == name else "a folder" if child.is_dir() else "a file"
            return f"holds {what} {child.name!r} that is not a crossport model"
    return None


def remove_leftovers(base: Path) -> list[Path]:
    """Delete staging directories of publishers that died (killed, crashed) before renaming.

    They are hidden from TF Serving anyway (not integer-named); a live publisher's own
    staging directory (its PID still running) is left alone.
    """
    removed = []
    for child in base.glob(f"{TEMP_PREFIX}*"):
        pid = child.name.removeprefix(TEMP_PREFIX).split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    if removed:
        log.info("removed %d leftover staging director%s under %s", len(removed), "y" if len(removed) == 1 else "ies",
                 base)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_models_config(models_dir: Path, serving_root: str | None = SERVING_ROOT) -> Path:
    """Rewrite ``models.config`` (TF Serving ``ModelServerConfig`` text) listing every published model.

    Base paths are ``<serving_root>/<name>``, where TF Serving finds the repository (None: this machine's
    absolute paths). Each model's newest version — every published version passed the gate — carries the
    version label ``validated``."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for child in sorted(models_dir.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and versions(child):
            entry = config.model_config_list.config.add()
            entry.name = child.name
            entry.base_path = f"{serving_root.rstrip('/')}/{child.name}" if serving_root else str(child.resolve())
            entry.model_platform = "tensorflow"
            entry.version_labels[VALIDATED_LABEL] = versions(child)[-1]
    path = models_dir / MODELS_CONFIG
    write_bytes_atomic(path, (CONFIG_HEADER + text_format.MessageToString(config)).encode())
    return path
