"""`softprompt lm-adapt`: the Ray Train job (adaptation/lm_adapt.py) run here or submitted to a cluster,
then where its checkpoints are."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from softprompt.adaptation.config import AdaptConfig, check_config, parse_steps
from softprompt.adaptation.lm_adapt import run_adaptation
from softprompt.configfile import check_tracking_uri
from softprompt.errors import ConfigError
from softprompt.models.manifest import read_manifest


def cmd_lm_adapt(args) -> int:
    """LM adaptation (paper section 3.2, Figure 3d): continue training a span-corruption T5 with T5's prefix-LM
    objective (a text prefix as input, its continuation as target), data parallel over the cluster's GPUs (CPU
    workers where there is none), and save a loadable checkpoint at each of --steps, with a manifest
    (OUT/lm-adapt.yaml) that a search config's checkpoints: takes. Run again with the same --out, it resumes
    from its last state. Tracked in MLflow (loss and tokens/s). With --submit the job runs on a cluster."""
    cfg = AdaptConfig(model=args.model, corpus=args.corpus, steps=parse_steps(args.steps), out=args.out,
                      text_column=args.text_column, corpus_config=args.corpus_config, workers=args.workers,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    check_config(cfg)
    if args.submit:
        return submit(cfg, args.address, args.tracking_uri, args.no_wait)
    from softprompt.search.tracking import default_tracking_uri

    cfg = dataclasses.replace(cfg, tracking_uri=check_tracking_uri(args.tracking_uri or default_tracking_uri()))
    manifest = run_adaptation(cfg)
    saved, _ = read_manifest(manifest)
    print(f"\nadapted checkpoints ({len(saved)}):")
    for folder, steps in saved.items():
        print(f"  {steps:>8} steps  {folder}")
    print(f"manifest: {manifest}\nsearch over them: `checkpoints: [{manifest}]` in a search config")
    return 0


def submit(cfg: AdaptConfig, address: str, tracking_uri: str | None, no_wait: bool) -> int:
    """The same job on a cluster: its --out (and a local corpus) must be paths every node sees."""
    from softprompt.cli.cluster import submitted
    from softprompt.search.jobs import submit_command

    for flag, path in (("--out", cfg.out), ("--corpus", cfg.corpus)):
        if (flag == "--out" or Path(path).expanduser().exists()) and not Path(path).expanduser().is_absolute():
            raise ConfigError(flag, path, "an absolute path on storage every node mounts (NFS, EFS), e.g. "
                                          "/mnt/softprompt/t5-adapted: the job runs in a folder of its own on the head")
    words = ["lm-adapt", cfg.model, "--corpus", cfg.corpus, "--steps", ",".join(map(str, cfg.steps)), "--out", cfg.out]
    for field in dataclasses.fields(AdaptConfig):
        value = getattr(cfg, field.name)
        if field.name not in ("model", "corpus", "steps", "out", "tracking_uri") and value != field.default:
            words += [f"--{field.name.replace('_', '-')}", str(value)]
    return submitted(address, submit_command(address, words, tracking_uri), no_wait)
