"""softprompt: hyperparameter search for prompt tuning (Lester et al. 2021) on Ray.

One import name, whose rooms the repository keeps at its top level (pyproject.toml maps them):
`softprompt.search` (the driver and the CLI), `softprompt.spaces` (Optuna search spaces),
`softprompt.trainables` (a trial), `softprompt.serving` (a served prompt) and
`softprompt.adaptation` (LM adaptation, a Ray Train job).
"""
