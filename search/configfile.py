"""What reading a config file needs and nothing more (no torch): the one-line config error, the
YAML loader and `--set` parsing. Commands that never train (`cluster check`, `submit`, `jobs`)
import only this; search/config.py holds the rules."""
from __future__ import annotations

from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user mistake in a config: one line, no traceback."""

    def __init__(self, field: str, value, allowed: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field} = {value!r} is not allowed: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file", str(path), "an existing YAML file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError("config file", str(path), f"valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError("config file", str(path), "a YAML mapping of field: value")
    return values


def parse_overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs, values parsed as YAML scalars (so 0.3 is a float, null is None)."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--set", pair, "key=value")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides
