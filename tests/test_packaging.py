"""`pip install` of softprompt adds one import name, `softprompt`, and its one command: nothing else at the
top level of site-packages, where generic names (`search`, `spaces`: Hugging Face's package of that name)
would overwrite or shadow another distribution's. The wheel is built from the repository's files as a
user's pip builds it, installed into a new virtual environment, and run from there."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import package_folders

ROOT = Path(__file__).resolve().parents[1]


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_a_clean_install_adds_softprompt_alone_and_its_command_runs_from_it(tmp_path):
    source = tmp_path / "source"  # what the wheel is built from: the project file and each package's folder
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for folder in package_folders().values():
        shutil.copytree(folder, source / folder.relative_to(ROOT),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "wheels", source)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    site = next(venv.glob("lib/python*/site-packages"))
    before = {p.name for p in site.iterdir()}
    wheel = next((tmp_path / "wheels").glob("softprompt-*.whl"))
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel)

    added = {p.name for p in site.iterdir()} - before
    assert {a for a in added if not a.endswith(".dist-info")} == {"softprompt"}
    assert [a for a in added if a.endswith(".dist-info")] == [f"softprompt-{wheel.name.split('-')[1]}.dist-info"]
    assert sorted(p.name for p in (site / "softprompt").iterdir() if p.is_dir() and p.name != "__pycache__") == \
        ["adaptation", "backbone_server", "cli", "models", "search", "serving", "spaces", "trainables"]

    # the installed package runs: the libraries it needs from this environment (PYTHONPATH, with no .pth
    # read: this project's editable install stays out), softprompt from the new one, away from the repository
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))}
    where = run(venv / "bin" / "python", "-c", "import softprompt.cli.main as cli, softprompt.spaces as spaces; "
                                               "print(cli.__file__); print(spaces.__file__)", cwd=tmp_path, env=env)
    assert [Path(line).relative_to(site).parts[:2] for line in where.stdout.split()] == \
        [("softprompt", "cli"), ("softprompt", "spaces")]
    usage = run(venv / "bin" / "softprompt", "--help", cwd=tmp_path, env=env)
    assert usage.stdout.startswith("usage: softprompt") and "lm-adapt" in usage.stdout
