"""The MLflow pyfunc model of an exported prompt bundle, logged as code ("models from code"), so
the registered model holds this file, the prompts' safetensors and JSON, and no pickle.

`predict` takes a DataFrame with each task's raw columns (those its template names: `text`, or
`question` and `passage`...) and optionally `task` (which of the bundle's tasks; default: the
first). It applies the task's template itself, as training did, and returns `task`, `label` (the
task's own label value), `label_id`, `verbalizer` (the word the model scored for it) and a
`score_<label>` column per class (mean log-likelihood over the task's prompts). Each example runs
with all its task's prompts in one forward pass, shared with the batch's other examples of similar
length, whatever their tasks.
"""
from __future__ import annotations

from string import Formatter

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from serving.ensemble import load_bundle
from trainables.templates import format_input, template_columns

UNFORMATTED = "{text}"  # bundles exported before templates travelled with prompts took formatted text


def request_input(template: str, row: dict, task: str, number: int) -> str:
    """A request row's model input: the template over its raw columns. A one-column value that
    already carries the template's text around it (formatted input, as this model took before it
    applied templates) is taken as it is: formatting it again would score it wrongly."""
    columns = template_columns(template)
    missing = [c for c in columns if not isinstance(row.get(c), str)]
    if missing:
        raise ValueError(f"row {number}: task {task!r} needs the raw text column(s) {missing} (its template is "
                         f"{template!r}); got columns {sorted(k for k, v in row.items() if isinstance(v, str))}")
    parts = list(Formatter().parse(template))  # (literal before, field, ...), then the trailing literal
    if len(columns) == 1 and len(parts) <= 2 and parts[0][1] is not None:
        head, tail = parts[0][0], (parts[1][0] if len(parts) == 2 else "")
        value = row[columns[0]]
        if (head or tail.strip()) and value.startswith(head) and value.rstrip().endswith(tail.rstrip()):
            return value
    return format_input(template, row)


class PromptBundleModel(PythonModel):
    def load_context(self, context):
        self.ensemble, self.record = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        tasks = self.record["tasks"]
        names = list(model_input["task"]) if "task" in model_input else [next(iter(tasks))] * len(model_input)
        unknown = sorted(set(names) - set(tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: this model serves {list(tasks)}")
        texts = [request_input(tasks[task].get("template") or UNFORMATTED, row, task, number)
                 for number, (task, row) in enumerate(zip(names, model_input.to_dict("records")), start=1)]
        tokenizer = self.ensemble.backbone.tokenizer
        inputs = tokenizer(texts, add_special_tokens=True)["input_ids"]
        causal = not self.ensemble.backbone.is_encoder_decoder
        inputs = [x[-tasks[t]["max_length"]:] if causal else x[:tasks[t]["max_length"]] for x, t in zip(inputs, names)]
        rows = []
        for task, (label, scores) in zip(names, self.ensemble.predict(names, inputs)):
            labels = tasks[task]["labels"]
            rows.append({"task": task, "label": labels[label], "label_id": label,
                         "verbalizer": tasks[task]["verbalizers"][label],
                         **{f"score_{name}": float(s) for name, s in zip(labels, scores)}})
        return pd.DataFrame(rows)


mlflow.models.set_model(PromptBundleModel())
