"""``python -m pipelines.serverless``: an AWS-Lambda-style package from a published version.

    python -m pipelines.serverless models/emnist_mlp/1 --out dist/lambda [--variant fp32|int8_dynamic|int8_full]
                                [--with-deps]

Writes ``DIR/`` (handler.py, model.tflite, labels.txt, requirements.txt, servable.json and
template.yaml, an AWS SAM template: the function behind API Gateway, PNG and JPEG as binary
media types) and ``DIR.zip`` beside it with the same files. The handler needs only
ai-edge-litert, numpy and pillow: ``sam build`` installs them from requirements.txt, or
``--with-deps`` vendors this environment's copies into the package, so the zip deploys as it
is on a Lambda of this machine's Python version and architecture (checked: Linux only).
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
from crossport.errors import ConfigError, PackageError
from crossport.files import model_repository_around
from crossport.formats import BY_NAME, SERVERLESS_VARIANTS
from crossport.interface import ASSETS_EXTRA

VARIANTS = SERVERLESS_VARIANTS
RUNTIME = ("ai-edge-litert", "numpy", "pillow")
HANDLER = Path(__file__).with_name("serverless_handler.py")
HANDLER_ENTRY = "handler.lambda_handler"
PACKAGE_FILES = {"handler.py", "model.tflite", "labels.txt", "requirements.txt", "servable.json", "template.yaml"}
LAMBDA_ZIP_LIMIT = 50 * 1024 * 1024  # AWS Lambda: a directly uploaded .zip (250 MB unzipped)
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024


def build_package(version_dir: Path, out: Path, variant: str = "fp32", *, force: bool = False,
                  with_deps: bool = False) -> tuple[Path, Path]:
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
    platform = lambda_platform() if with_deps else None  # refused before anything is written
    final, out = out, out.parent / f".{out.name}.partial-{os.getpid()}"  # built aside, swapped in last
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy2(HANDLER, out / "handler.py")
    shutil.copy2(Path(version_dir) / model_file, out / "model.tflite")
    shutil.copy2(extra / "labels.txt", out / "labels.txt")
    (out / "requirements.txt").write_text("".join(f"{name}=={metadata.version(name)}\n" for name in RUNTIME))
    vendored = vendor_runtime(out) if with_deps else []
    card = {"name": manifest["name"], "version": manifest["version"], "variant": variant,
            "model_sha256": expected[model_file], "handler": HANDLER_ENTRY,
            "runtime": platform or lambda_platform(strict=False), "vendored": vendored}
    (out / "servable.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "template.yaml").write_text(sam_template(card))
    archive = final.with_suffix(".zip")
    partial_zip = out.with_suffix(".zip")
    with zipfile.ZipFile(partial_zip, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(out).as_posix())
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    out.rename(final)
    os.replace(partial_zip, archive)
    return final, archive


def lambda_platform(*, strict: bool = True) -> dict:
    """The Lambda runtime and architecture this environment's native wheels fit (``python3.11``, ``x86_64``)."""
    import platform

    machine = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower())
    if strict and (sys.platform != "linux" or machine is None):
        raise PackageError(f"--with-deps vendors this environment's native wheels, which must be Linux x86_64 or "
                           f"arm64 for AWS Lambda; this is {sys.platform} {platform.machine()}.",
                           hint="Build without --with-deps and let `sam build --use-container` install "
                                "requirements.txt, or build on Linux.")
    return {"python": f"python{sys.version_info.major}.{sys.version_info.minor}", "architecture": machine or "x86_64"}


