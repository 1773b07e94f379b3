"""The `softprompt` command: its parser, and the one place a user's mistake becomes one line and exit 2.
Each command's handler lives in this room (cli/); every module it imports at the top is free of torch and
Ray, so `--help` and the commands that never train start in a second."""
from __future__ import annotations

import argparse
import os
import sys

from softprompt.adaptation.config import AdaptConfig
from softprompt.cli.cluster import JOB_HANDLERS, cmd_cluster_check, cmd_submit
from softprompt.cli.lm_adapt import cmd_lm_adapt
from softprompt.cli.search import (
    cmd_export,
    cmd_mlflow_sync,
    cmd_mlflow_ui,
    cmd_search_best,
    cmd_search_report,
    cmd_search_resume,
    cmd_search_run,
    cmd_search_status,
    cmd_train,
    cmd_verify,
)
from softprompt.cli.serve import cmd_serve
from softprompt.errors import UserError, one_line
from softprompt.search.jobs import DEFAULT_ADDRESS
from softprompt.search.rules import STORAGE_PATH


def _command_group(commands, name: str, help: str, description: str):
    """A command whose actions (`search run`, `jobs logs`, ...) are subcommands: their subparsers."""
    group = commands.add_parser(name, help=help, description=description)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


def _storage_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-path", default=STORAGE_PATH, help=f"where searches live (default: {STORAGE_PATH})")


