"""What reading a config file needs and nothing more (no torch): the one-line config error, the
YAML loader, `--set` parsing and the tracking URI check. Commands that never train (`cluster check`, `submit`, `jobs`)
import only this; search/config.py holds the rules."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from trainables.errors import UserError

STORAGE_PATH = "runs/search"  # where searches live unless a config or --storage-path names another place


class ConfigError(UserError):
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


def check_tracking_uri(uri: str) -> str | None:
    """A usable tracking URI, or None for `none` (tracking off)."""
    if uri.lower() == "none":
        return None
    if uri.startswith(("http://", "https://")) and "@" in urlsplit(uri).netloc:
        # the URI is printed, saved beside the search and handed to every trial: no secret may ride in it
        raise ConfigError("--tracking-uri", _without_password(uri),
                          "a URI without credentials: put them in MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
    if uri.startswith(("sqlite:///", "http://", "https://", "databricks")):
        return uri
    raise ConfigError("--tracking-uri", uri, "sqlite:///PATH, http(s)://HOST:PORT of a tracking server, or none")


def _without_password(uri: str) -> str:
    parts = urlsplit(uri)
    return parts._replace(netloc=f"***@{parts.netloc.rpartition('@')[2]}").geturl()
