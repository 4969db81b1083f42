"""Layering beyond what `make lint`'s import-linter contracts (pyproject.toml) check: MLflow in one
module, heavy frameworks out of the CLI path, and the tables and contract declared once."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("crossport", "training", "export", "serving", "translation")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_mlflow_is_imported_by_the_tracking_module_only():
    users = sorted(str(path.relative_to(ROOT)) for package in (*LIBRARY, "pipelines", "tools")
                   for path in (ROOT / package).rglob("*.py") if "mlflow" in imported_modules(path))
    # tracking.py, and the pyfunc it registers: MLflow loads that file on its own ("models from code")
    assert users == ["pipelines/mlflow_model.py", "pipelines/tracking.py"]


def test_mlflow_folder_never_shadows_the_mlflow_package():
    assert (ROOT / "mlflow" / "README.md").is_file()
    assert not (ROOT / "mlflow" / "__init__.py").exists()


def test_heavy_frameworks_are_not_imported_at_module_level_in_the_cli_path():
    stages = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "pipelines" / "stages").glob("*.py"))]
    assert len(stages) >= 7, stages
    for module in ("pipelines/run.py", "pipelines/config.py", "pipelines/gate.py", *stages, "pipelines/manifest.py",
                   "pipelines/tracking.py", "crossport/parity.py", "crossport/exact/__init__.py",
                   "crossport/exact/rounding.py"):
        tree = ast.parse((ROOT / module).read_text())
        top_level = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top_level.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                top_level.add(node.module.split(".")[0])
        assert not top_level & {"tensorflow", "torch", "onnx_tf", "onnxruntime", "mlflow"}, module


FORMAT_WORDS = {"onnx", "saved_model", "fp32", "fp16", "int8_dynamic", "int8_full", "tflite_fp32", "tflite_fp16",
                "tflite_int8_dynamic", "tflite_int8_full"}


def test_the_list_of_formats_is_declared_once():
    """crossport/formats.py is the one table; a module spelling out three or more formats re-declares it.

    (Two are a deliberate pick — the benchmark's quick subset, the lineage chain — not a copy of the list.)
    """
    offenders = []
    for package in (*LIBRARY, "pipelines"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "crossport" / "formats.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
                if not isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) or items is None:
                    continue
                named = {item.value for item in items if isinstance(item, ast.Constant) and item.value in FORMAT_WORDS}
                if len(named) >= 3:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(named)}")
    assert offenders == []


def test_the_input_size_is_declared_once():
    """crossport/interface.py owns the I/O contract (the serverless handler runs without crossport and keeps
    its own copy)."""
    exempt = {ROOT / "crossport" / "interface.py", ROOT / "serving" / "serverless_handler.py"}
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for package in (*LIBRARY, "pipelines") for path in (ROOT / package).rglob("*.py") if path not in exempt
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 784
    ]
    assert offenders == []


def test_every_format_names_a_runtime_of_the_one_loader_table():
    from crossport.formats import FORMATS
    from crossport.runtimes import LOADERS

    assert {fmt.loader for fmt in FORMATS} == set(LOADERS)


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers.py (and the fixtures in conftest.py): a test module importing another
    runs that module's imports and couples the two."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name} imports {name}" for name in names if name.startswith("tests.test_")]
    assert offenders == []