def vendor_runtime(out: Path) -> list[str]:
    """Copy this environment's installed copies of :data:`RUNTIME` (the versions crossport validated with, as
    requirements.txt pins them) into ``out``; returns the top-level names added."""
    added: set[str] = set()
    for name in RUNTIME:
        distribution = metadata.distribution(name)
        for entry in distribution.files or ():
            parts = Path(str(entry)).parts
            if not parts or parts[0] == ".." or "__pycache__" in parts:
                continue  # console scripts outside site-packages; bytecode is rebuilt where it runs
            source = Path(distribution.locate_file(entry))
            if source.is_file():
                target = out / Path(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
                added.add(parts[0])
    return sorted(added)


def sam_template(card: dict) -> str:
    """An AWS SAM template: the handler as a function behind an API Gateway POST /predict (JSON, or a raw PNG or
    JPEG body as a binary media type), on the Python and architecture the package was built for."""
    runtime = card["runtime"]
    return f"""# AWS SAM template written by crossport (python -m pipelines.serverless) for {card['name']} version \
{card['version']} ({card['variant']}).
# Deploy from this folder: sam build && sam deploy --guided
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Description: "crossport {card['name']} version {card['version']} ({card['variant']} TFLite) behind API Gateway"
Globals:
  Api:
    BinaryMediaTypes:
      - image~1png
      - image~1jpeg
Resources:
  PredictFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: .
      Handler: {card['handler']}
      Runtime: {runtime['python']}
      Architectures:
        - {runtime['architecture']}
      MemorySize: 1024
      Timeout: 10
      Events:
        Predict:
          Type: Api
          Properties:
            Path: /predict
            Method: post
Outputs:
  PredictUrl:
    Description: "POST a JSON body, or a PNG with Content-Type: image/png"
    Value:
      Fn::Sub: "https://${{ServerlessRestApi}}.execute-api.${{AWS::Region}}.amazonaws.com/Prod/predict"
"""


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
    return (isinstance(card, dict) and card.get("handler") == HANDLER_ENTRY
            and names == PACKAGE_FILES | set(card.get("vendored") or ()))


def _is_package_zip(archive: Path) -> bool:
    if not archive.exists():
        return True
    try:
        with zipfile.ZipFile(archive) as bundle:
            names = bundle.namelist()
            card = json.loads(bundle.read("servable.json")) if "servable.json" in names else {}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False
    vendored = set(card.get("vendored") or ()) if isinstance(card, dict) else set()
    return {name.split("/")[0] for name in names} == PACKAGE_FILES | vendored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serverless", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("version_dir", type=Path, help="a published version: <models-dir>/<name>/<N>")
    parser.add_argument("--out", type=Path, required=True, help="package directory to write (DIR and DIR.zip)")
    parser.add_argument("--variant", default="fp32", choices=VARIANTS, help="TFLite variant (default: fp32)")
    parser.add_argument("--force", action="store_true",
                        help="replace an --out that holds other files (never inside a model repository)")
    parser.add_argument("--with-deps", action="store_true",
                        help="vendor ai-edge-litert, numpy and pillow (this environment's copies) into the package, "
                             "so the zip deploys as it is (Linux only; the Lambda's Python and architecture must "
                             "match this machine's)")
    args = parser.parse_args(argv)

    def body() -> int:
        directory, archive = build_package(args.version_dir, args.out, args.variant, force=args.force,
                                           with_deps=args.with_deps)
        sys.stdout.write(instructions(directory, archive) + "\n")
        return 0

    from crossport.console import run_command

    return run_command(body)


def instructions(directory: Path, archive: Path) -> str:
    """What was written and how to deploy it, for a package with or without its runtime."""
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    zipped = archive.stat().st_size
    card = json.loads((directory / "servable.json").read_text())
    runtime = card["runtime"]
    lines = [f"package {directory}/ ({size / 1e6:.2f} MB) and zip {archive} beside it ({zipped / 1e6:.2f} MB); "
             f"handler {HANDLER_ENTRY}, {runtime['python']} on {runtime['architecture']}"]
    if card.get("vendored"):
        lines.append(f"runtime vendored ({', '.join(card['vendored'])}): the zip deploys as it is, e.g. aws lambda "
                     f"create-function --function-name {card['name']} --runtime {runtime['python']} --architectures "
                     f"{runtime['architecture']} --handler {HANDLER_ENTRY} --memory-size 1024 "
                     f"--zip-file fileb://{archive} --role <execution-role-arn>")
        if zipped > LAMBDA_ZIP_LIMIT or size > LAMBDA_UNZIPPED_LIMIT:
            lines.append(f"warning: over Lambda's direct-upload limits (50 MB zipped, 250 MB unzipped): upload the "
                         f"zip to S3 (--code S3Bucket=...), or use sam deploy from {directory}")
    else:
        lines.append(f"runtime not included: cd {directory} && sam build && sam deploy --guided (sam build installs "
                     "requirements.txt for the Lambda runtime), or rebuild with --with-deps for a zip that deploys "
                     "as it is")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
