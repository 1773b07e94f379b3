"""The MLflow pyfunc model of an exported prompt bundle, logged as code ("models from code"), so
the registered model holds this file, the prompts' safetensors and JSON, and no pickle. Its input
and output columns: docs/export-and-serving.md; Ray Serve answers through the same rows (serving/rows.py).
"""
from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from softprompt.serving.ensemble import load_bundle
from softprompt.serving.rows import UNFORMATTED, answers, model_inputs, request_input

__all__ = ["UNFORMATTED", "PromptBundleModel", "request_input"]


class PromptBundleModel(PythonModel):
    def load_context(self, context):
        self.ensemble, self.record = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        tasks = self.record["tasks"]
        names = list(model_input["task"]) if "task" in model_input else [next(iter(tasks))] * len(model_input)
        backbone = self.ensemble.backbone
        # an unknown task or a missing column: RowError, a ValueError (MLflow's server answers it with a 400)
        inputs = model_inputs(self.record, backbone.tokenizer, backbone.is_encoder_decoder, names,
                              model_input.to_dict("records"))
        return pd.DataFrame(answers(self.record, names, self.ensemble.predict(names, inputs)))


mlflow.models.set_model(PromptBundleModel())
