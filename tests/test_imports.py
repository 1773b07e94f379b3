"""Every module imports on its own in a fresh interpreter (no import circle hides behind the order in
which other modules happen to load), and the commands that never train start without torch."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
MODULES = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_packages_have_modules_to_import():
    assert {"search.cli", "search.record", "spaces", "trainables.loop"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_in_a_fresh_interpreter(module):
    result = python(f"import {module}")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["cluster", "check", "cluster.yaml"],
                                  ["jobs", "status", "raysubmit_1", "--address", "http://127.0.0.1:9"]])
def test_commands_that_never_train_do_not_import_torch(argv):
    result = python("import sys\nfrom search.cli import main\n"
                    f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                    "print('torch' in sys.modules)")
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout[-2000:] + result.stderr[-2000:]
