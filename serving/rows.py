"""Request rows to answers, for every server of a prompt bundle (the MLflow model, Ray Serve): a
row's raw columns through its task's template, tokenised and cut as training did, scored by
serving/ensemble.py, answered in the task's own labels."""
from __future__ import annotations

from string import Formatter

from softprompt.models.templates import format_input, template_columns

UNFORMATTED = "{text}"  # bundles exported before templates travelled with prompts took formatted text


class RowError(ValueError):
    """A request row the bundle cannot score: one line naming the row and the column or task."""


def request_input(template: str, row: dict, task: str, number: int) -> str:
    """A request row's model input: the template over its raw columns. A one-column value that
    already carries the template's text around it (formatted input, as the MLflow model took before
    it applied templates) is taken as it is: formatting it again would score it wrongly."""
    columns = template_columns(template)
    missing = [c for c in columns if not isinstance(row.get(c), str)]
    if missing:
        raise RowError(f"row {number}: task {task!r} needs the raw text column(s) {missing} (its template is "
                       f"{template!r}); got columns {sorted(k for k, v in row.items() if isinstance(v, str))}")
    parts = list(Formatter().parse(template))  # (literal before, field, ...), then the trailing literal
    if len(columns) == 1 and len(parts) <= 2 and parts[0][1] is not None:
        head, tail = parts[0][0], (parts[1][0] if len(parts) == 2 else "")
        value = row[columns[0]]
        if (head or tail.strip()) and value.startswith(head) and value.rstrip().endswith(tail.rstrip()):
            return value
    return format_input(template, row)


def model_inputs(record: dict, tokenizer, is_encoder_decoder: bool, names: list, rows: list[dict]) -> list[list[int]]:
    """Each row's token ids under its task (`names`, one per row), cut to the task's max_length as
    training cut it. An unknown task or a missing column raises RowError."""
    tasks = record["tasks"]
    unknown = sorted({str(n) for n in names} - set(tasks))
    if unknown:
        raise RowError(f"unknown task(s) {unknown}: this model serves {list(tasks)}")
    texts = [request_input(tasks[task].get("template") or UNFORMATTED, row, task, number)
             for number, (task, row) in enumerate(zip(names, rows), start=1)]
    inputs = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return [x[:tasks[t]["max_length"]] if is_encoder_decoder else x[-tasks[t]["max_length"]:]
            for x, t in zip(inputs, names)]


def answers(record: dict, names: list[str], predictions) -> list[dict]:
    """Per row: `task`, `label` (the task's own value), `label_id`, `verbalizer` and a `score_<label>`
    per class (mean log-likelihood over the task's prompts)."""
    rows = []
    for task, (label, scores) in zip(names, predictions):
        labels = record["tasks"][task]["labels"]
        rows.append({"task": task, "label": labels[label], "label_id": label,
                     "verbalizer": record["tasks"][task]["verbalizers"][label],
                     **{f"score_{name}": float(s) for name, s in zip(labels, scores)}})
    return rows
