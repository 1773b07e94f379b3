"""A task's template: a row's raw columns -> the model's input. One owner for training and serving,
so both format a row alike; it imports nothing, so a served model formats without `datasets`."""
from __future__ import annotations

from string import Formatter


def template_columns(template: str) -> list[str]:
    """The columns a template names, each once, in order of first use."""
    return list(dict.fromkeys(field for _, field, _, _ in Formatter().parse(template) if field is not None))


def format_input(template: str, row: dict) -> str:
    """The model's input for a row: the template with each column's value, stripped."""
    return "".join(literal + ("" if field is None else str(row[field]).strip())
                   for literal, field, _, _ in Formatter().parse(template))
