"""The MLflow pyfunc model of an exported prompt bundle, logged as code ("models from code"), so
the registered model holds this file, the prompts' safetensors and JSON, and no pickle.

`predict` takes a DataFrame with `text` (the task's input, formatted as in training, e.g.
"review: ...\\nsentiment:") and optionally `task` (which of the bundle's tasks; default: the first),
and returns `task`, `label`, `label_id` and a `score_<verbalizer>` column per class (mean
log-likelihood over the task's prompts). Each example runs with all its task's prompts in one
forward pass, shared with the batch's other examples of similar length, whatever their tasks.
"""
from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from trainables.ensemble import load_bundle


class PromptBundleModel(PythonModel):
    def load_context(self, context):
        self.ensemble, self.record = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        tasks = list(self.record["tasks"])
        names = list(model_input["task"]) if "task" in model_input else [tasks[0]] * len(model_input)
        unknown = sorted(set(names) - set(tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: this model serves {tasks}")
        tokenizer = self.ensemble.backbone.tokenizer
        inputs = tokenizer(list(model_input["text"]), add_special_tokens=True)["input_ids"]
        causal = not self.ensemble.backbone.is_encoder_decoder
        inputs = [x[-self.record["tasks"][t]["max_length"]:] if causal else x[:self.record["tasks"][t]["max_length"]]
                  for x, t in zip(inputs, names)]
        rows = []
        for task, (label, scores) in zip(names, self.ensemble.predict(names, inputs)):
            verbalizers = self.record["tasks"][task]["verbalizers"]
            rows.append({"task": task, "label": verbalizers[label], "label_id": label,
                         **{f"score_{v}": float(s) for v, s in zip(verbalizers, scores)}})
        return pd.DataFrame(rows)


mlflow.models.set_model(PromptBundleModel())
