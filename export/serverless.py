"""``python -m export.serverless``: an AWS-Lambda-style package from a published version.

    python -m export.serverless models/emnist_mlp/1 --out dist/lambda [--variant fp32|int8_dynamic|int8_full]

Writes ``DIR/`` (handler.py, model.tflite, labels.txt, requirements.txt, servable.json) and
``DIR.zip`` with the same files. The handler needs only ai-edge-litert, numpy and pillow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from crossport.cli import summary_line
from crossport.errors import ConfigError, CrossportError, PackageError, report
from crossport.files import model_repository_around
from crossport.formats import BY_NAME, SERVERLESS_VARIANTS
from crossport.interface import ASSETS_EXTRA

VARIANTS = SERVERLESS_VARIANTS
RUNTIME = ("ai-edge-litert", "numpy", "pillow")
HANDLER = Path(__file__).with_name("serverless_handler.py")
HANDLER_ENTRY = "handler.lambda_handler"
PACKAGE_FILES = {"handler.py", "model.tflite", "labels.txt", "requirements.txt", "servable.json"}


def build_package(version_dir: Path, out: Path, variant: str = "fp32", *, force: bool = False) -> tuple[Path, Path]:
    """Build the package directory and its zip; returns (directory, zip path). See :func:`check_out`."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}.")
    from export.verify import check_version

    extra = Path(version_dir) / ASSETS_EXTRA
    checked = check_version(version_dir)
    if not checked.ok:
        raise PackageError(f"{version_dir} no longer matches its manifest: {'; '.join(checked.problems)}.",
                           hint="Check the version with python -m pipelines.lineage, or package another version.")
    manifest = checked.manifest
    expected = {entry["path"]: entry["sha256"] for entry in manifest["artifacts"]}
    model_file = BY_NAME[f"tflite_{variant}"].path
    if model_file not in expected:
        raise PackageError(f"{version_dir} has no {variant} TFLite file ({model_file} is not in its manifest).",
                           hint="Pick another --variant; see the version's SERVABLE.md for what it holds.")
    out = Path(out)
    check_out(out, force=force)
    final, out = out, out.parent / f".{out.name}.partial-{os.getpid()}"  # built aside, swapped in last
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy2(HANDLER, out / "handler.py")
    shutil.copy2(Path(version_dir) / model_file, out / "model.tflite")
    shutil.copy2(extra / "labels.txt", out / "labels.txt")
    (out / "requirements.txt").write_text("".join(f"{name}=={metadata.version(name)}\n" for name in RUNTIME))
    card = {"name": manifest["name"], "version": manifest["version"], "variant": variant,
            "model_sha256": expected[model_file], "handler": HANDLER_ENTRY}
    (out / "servable.json").write_text(json.dumps(card, indent=2) + "\n")
    archive = final.with_suffix(".zip")
    partial_zip = out.with_suffix(".zip")
    with zipfile.ZipFile(partial_zip, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(out.iterdir()):
            bundle.write(path, path.name)
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    out.rename(final)
    os.replace(partial_zip, archive)
    return final, archive


def check_out(out: Path, *, force: bool = False) -> None:
    """Refuse to write where the user's own files or a published version would be replaced.

    ``out`` may be absent, empty, or a package this command wrote (it is then rebuilt);
    anything else needs ``force``. Nothing inside a model repository is ever written.
    """
    place = model_repository_around(out)
    if place is not None:
        raise PackageError(f"--out {out} is inside the model repository {place}: a serverless package is never "
                           "written there, and a published version is never replaced.",
                           hint="Pass an --out outside the models directory, e.g. dist/emnist-lambda.")
    if out.exists() and not out.is_dir():
        raise PackageError(f"--out {out} is a file, expected a directory to write the package into.",
                           hint="Pass a new directory.")
    ours = _is_package(out) and _is_package_zip(out.with_suffix(".zip"))
    if not force and not ours and ((out.is_dir() and any(out.iterdir())) or out.with_suffix(".zip").exists()):
        raise PackageError(f"--out {out} (or {out.with_suffix('.zip').name}) already holds files this command did "
                           "not write; it would replace them.",
                           hint="Pass a new or empty --out, or add --force to replace them.")


def _is_package(directory: Path) -> bool:
    """Absent, empty, or exactly the files of a package this command wrote."""
    if not directory.exists():
        return True
    names = {path.name for path in directory.iterdir()}
    if not names:
        return True
    try:
        card = json.loads((directory / "servable.json").read_text())
    except (OSError, ValueError):
        return False
    return names == PACKAGE_FILES and isinstance(card, dict) and card.get("handler") == HANDLER_ENTRY


def _is_package_zip(archive: Path) -> bool:
    if not archive.exists():
        return True
    try:
        with zipfile.ZipFile(archive) as bundle:
            return set(bundle.namelist()) == PACKAGE_FILES
    except (OSError, zipfile.BadZipFile):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.serverless", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("version_dir", type=Path, help="a published version: <models-dir>/<name>/<N>")
    parser.add_argument("--out", type=Path, required=True, help="package directory to write (DIR and DIR.zip)")
    parser.add_argument("--variant", default="fp32", choices=VARIANTS, help="TFLite variant (default: fp32)")
    parser.add_argument("--force", action="store_true",
                        help="replace an --out that holds other files (never inside a model repository)")
    args = parser.parse_args(argv)
    try:
        directory, archive = build_package(args.version_dir, args.out, args.variant, force=args.force)
    except CrossportError as error:
        return report(error)
    size = sum(p.stat().st_size for p in directory.iterdir()) / 1e6
    zipped = archive.stat().st_size / 1e6
    sys.stdout.write(f"package {directory} ({size:.2f} MB), zip {archive} ({zipped:.2f} MB)\n"
                     f"handler: handler.lambda_handler; its runtime (requirements.txt) as a Lambda layer or container "
                     f"image, or vendored: pip install -r {directory / 'requirements.txt'} --target {directory}, "
                     "then zip the folder again\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
