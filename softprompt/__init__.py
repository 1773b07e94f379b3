"""softprompt: hyperparameter search for prompt tuning (Lester et al. 2021) on Ray. One import name, whose
rooms the repository keeps at its top level (pyproject.toml maps them; docs/architecture.md lists them).
"""
