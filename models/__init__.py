"""Shared model code: the frozen backbone, soft prompts and how they score, tasks and their
encoding, prompt files. Every place that runs a model uses it: a trial, a backbone server, the driver's
verdict, a served prompt, LM adaptation."""
