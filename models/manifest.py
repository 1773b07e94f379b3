"""The manifest of an LM-adaptation job (OUT/lm-adapt.yaml), its one reader and writer: which
checkpoint holds how many adaptation steps of which base model. Searches read it (a `checkpoints:`
entry), so this module imports neither torch nor Ray."""
from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

from softprompt.configfile import ConfigError

MANIFEST_FILE, MANIFEST_FORMAT = "lm-adapt.yaml", "softprompt-lm-adapt/1"


def write_manifest(out: Path, job: dict, steps: tuple[int, ...]) -> Path:
    """OUT/lm-adapt.yaml: the job's settings (`job`: base_model, corpus, ...) and each requested step
    whose checkpoint is saved, as a folder relative to OUT."""
    saved = [s for s in steps if (out / f"step-{s}" / "config.json").is_file()]
    manifest = {"format": MANIFEST_FORMAT, **job, "objective": "prefix_lm",
                "checkpoints": [{"steps": s, "path": f"step-{s}"} for s in saved]}
    path = out / MANIFEST_FILE
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def read_manifest(path: str | Path) -> tuple[dict[str, int], str]:
    """A manifest's checkpoints (absolute folder -> adaptation steps, most adapted first) and its base
    model. `path` is the manifest or its folder."""
    path = Path(path).expanduser()
    path = path / MANIFEST_FILE if path.is_dir() else path
    try:
        manifest = yaml.safe_load(path.read_text())
        if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
                or not manifest.get("checkpoints")):
            raise ValueError("not one")
        saved = {str((path.parent / c["path"]).resolve()): int(c["steps"]) for c in manifest["checkpoints"]}
        return dict(sorted(saved.items(), key=lambda item: -item[1])), str(manifest["base_model"])
    except (OSError, yaml.YAMLError, ValueError, TypeError, KeyError) as error:
        raise ConfigError("checkpoints", str(path),
                          f"a {MANIFEST_FORMAT} manifest with at least one saved checkpoint, "
                          f"as `softprompt lm-adapt` writes ({type(error).__name__})") from None


def expand_manifests(checkpoints: list[str]) -> list[str]:
    """A search's checkpoints with each manifest (the file, or the folder that holds it) replaced by
    its checkpoint folders, most adapted first (the paper's default: the longest adaptation)."""
    expanded = []
    for entry in checkpoints:
        path = Path(entry).expanduser()
        is_manifest = path.name == MANIFEST_FILE or (path.is_dir() and (path / MANIFEST_FILE).is_file())
        expanded += list(read_manifest(path)[0]) if is_manifest else [entry]
    return expanded


def adaptation_steps(checkpoints) -> dict[str, int]:
    """Checkpoint -> its LM-adaptation steps: for each checkpoint a manifest beside it lists, and 0 for
    that manifest's base model where the search lists it too (Figure 3d's first point)."""
    steps, bases = {}, set()
    for entry in checkpoints:
        manifest = Path(entry).expanduser().parent / MANIFEST_FILE
        with contextlib.suppress(ConfigError):  # a model folder beside something else's file of that name
            saved, base = read_manifest(manifest) if manifest.is_file() else ({}, None)
            if str(Path(entry).expanduser().resolve()) in saved:
                steps[entry] = saved[str(Path(entry).expanduser().resolve())]
                bases.add(base)
    return {**steps, **{entry: 0 for entry in checkpoints if entry in bases}}
