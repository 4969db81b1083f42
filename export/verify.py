"""Is a published version still what was published? Its manifest, re-checked on disk.

``<version>/assets.extra/manifest.json`` lists every file of the version with its sha256
(the SavedModel part as one tree hash, ``path: "."``). :func:`check_version` re-hashes
them now and also names files the manifest does not list and paths that lead outside the
version. Lineage reports the result; serve and the serverless builder refuse a version
that fails it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from crossport.errors import ManifestError
from crossport.files import sha256_path
from crossport.interface import ASSETS_EXTRA

MANIFEST = f"{ASSETS_EXTRA}/manifest.json"


@dataclass
class VersionCheck:
    manifest: dict
    files: list[dict] = field(default_factory=list)  # each listed file: name, path, sha256, actual_sha256, ok
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_manifest(version_dir: Path) -> dict:
    """The version's manifest, or one line saying why it cannot be read."""
    path = Path(version_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{version_dir} is not a published crossport version: no {MANIFEST}.",
                            hint="Pass a directory like models/emnist_mlp/1.")
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["artifacts"]
        if not (isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                                  and isinstance(e.get("sha256"), str) for e in entries)):
            raise TypeError("'artifacts' is not a list of {name, path, sha256}")
        missing = [key for key in ("name", "version") if key not in manifest]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ManifestError(f"{path} is unreadable or not a version manifest ({error.__class__.__name__}: {error}).",
                            hint="Re-publish the run with python -m pipelines.run --stage publish.") from error
    return manifest


def check_version(version_dir: Path) -> VersionCheck:
    """Re-hash every listed file; name changed, missing, unlisted and escaping ones."""
    version_dir = Path(version_dir)
    check = VersionCheck(read_manifest(version_dir))
    root = version_dir.resolve()
    listed = set()
    for entry in check.manifest["artifacts"]:
        target = version_dir / entry["path"]
        label = f"{entry.get('name')} ({entry['path']})"
        if not target.resolve().is_relative_to(root) or Path(entry["path"]).is_absolute():
            check.problems.append(f"{label} leads outside the version")
            check.files.append({**entry, "actual_sha256": None, "ok": False})
            continue
        exclude = (ASSETS_EXTRA,) if entry["path"] == "." else ()
        actual = sha256_path(target, exclude=exclude) if target.exists() else None
        ok = actual == entry["sha256"]
        check.files.append({**entry, "actual_sha256": actual, "ok": ok})
        listed.add(target.resolve())
        if not ok:
            check.problems.append(f"{label} changed: sha256 {actual[:12]}…, published {entry['sha256'][:12]}…"
                                  if actual else f"{label} is missing")
    for path in sorted(version_dir.rglob("*")):
        relative = path.relative_to(version_dir).as_posix()
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            check.problems.append(f"{relative} is a link leading outside the version")
        elif (relative.startswith(f"{ASSETS_EXTRA}/") and path.is_file() and relative != MANIFEST
              and path.resolve() not in listed):
            check.problems.append(f"{relative} is not listed in the version's manifest")
    return check
