"""`softprompt serve NAME|BUNDLE|SEARCH` and `serve status|stop`: what to serve found (a registered model,
a bundle folder, or a search's winner exported as a bundle), then the Ray Serve application started
(serving/ray_serve.py) with its settings (serving/settings.py)."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from softprompt.errors import ConfigError, UserError, one_line
from softprompt.serving.settings import ACTIONS, serve_settings


def serve_source(target: str, tracking_uri: str | None, storage_path: str) -> tuple[dict, str]:
    """What to serve, and how to name it in one line: a bundle folder, a registered model (NAME, its
    `production` alias, or models:/NAME@ALIAS) or a search (its winner, exported as a bundle)."""
    folder = Path(target)
    if (folder / "bundle.json").is_file():
        return {"bundle": str(folder.resolve())}, f"bundle {folder}"
    name, alias = target, "production"
    if target.startswith("models:/"):
        name, sep, alias = target.removeprefix("models:/").partition("@")
        if not sep or not name or not alias:
            raise ConfigError("model", target, "models:/NAME@ALIAS (a registered model and one of its aliases)")
    if tracking_uri and (not tracking_uri.startswith("sqlite:///") or
                         Path(tracking_uri.removeprefix("sqlite:///")).is_file()):
        import logging

        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its start-up notes
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        try:
            version = client.get_model_version_by_alias(name, alias).version
            return {"model": name, "alias": alias, "tracking_uri": tracking_uri}, \
                f"models:/{name}@{alias} (version {version})"
        except MlflowException:
            pass
    from softprompt.search.record import SearchRecord
    from softprompt.search.storage import SearchStorage

    if target.startswith("models:/") or not SearchStorage(storage_path, target).exists():
        registry = tracking_uri or "no registry"
        raise ConfigError("model", target, f"a registered model with alias {alias!r} in {registry}, a bundle "
                                           f"folder, or a search under {storage_path}")
    from softprompt.search.export import search_prompts, tasks_by_name, write_bundle

    prompts = search_prompts(SearchRecord.load(storage_path, target))
    bundle = write_bundle(tasks_by_name({target: prompts}), Path("runs") / "serve" / target)
    return {"bundle": str(bundle.resolve())}, f"search {target}'s winner"


def _connect(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a local Ray. True if it is local."""
    import ray

    from softprompt.search.tuner import give_local_workers_env
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        give_local_workers_env()
    ray.init(address=address, include_dashboard=False, configure_logging=False, logging_level="WARNING")
    return not address


def cmd_serve(args) -> int:
    """Serve a registered model (NAME: its production alias, or models:/NAME@ALIAS), a bundle folder or a
    search's winner on Ray Serve: one frozen backbone per replica answers every task of the bundle, concurrent
    requests are scored together, and a registry alias that moves to a new version is served from the next
    batch on, without a restart. POST {"dataframe_records": [{"text": ...}]} as to `mlflow models serve`.
    Without --address it starts a local Ray and serves until Ctrl-C; with one it deploys onto that cluster and
    returns. `serve status` and `serve stop` manage it."""
    if args.target in ACTIONS:
        return _status(args) if args.target == "status" else _stop(args)
    from softprompt.configfile import check_tracking_uri
    from softprompt.search.tracking import default_tracking_uri

    settings = serve_settings(args.config, args.set)
    tracking_uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())  # None: `none`, no registry
    source, what = serve_source(args.target, tracking_uri, args.storage_path)
    local = _connect(args.address)
    from ray import serve

    from softprompt.serving.ray_serve import deployment
    serve.start(http_options={"host": settings["host"], "port": settings["port"]})
    app = deployment(settings).bind(source, settings)
    serve.run(app, name=settings["name"], route_prefix=settings["route_prefix"])
    url = f"http://{_http_address(settings)}{settings['route_prefix']}"
    print(f"softprompt: serving {what} as application {settings['name']!r} at {url} "
          f"(POST JSON {{\"dataframe_records\": [...]}})", flush=True)
    if not local:
        print(f"softprompt: `softprompt serve status --address {args.address or os.environ.get('RAY_ADDRESS')}` "
              f"shows it; `softprompt serve stop --name {settings['name']}` ends it", flush=True)
        return 0
    print("softprompt: Ctrl-C stops it", flush=True)
    stop = threading.Event()
    # both set here: a process started with SIGINT ignored (a background job, a test runner's worker) would
    # otherwise never see Ctrl-C, and Python raises KeyboardInterrupt only where SIGINT was left at its default
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    print("softprompt: stopped", flush=True)
    return 0


def _http_address(settings: dict) -> str:
    """Where Serve's proxy listens: the config's host and port, unless Serve already ran on the cluster
    with others (they are set when Serve starts, and a later start keeps them)."""
    try:
        from ray.serve.context import _get_global_client
        http = _get_global_client().http_config
        return f"{http.host}:{http.port}"
    except Exception:  # a private API: the config's values are right unless Serve ran before
        return f"{settings['host']}:{settings['port']}"


def _joined(args):
    import ray
    from ray import serve
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=False, logging_level="WARNING")
    except ConnectionError as error:
        raise UserError(f"no Ray cluster at {address} ({one_line(error)}): is `softprompt serve` "
                        f"running, and is --address right?") from None
    return serve


def _status(args) -> int:
    serve = _joined(args)
    applications = serve.status().applications
    if not applications:
        print("softprompt: no Serve application is running")
        return 0
    for name, app in applications.items():
        print(f"{name}: {getattr(app.status, 'value', app.status)}" + (f" ({app.message})" if app.message else ""))
        for deployment_name, dep in app.deployments.items():
            replicas = ", ".join(f"{n} {getattr(state, 'value', state)}" for state, n in dep.replica_states.items())
            print(f"  {deployment_name}: {getattr(dep.status, 'value', dep.status)}, replicas: {replicas or 'none'}")
    return 0


def _stop(args) -> int:
    serve = _joined(args)
    applications = serve.status().applications
    if args.name not in applications:
        raise ConfigError("--name", args.name, f"a running Serve application: {', '.join(applications) or 'none'}")
    serve.delete(args.name)
    print(f"softprompt: stopped application {args.name!r}")
    return 0
