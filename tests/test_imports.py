"""Every module imports on its own (no import circle hides behind the order in which other modules happen
to load), and the commands that never train start without torch.

A fresh interpreter per module would pay for torch, Ray and MLflow each time. One fresh interpreter
imports the third-party libraries instead, and no module of this project, then forks a child per module:
each child starts with none of the project loaded, as a fresh interpreter would. The commands are
entry points, so each of those still gets an interpreter of its own."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import package_folders

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(f"{package}.{path.stem}".removesuffix(".__init__")
                 for package, folder in package_folders().items() for path in folder.glob("*.py")
                 if path.stem != "__main__")
# What the project's modules import that takes seconds; anything else each child imports itself.
THIRD_PARTY = ["torch", "transformers", "ray", "ray.tune", "ray.train", "mlflow", "mlflow.pyfunc", "optuna", "datasets",
               "pyarrow.fs", "safetensors.torch", "sklearn.metrics", "pandas", "yaml"]

FORKED_IMPORTS = textwrap.dedent("""
    import importlib, json, os, sys, traceback

    third_party, packages, modules, answer = json.loads(sys.argv[1])
    for name in third_party:
        importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in packages)
    results = {"loaded before forking": loaded}
    for module in modules:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: import the module, write its traceback (nothing if it imported), exit
            os.close(read)
            try:
                importlib.import_module(module)
                failure = ""
            except BaseException:
                failure = traceback.format_exc()
            os.write(write, failure[-3000:].encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            failure = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        results[module] = failure or ("" if status == 0 else f"the child ended with wait status {status}")
    with open(answer, "w") as out:
        json.dump(results, out)
""")


@pytest.fixture(scope="module")
def forked_imports(tmp_path_factory) -> dict[str, str]:
    """Each module's import failure ("" where it imported), from its own forked child."""
    answer = tmp_path_factory.mktemp("imports") / "results.json"
    arguments = json.dumps([THIRD_PARTY, ["softprompt"], MODULES, str(answer)])
    done = subprocess.run([sys.executable, "-c", FORKED_IMPORTS, arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(answer.read_text())


def test_the_packages_have_modules_to_import():
    assert {"softprompt", "softprompt.cli.main", "softprompt.search.tuner", "softprompt.spaces",
            "softprompt.trainables.loop"} <= set(MODULES)


def test_the_forking_interpreter_has_no_project_module_loaded(forked_imports):
    """Else a child would inherit it, and a circle through it would go unseen."""
    assert forked_imports["loaded before forking"] == []


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_in_a_fresh_interpreter(module, forked_imports):
    assert forked_imports[module] == ""


def test_a_module_that_fails_to_import_is_reported_by_its_child(tmp_path):
    """The forked check can fail: a module in an import circle, and one that raises."""
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circle.b import B\nA = 1\n")
    (package / "b.py").write_text("from circle.a import A\nB = 1\n")
    (package / "boom.py").write_text("raise RuntimeError('boom')\n")
    answer = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-c", FORKED_IMPORTS,
                           json.dumps([[], ["circle"], ["circle.a", "circle", "circle.boom"], str(answer)])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(answer.read_text())
    assert "ImportError" in results["circle.a"] and "circular import" in results["circle.a"]
    assert results["circle"] == ""
    assert "RuntimeError: boom" in results["circle.boom"]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["cluster", "check", "cluster.yaml"],
                                  ["jobs", "status", "raysubmit_1", "--address", "http://127.0.0.1:9"]])
def test_commands_that_never_train_do_not_import_torch(argv):
    result = python("import sys\nfrom softprompt.cli.main import main\n"
                    f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                    "print('torch' in sys.modules)")
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout[-2000:] + result.stderr[-2000:]


def test_the_training_loop_and_its_model_code_run_without_ray():
    """`softprompt train` is one process: its loop reaches a shared backbone's server only through the
    backbone object it is given, so it never loads Ray."""
    result = python("import sys\nimport softprompt.trainables.loop, softprompt.models.evaluate\n"
                    "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout[-2000:] + result.stderr[-2000:]
