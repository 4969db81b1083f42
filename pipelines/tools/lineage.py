"""``python -m pipelines.lineage``: from a published servable back to its data.

    python -m pipelines.lineage models/emnist_mlp/7 [--json]
    python -m pipelines.lineage --name emnist_mlp --registry-version 3 [--tracking-uri URI]

Prints every file of the version with its sha256 (checked on disk now), the chain of
artifacts back to the dataset (each with its hash and parent), the dataset digest, the
code commit, the MLflow run ids and the registry version. Exit code 0 when every hash
matches and the version is registered (or was published without tracking), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from crossport.cli import integer
from crossport.errors import CrossportError, TrackingError

log = logging.getLogger("crossport")

# A model trained here: ... onnx ← checkpoint ← dataset; one brought as an ONNX file: ... onnx ← source_onnx.
CHAIN = ("saved_model", "tf_graph", "onnx", "checkpoint", "source_onnx", "dataset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m pipelines.lineage",
                                     description="Trace a published servable back to its data and verify it.")
    parser.add_argument("version_dir", nargs="?", type=Path, help="a published version: <models-dir>/<name>/<N>")
    parser.add_argument("--name", help="registered model name (with --registry-version)")
    parser.add_argument("--registry-version", type=integer(1), help="look the servable up by MLflow registry version")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the version was tracked in)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def trace(version_dir: Path, tracking_uri: str | None = None) -> dict:
    """Everything known about a published version, with hashes verified now."""
    from export.verify import check_version

    checked = check_version(version_dir)
    manifest, files = checked.manifest, checked.files
    lineage = manifest.get("lineage", {})
    chain = [{"name": name, **lineage[name]} for name in CHAIN if name in lineage]
    mlflow_ids = manifest.get("mlflow")
    registry = _registry(manifest, version_dir, tracking_uri)
    problems = list(checked.problems)
    if registry["status"] == "missing":
        problems.append(f"version {manifest['version']} is published but not registered in MLflow; repair with: "
                        f"python -m pipelines.run --stage register --run-dir {manifest['run_dir']}")
    return {
        "servable": str(version_dir), "name": manifest["name"], "version": manifest["version"],
        "created": manifest.get("created"), "run_dir": manifest.get("run_dir"),
        "dataset": manifest.get("dataset"), "source": manifest.get("source"), "provenance": manifest.get("provenance"),
        "files": files, "chain": chain, "mlflow": mlflow_ids, "registry": registry,
        "verified": not problems, "problems": problems,
    }


def _registry(manifest: dict, version_dir: Path, tracking_uri: str | None) -> dict:
    from pipelines.tracking import registry_lookup

    ids = manifest.get("mlflow")
    uri = tracking_uri or (ids or {}).get("tracking_uri")
    if not uri:
        return {"status": "untracked", "detail": "published with --no-tracking"}
    try:
        found = registry_lookup(uri, manifest["name"], servable_version=manifest["version"],
                                path=str(version_dir.resolve()))
    except Exception as error:  # an unreachable server must not hide the hash check
        return {"status": "unavailable", "detail": f"{uri}: {str(error).splitlines()[0]}"}
    if found is None:
        return {"status": "missing", "tracking_uri": uri}
    return {"status": "registered", "tracking_uri": uri, **found}


def resolve_registry_version(name: str, number: int, tracking_uri: str | None) -> Path:
    from pipelines.tracking import TAG_PREFIX, registry_lookup, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    found = registry_lookup(uri, name, registry_version=number)
    if found is None:
        raise TrackingError(f"registered model {name!r} has no version {number} in {uri}.",
                            hint="Check --name, --registry-version and --tracking-uri.")
    path = found["tags"].get(f"{TAG_PREFIX}servable_path")
    if not path:
        raise TrackingError(f"{name!r} version {number} in {uri} is not a crossport servable (no servable_path tag).")
    return Path(path)


def render(report: dict) -> str:
    lines = [f"{report['name']} servable version {report['version']}  ({report['servable']})",
             f"  created {report['created']} by run {report['run_dir']}"]
    page = Path(report["servable"]) / "assets.extra" / "parity.html"
    if page.is_file():
        lines.append(f"  parity report {page}  (open it in a browser)")
    lines += ["", "files (sha256 checked now):"]
    for entry in report["files"]:
        lines.append(f"  {'ok     ' if entry['ok'] else 'CHANGED'} {entry['path']:<42} {entry['sha256'][:16]}")
    lines += ["", "lineage (each artifact ← its parents):"]
    for link in report["chain"]:
        parents = ", ".join(f"{name} {sha[:12]}" for name, sha in link.get("parents", {}).items()) or "-"
        lines.append(f"  {link['name']:<12} {link['sha256'][:16]}  stage {link['stage']:<10} ← {parents}")
    source = report.get("source")
    if source:
        lines.append(f"  brought as ONNX file {source['path']} (sha256 {source['sha256'][:16]}, {source['producer']}, "
                     f"opset {source['opset']}, IR {source['ir_version']}), {len(source['normalization'])} "
                     "normalization step(s)")
    dataset = report.get("dataset") or {}
    lines.append(f"  dataset digest {dataset.get('digest')}  ({dataset.get('name')}: {dataset.get('source')})")
    code = (report.get("provenance") or {}).get("code") or {}
    lines.append(f"  code commit {code.get('commit')}{' (dirty tree)' if code.get('dirty') else ''}")
    ids = report.get("mlflow")
    if ids:
        lines += ["", f"MLflow ({ids.get('tracking_uri')}), experiment {ids.get('experiment_id')}:"]
        lines += [f"  {stage:<10} run {run_id}" for stage, run_id in ids.get("runs", {}).items()]
    registry = report["registry"]
    if registry["status"] == "registered":
        aliases = f", aliases {registry['aliases']}" if registry.get("aliases") else ""
        lines.append(f"  registry: {report['name']} version {registry['version']}{aliases}")
    else:
        lines.append(f"  registry: {registry['status']} {registry.get('detail', '')}".rstrip())
    lines.append("")
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]] or ["verified: every hash matches"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from crossport.console import run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: _lineage(args))


def _lineage(args: argparse.Namespace) -> int:
    if args.registry_version is not None:
        if not args.name:
            raise CrossportError("--registry-version needs --name (the registered model).")
        version_dir = resolve_registry_version(args.name, args.registry_version, args.tracking_uri)
    elif args.version_dir is not None:
        version_dir = args.version_dir
    else:
        raise CrossportError("expected a version directory or --name with --registry-version.",
                             hint="Example: python -m pipelines.lineage models/emnist_mlp/1")
    traced = trace(version_dir, args.tracking_uri)
    sys.stdout.write((json.dumps(traced, indent=2) if args.json else render(traced)) + "\n")
    return 0 if traced["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
