"""Where a run came from: code commit (and whether the tree was dirty), packages, platform."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

from pipelines.config import PROJECT_ROOT

KEY_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "onnx-tf", "tensorflow",
                "tensorflow-probability", "tf-keras", "ai-edge-litert", "mlflow", "numpy", "protobuf",
                "scikit-learn")


def code_version() -> dict:
    """The git commit of the project and a dirty flag; ``None`` fields outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Installed distributions and versions (all of them, or ``names``)."""
    if names is None:
        found = {dist.metadata["Name"]: dist.version for dist in metadata.distributions() if dist.metadata["Name"]}
        return dict(sorted(found.items(), key=lambda item: item[0].lower()))
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance() -> dict:
    from pipelines.memory import ONE_HEAP

    return {
        "code": code_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(KEY_PACKAGES),
        # the allocator settings a run's peak memory depends on (pipelines.memory.one_heap); None where unset
        "allocator": {name: os.environ.get(name) for name in ONE_HEAP},
    }
