"""This package as one folder, for what carries code to other processes and machines: a Ray job's
py_modules, an MLflow model's code_paths. Its rooms live beside one another in the repository and
under `softprompt/` in an installed wheel; the copy is the installed layout either way."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOMS = ("adaptation", "backbone_server", "cli", "models", "search", "serving", "spaces", "trainables")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def copy_package(target: str | Path, rooms: tuple[str, ...] = ROOMS) -> Path:
    """`softprompt` with `rooms` only, copied to TARGET/softprompt; returns that folder."""
    package = Path(target) / "softprompt"
    shutil.copytree(Path(__file__).parent, package, ignore=lambda folder, names: {*_SKIP(folder, names), *ROOMS})
    for room in rooms:
        source = importlib.util.find_spec(f"softprompt.{room}").submodule_search_locations[0]
        shutil.copytree(source, package / room, ignore=_SKIP)
    return package