def _config_arguments(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    parser.add_argument("config", help=what)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field, e.g. --set {example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Hyperparameter search for prompt tuning (Lester et al. 2021): a frozen language "
                    "model, a trained soft prompt, Ray Tune trials over Optuna search spaces.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run one prompt-tuning run from a YAML config",
                                description="Train one soft prompt and print held-out metrics. "
                                            "CONFIG holds TrainConfig fields (see examples/train.yaml).")
    _config_arguments(train, "YAML file of training fields", "max_steps=50")
    train.set_defaults(handler=cmd_train)

    actions = _command_group(commands, "search", "run, resume and inspect hyperparameter searches",
                             "Ray Tune trials over an Optuna search space, ASHA early stopping.")
    run = actions.add_parser("run", help="start a search from a YAML config (see examples/demo.yaml)",
                             description="Start a search. Results go to STORAGE_PATH/NAME; Ctrl-C stops it "
                                         "and `softprompt search resume NAME` continues it.")
    _config_arguments(run, "YAML search config", "trials=4")
    run.add_argument("--tracking-uri", metavar="URI",
                     help="MLflow tracking: sqlite:///PATH, http://HOST:PORT of a tracking server, or none "
                          "(default: sqlite:///mlflow.db in the working folder)")
    run.add_argument("--verbose", action="store_true",
                     help="also print Ray Tune's own trial tables (by default: a line per trial event)")
    run.set_defaults(handler=cmd_search_run)
    for action, handler, text in (
            ("resume", cmd_search_resume, "continue an interrupted search: finished trials are kept, "
                                          "running ones resume from their last checkpoint"),
            ("status", cmd_search_status, "show every trial of a search: status, step, metric, parameters"),
            ("best", cmd_search_best, "show the best trial: its metric, parameters and prompt folder"),
            ("report", cmd_search_report, "write each parameter's effect on the metric (mean ± sd by value) as "
                                          "report.md and report.png in the search's folder and its MLflow run")):
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument("name", help="the search's name (its folder under --storage-path)")
        _storage_path_argument(sub)
        if action == "best":
            sub.add_argument("--json", action="store_true", help="print the best trial as JSON")
        if action == "resume":
            sub.add_argument("--tracking-uri", metavar="URI",
                             help="log to this MLflow server from now on (default: where the search logged)")
        sub.set_defaults(handler=handler)

    mlflow_actions = _command_group(
        commands, "mlflow", "MLflow tracking of searches",
        "Every search is tracked in MLflow: a parent run per search, a child run per trial.")
    sync = mlflow_actions.add_parser("sync", help="log what an unreachable tracking server missed", description=(
        "Replay the records trials spooled while the tracking server was unreachable, then log the search's final "
        "statuses, winner and plots. Safe to repeat."))
    sync.add_argument("name", help="the search's name (its folder under --storage-path)")
    _storage_path_argument(sync)
    sync.add_argument("--tracking-uri", metavar="URI", help="sync to this server instead of the search's own")
    sync.set_defaults(handler=cmd_mlflow_sync)
    ui = mlflow_actions.add_parser("ui", help="start the MLflow UI on a search's store and print its trials' link",
                                   description="Start the MLflow UI on the store a search logged to and print the link "
                                               "to its runs table, one row per trial. Ctrl-C stops it.")
    ui.add_argument("name", help="the search's name (its folder under --storage-path)")
    _storage_path_argument(ui)
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    ui.set_defaults(handler=cmd_mlflow_ui)

    export = commands.add_parser(
        "export", help="export winning prompts: PEFT adapter, .npy array, or a registered MLflow model",
        description="Export a search's best prompt (or --trial ID, or the --top K as one ensemble), or a tracked "
                    "run's prompt (--run). --format peft writes a folder peft.PeftModel.from_pretrained loads; npy "
                    "the bare [length, width] array; mlflow a pyfunc model registered under --name with alias "
                    "production (input: a DataFrame with the task's raw columns, e.g. text, which it formats with the "
                    "task's template; output: label and per-class scores). Several searches export as one mlflow "
                    "model that serves each search's task (a `task` column routes each row).")
    export.add_argument("search", nargs="*", help="the search's name (its folder under --storage-path); several, for "
                                                  "--format mlflow: one model that serves each search's task")
    export.add_argument("--format", choices=["peft", "npy", "mlflow"], default="peft", help="default: peft")
    export.add_argument("--trial", help="export this trial instead of the best one")
    export.add_argument("--top", type=int, default=1, metavar="K",
                        help="export the K best trials as one ensemble (mlflow format only)")
    export.add_argument("--combine", choices=["vote", "mean_logprob"], default="vote",
                        help="how an ensemble combines its prompts (default: majority vote)")
    export.add_argument("--run", metavar="RUN_ID", help="export the prompt of this MLflow run instead of a search")
    export.add_argument("--name", help="registered model name / output name (default: the search's name)")
    export.add_argument("--out", help="output path (default: runs/export/NAME)")
    _storage_path_argument(export)
    export.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow server for --run and --format mlflow (default: sqlite:///mlflow.db here)")
    export.set_defaults(handler=cmd_export)

    verify = commands.add_parser(
        "verify", help="check a prompt checkpoint or export: its SHA-256, and with --model its backbone",
        description="Check a prompt checkpoint folder, an exported .npy, PEFT adapter or MLflow bundle folder: "
                    "every prompt against its recorded SHA-256 and, with --model, the backbone's fingerprint.")
    verify.add_argument("path", help="checkpoint folder, .npy file, PEFT adapter folder or bundle folder")
    verify.add_argument("--model", help="the backbone the prompt must belong to (alias, hub id or folder)")
    verify.set_defaults(handler=cmd_verify)
    _add_lm_adapt_command(commands)
    _add_cluster_commands(commands)
    _add_serve_command(commands)
    return parser


def _add_serve_command(commands) -> None:
    """`serve` (cli/serve.py): exported prompts on Ray Serve; its handler's docstring is its description."""
    serve = commands.add_parser(
        "serve", help="serve exported prompts on Ray Serve (HTTP JSON, the MLflow model's schema)",
        description=cmd_serve.__doc__)
    serve.add_argument("target", metavar="NAME|models:/NAME@ALIAS|BUNDLE|SEARCH|status|stop",
                       help="what to serve, or `status` / `stop`")
    serve.add_argument("--config", help="YAML serve config: replicas or autoscaling, num_cpus and num_gpus per "
                                        "replica, port, batching (serving/settings.py lists the fields)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    serve.add_argument("--address", help="a Ray cluster to deploy onto (default: RAY_ADDRESS, else a local Ray)")
    serve.add_argument("--name", default="softprompt", help="with stop: the application (default: softprompt)")
    serve.add_argument("--tracking-uri", metavar="URI", help="the MLflow registry (default: sqlite:///mlflow.db here)")
    _storage_path_argument(serve)
    serve.set_defaults(handler=cmd_serve)


def _add_lm_adapt_command(commands) -> None:
    """`lm-adapt` (cli/lm_adapt.py): the checkpoints a search's `checkpoints:` axis explores; its handler's
    docstring is its description."""
    adapt = commands.add_parser(
        "lm-adapt", help="continue a span-corruption T5 as a language model (a Ray Train job)",
        description=cmd_lm_adapt.__doc__)
    adapt.add_argument("model", help="a span-corruption T5: hub id (google/t5-v1_1-base) or local folder")
    adapt.add_argument("--corpus", required=True,
                       help="a hub id, a save_to_disk folder, or data files as a task mapping's dataset takes "
                            "them (a file, a folder, or a glob; .txt: a text per line)")
    adapt.add_argument("--steps", required=True,
                       help="save a checkpoint at each of these steps, e.g. 10000,50000,100000")
    adapt.add_argument("--out", required=True,
                       help="folder for the step-N checkpoints, the manifest and the job's state")
    defaults = AdaptConfig.__dataclass_fields__
    for flag, kind, text in (
            ("text_column", str, "the corpus column holding the text"),
            ("corpus_config", str, "a hub data set's configuration, e.g. wikitext-103-raw-v1"),
            ("workers", int, "data-parallel workers (default: one per GPU; on CPUs one per node)"),
            ("batch_size", int, "sequences per worker and step"),
            ("seq_len", int, "tokens per sequence, split at a random point into input and target"),
            ("lr", float, "T5X Adafactor's learning rate (constant)"), ("seed", int, "data order and dropout"),
            ("checkpoint_every", int, "save a resumable state this often (and at every --steps)"),
            ("log_every", int, "print and log loss and tokens/s this often")):
        default = defaults[flag].default
        adapt.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=default,
                           help=text + (f" (default: {default})" if default is not None else ""))
    adapt.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow: sqlite:///PATH, http://HOST:PORT or none (default: sqlite:///mlflow.db here)")
    adapt.add_argument("--submit", action="store_true", help="run it on a Ray cluster as a job (--out and a local "
                                                             "--corpus on storage every node mounts)")
    adapt.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                       help="with --submit: the head's job API")
    adapt.add_argument("--no-wait", action="store_true", help="with --submit: print the job id and return")
    adapt.set_defaults(handler=cmd_lm_adapt)


def _add_cluster_commands(commands) -> None:
    """`cluster check`, `submit` and `jobs status|logs|stop` (cli/cluster.py)."""
    address = os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS)
    address_help = f"the head's job API (default: {address}, where `ray dashboard cluster.yaml` forwards it)"
    cluster_actions = _command_group(commands, "cluster", "check a Ray cluster-launcher file before `ray up`",
                                     "Ray cluster files for searches (cluster.yaml, cluster-onprem.yaml).")
    check = cluster_actions.add_parser(
        "check", help="validate a cluster file offline",
        description="Ray's schema, then: GPUs declared on GPU node types, no dashboard/GCS/client/MLflow port open "
                    "to the internet, token auth, no usage stats, an MLflow server on the head. One line per problem.")
    check.add_argument("file", help="cluster-launcher YAML file")
    check.set_defaults(handler=cmd_cluster_check)

    submit = commands.add_parser(
        "submit", help="run a search on a Ray cluster as a job",
        description="Send a search to a cluster's job API (after `ray up`, forward it with `ray dashboard "
                    "cluster.yaml`), print the job id and follow its logs until it ends (exit 1 if it failed).")
    _config_arguments(submit, "YAML search config (its storage_path must be shared storage)", "trials=32")
    submit.add_argument("--address", default=address, help=address_help)
    submit.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow server the trials log to "
                             "(default: the cluster's, SOFTPROMPT_TRACKING_URI on the head)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.set_defaults(handler=cmd_submit)

    job_actions = _command_group(commands, "jobs", "status, logs or stop of a submitted search",
                                 "Searches submitted with `softprompt submit`, by job id.")
    for action, text in (("status", "the job's status and message"), ("logs", "the job's output so far"),
                         ("stop", "stop the job (its search can be resumed)")):
        sub = job_actions.add_parser(action, help=text, description=text)
        sub.add_argument("job_id", help="the id `softprompt submit` printed")
        sub.add_argument("--address", default=address, help=address_help)
        if action == "logs":
            sub.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        sub.set_defaults(handler=JOB_HANDLERS[action])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except Exception as error:
        if args.debug or not isinstance(error, UserError):
            raise
        print(f"softprompt: error: {one_line(error, limit=None)}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt as interrupt:  # search.tuner.SearchInterrupted says how to resume
        print(f"softprompt: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
