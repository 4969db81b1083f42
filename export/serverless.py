"""``python -m export.serverless``: an AWS-Lambda-style package from a published version.

    python -m export.serverless models/emnist_mlp/1 --out dist/lambda [--variant fp32|int8_dynamic|int8_full]

Writes ``DIR/`` (handler.py, model.tflite, labels.txt, requirements.txt, servable.json) and
``DIR.zip`` with the same files. The handler needs only ai-edge-litert, numpy and pillow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from crossport.errors import ConfigError, CrossportError, PackageError, report
from crossport.files import sha256_file
from crossport.formats import BY_NAME, SERVERLESS_VARIANTS
from crossport.interface import ASSETS_EXTRA

VARIANTS = SERVERLESS_VARIANTS
RUNTIME = ("ai-edge-litert", "numpy", "pillow")
HANDLER = Path(__file__).with_name("serverless_handler.py")


def build_package(version_dir: Path, out: Path, variant: str = "fp32") -> tuple[Path, Path]:
    """Build the package directory and its zip; returns (directory, zip path)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}.")
    extra = Path(version_dir) / ASSETS_EXTRA
    manifest_path = extra / "manifest.json"
    if not manifest_path.is_file():
        raise PackageError(f"{version_dir} is not a published crossport version: no assets.extra/manifest.json.",
                           hint="Pass a directory like models/emnist_mlp/1.")
    manifest = json.loads(manifest_path.read_text())
    expected = {entry["path"]: entry["sha256"] for entry in manifest["artifacts"]}
    model_file = BY_NAME[f"tflite_{variant}"].path
    for relative in (model_file, "assets.extra/labels.txt"):
        source = Path(version_dir) / relative
        if not source.is_file() or sha256_file(source) != expected.get(relative):
            raise PackageError(f"{source} is missing or differs from the version's manifest.",
                               hint="Check the version with python -m pipelines.lineage.")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(HANDLER, out / "handler.py")
    shutil.copy2(Path(version_dir) / model_file, out / "model.tflite")
    shutil.copy2(extra / "labels.txt", out / "labels.txt")
    (out / "requirements.txt").write_text("".join(f"{name}=={metadata.version(name)}\n" for name in RUNTIME))
    card = {"name": manifest["name"], "version": manifest["version"], "variant": variant,
            "model_sha256": expected[model_file], "handler": "handler.lambda_handler"}
    (out / "servable.json").write_text(json.dumps(card, indent=2) + "\n")
    archive = out.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(out.iterdir()):
            bundle.write(path, path.name)
    return out, archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.serverless", description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="a published version: <models-dir>/<name>/<N>")
    parser.add_argument("--out", type=Path, required=True, help="package directory to write (DIR and DIR.zip)")
    parser.add_argument("--variant", default="fp32", choices=VARIANTS, help="TFLite variant (default: fp32)")
    args = parser.parse_args(argv)
    try:
        directory, archive = build_package(args.version_dir, args.out, args.variant)
    except CrossportError as error:
        return report(error)
    size = sum(p.stat().st_size for p in directory.iterdir()) / 1e6
    zipped = archive.stat().st_size / 1e6
    sys.stdout.write(f"package {directory} ({size:.2f} MB), zip {archive} ({zipped:.2f} MB)\n"
                     f"handler: handler.lambda_handler; install: pip install -r {directory / 'requirements.txt'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
