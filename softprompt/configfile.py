"""What reading a config file needs and nothing more (no torch): the YAML loader, `--set` parsing, the
tracking URI check, and small rules that check a mapping's fields in one line each. Commands refuse a bad
file with it before importing torch and Ray."""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from softprompt.errors import ConfigError, one_line


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file", str(path), "an existing YAML file")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))  # -sig: a byte-order mark is skipped
    except UnicodeDecodeError as error:
        raise ConfigError("config file", str(path), f"a UTF-8 text file (byte {error.start} is not UTF-8: save it "
                                                    f"as UTF-8)") from None
    except yaml.YAMLError as error:
        raise ConfigError("config file", str(path), f"valid YAML ({one_line(error)})") from None
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


# ---- rules: a field's check and the text that says what is allowed ----

@dataclass(frozen=True)
class Rule:
    check: Callable[[object], bool]
    allowed: str


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def one_of(*choices, optional: bool = False) -> Rule:
    return Rule(lambda v: (optional and v is None) or v in choices,
                "one of " + ", ".join(map(str, choices)) + (" or null" if optional else ""))


def integer(low: int, high: int | None = None, optional: bool = False) -> Rule:
    text = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "") + (" or null" if optional else "")
    return Rule(lambda v: (optional and v is None) or (is_int(v) and v >= low and (high is None or v <= high)), text)


def number(low: float, high: float | None = None, low_open: bool = False, optional: bool = False) -> Rule:
    def check(v) -> bool:
        if optional and v is None:
            return True
        return is_number(v) and (v > low if low_open else v >= low) and (high is None or v <= high)
    text = f"a finite number {'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    return Rule(check, text + (" or null" if optional else ""))


def text(optional: bool = False) -> Rule:
    return Rule(lambda v: (optional and v is None) or (isinstance(v, str) and v.strip() != ""),
                "a non-empty string" + (" or null" if optional else ""))


def check_fields(values: dict, rules: dict[str, Rule], source: str | None, prefix: str = "") -> None:
    for key, value in values.items():
        if key not in rules:
            close = difflib.get_close_matches(str(key), rules, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(prefix + str(key), value, f"unknown field; {hint}known fields: {', '.join(rules)}",
                              source)
        if not rules[key].check(value):
            raise ConfigError(prefix + key, value, rules[key].allowed, source)
