"""No command accepts a prefix of a flag: argparse's abbreviations would turn `--mod cnn` into `--models-dir cnn`."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("crossport", "training", "translation", "export", "serving", "pipelines", "tools")


def test_every_parser_turns_abbreviations_off():
    parsers = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                    keywords = {k.arg: k.value for k in node.keywords}
                    allowed = keywords.get("allow_abbrev")
                    parsers.append((str(Path(path).relative_to(ROOT)), isinstance(allowed, ast.Constant)
                                    and allowed.value is False))
    assert len(parsers) >= 10 and all(ok for _, ok in parsers), [path for path, ok in parsers if not ok]


@pytest.mark.slow
def test_a_prefix_is_refused_not_guessed():
    result = subprocess.run([sys.executable, "-m", "pipelines.run", "--mod", "cnn", "--no-tracking"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unrecognized arguments: --mod cnn" in result.stderr
