"""Imports go one way between the rooms: each room may import its own modules and the rooms below it, never
a room above it or beside it. So the shared model code never reaches for a trial's, a trial's never for the
driver's, and the driver's never for the command line's; the rooms of one layer know nothing of each other.
Every import counts, at the top of a module or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import package_folders

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

# Top to bottom. The package root (`softprompt/`: errors, atomic files, config files, the package copy) is the
# bottom; `python -m softprompt` (softprompt/__main__.py) runs the command line, at the top.
LAYERS = [
    {"cli"},                                # the command (and `python -m softprompt`): calls the rooms below
    {"adaptation"},                         # LM adaptation, a Ray Train job: its driver and workers
    {"search"},                             # the driver of a search: config, Tuner, tracking, export
    {"serving", "trainables", "spaces"},    # a served prompt; a trial; a search space
    {"backbone_server"},                    # one frozen model shared by a node's trials
    {"models"},                             # model code every room shares: backbone, prompts, tasks
    {"softprompt"},                         # the package root
]


def room(module: str) -> str:
    """`softprompt.search.tuner` -> `search`; a module of the package root -> `softprompt`, but its
    `__main__` -> `cli`."""
    parts = module.split(".")
    if parts[1:] == ["__main__"]:
        return "cli"
    if len(parts) > 1 and parts[1] in {r for layer in LAYERS for r in layer} - {"softprompt"}:
        return parts[1]
    return "softprompt"


def layer(module: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room(module) in rooms)


def project_imports(source: str) -> set[str]:
    """Every `softprompt...` module a source imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "softprompt"}


def violations(imports: dict[str, set[str]]) -> list[str]:
    """`importer -> imported` for each import that goes up, or sideways into another room of its layer."""
    return sorted(f"{importer} -> {imported}" for importer, names in imports.items() for imported in names
                  if room(imported) != room(importer) and layer(imported) <= layer(importer))


def package_modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}": path for package, folder in package_folders().items()
            for path in folder.glob("*.py")}


def test_every_room_of_the_package_has_a_layer():
    rooms = {room(module) for module in package_modules()}
    assert rooms == {r for rooms in LAYERS for r in rooms}


def test_imports_go_down_the_layers_only():
    imports = {module: project_imports(path.read_text()) for module, path in package_modules().items()}
    assert sum(map(len, imports.values())) > 300  # the scan sees the project's imports
    assert violations(imports) == []


def test_an_import_up_or_sideways_is_a_violation_and_one_down_or_within_a_room_is_not():
    source = (
        "from softprompt.models.data import pad\n"
        "def later():\n"
        "    from softprompt.search.tuner import run_search\n"
        "    import softprompt.serving.rows\n"
        "from softprompt.trainables import loop\n")
    assert project_imports(source) == {"softprompt.models.data", "softprompt.models.data.pad",
                                                "softprompt.search.tuner", "softprompt.search.tuner.run_search",
                                                "softprompt.serving.rows", "softprompt.trainables",
                                                "softprompt.trainables.loop"}
    assert violations({"softprompt.trainables.loop": project_imports(source)}) == [
        "softprompt.trainables.loop -> softprompt.search.tuner",
        "softprompt.trainables.loop -> softprompt.search.tuner.run_search",
        "softprompt.trainables.loop -> softprompt.serving.rows"]
    assert violations({"softprompt.errors": {"softprompt.configfile"}, "softprompt.cli.main": {"softprompt.errors"},
                       "softprompt.__main__": {"softprompt.cli.main"}}) == []
    assert violations({"softprompt.errors": {"softprompt.models.hub"}}) == [
        "softprompt.errors -> softprompt.models.hub"]
