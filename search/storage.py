"""Where a search lives: a folder (a local disk, or NFS/EFS that every node mounts) or a URI that
pyarrow.fs reads (s3://BUCKET/PREFIX, gs://...). On a URI the driver works on a local mirror, and its
live Optuna study is a working copy beside it that travels with Tune's state snapshots
(tuner.AshaAwareOptunaSearch): docs/cluster.md says how, and how S3-compatible stores are named.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pyarrow.fs

from softprompt.configfile import ConfigError
from softprompt.errors import one_line
from softprompt.files import atomic_folder
from softprompt.trainables.tracking import RUN_FILE

CONFIG_FILE, SUMMARY_FILE, STUDY_FILE = "softprompt-search.yaml", "softprompt-summary.json", "optuna.db"
DRIVER_FILES = (CONFIG_FILE, SUMMARY_FILE, RUN_FILE, STUDY_FILE)
ALLOWED = "a folder, or a storage URI such as s3://BUCKET/PREFIX that this machine can reach"


def is_uri(storage_path: str) -> bool:
    return "://" in str(storage_path)


def _filesystem(storage_path: str):
    """(pyarrow filesystem, path on it) for a storage URI: one client per URI and AWS settings."""
    return _resolved(storage_path, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))


@functools.cache
def _resolved(storage_path: str, aws_settings: tuple):
    with reachable(storage_path):
        return pyarrow.fs.FileSystem.from_uri(storage_path)


@contextlib.contextmanager
def reachable(storage_path: str):
    """A URI pyarrow cannot parse, or storage it cannot reach, is a one-line user error."""
    try:
        yield
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError("storage_path", storage_path, f"{ALLOWED} ({one_line(error)})") from None


def copy_study(source: Path, target: Path) -> None:
    """A consistent copy of an Optuna sqlite study (sqlite's backup, not a file copy), put in place at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with contextlib.closing(sqlite3.connect(source)) as live, contextlib.closing(sqlite3.connect(partial)) as copy:
        live.backup(copy)
    os.replace(partial, target)


@dataclass(frozen=True)
class SearchStorage:
    """Search `name` under `storage_path`: its folder on this machine, and for a URI the remote copy."""
    storage_path: str
    name: str

    @property
    def remote(self) -> bool:
        return is_uri(self.storage_path)

    @property
    def folder(self) -> Path:
        """The search's folder on this machine: the search itself, or for a URI its local mirror
        (under SOFTPROMPT_CACHE, default ~/.cache/softprompt: searches/SCHEME/BUCKET/PREFIX/NAME)."""
        if not self.remote:
            return Path(self.storage_path).expanduser().resolve() / self.name
        from softprompt.models.hub import cache_dir

        parts = urlsplit(self.storage_path)
        return cache_dir() / "searches" / parts.scheme / parts.netloc / parts.path.strip("/") / self.name

    @property
    def study_file(self) -> Path:
        """The driver's live Optuna study: in the search's folder, or for a URI a working copy beside the mirror."""
        return self.folder / ".driver" / STUDY_FILE if self.remote else self.folder / STUDY_FILE

    @property
    def location(self) -> str:
        """The search's folder as a user names it (a URI without its query)."""
        if not self.remote:
            return str(self.folder)
        parts = urlsplit(self.storage_path)
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/{self.name}"

    def optuna_storage(self) -> optuna.storages.RDBStorage:
        """The driver's live study: sqlite in the search's folder, or for a URI its working copy."""
        if self.remote:
            return WorkingCopyStorage(self)
        self.folder.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(f"sqlite:///{self.study_file}")

    def tune_storage(self) -> tuple[str, object | None]:
        """`RunConfig(storage_path=, storage_filesystem=)` for this search (run name: its name)."""
        if not self.remote:
            return str(self.folder.parent), None
        filesystem, path = _filesystem(self.storage_path)
        return path, filesystem

    def tune_path(self) -> str:
        """The experiment folder as `Tuner.restore` and `ExperimentAnalysis` take it, with `tune_storage()[1]`."""
        root, filesystem = self.tune_storage()
        return f"{root}/{self.name}" if filesystem else str(self.folder)

    # ---- the remote copy (each a no-op for a folder) ----

    def _remote(self, filename: str) -> tuple[object, str]:
        filesystem, root = _filesystem(self.storage_path)
        return filesystem, f"{root}/{self.name}/{filename}"

    def exists(self) -> bool:
        """Whether a search was started here (its config saved): for a URI, asked of the URI."""
        if not self.remote:
            return (self.folder / CONFIG_FILE).exists()
        filesystem, path = self._remote(CONFIG_FILE)
        with reachable(self.storage_path):
            return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def start(self) -> None:
        """Before a new search runs here: for a URI, refuse a bucket that does not exist, and drop
        the local mirror a deleted search of the same name may have left."""
        if not self.remote:
            return
        filesystem, root = _filesystem(self.storage_path)
        bucket = root.split("/")[0]
        with reachable(self.storage_path):
            found = filesystem.get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
        if not found:
            raise ConfigError("storage_path", self.storage_path, f"{ALLOWED}: bucket {bucket!r} does not exist there")
        shutil.rmtree(self.folder, ignore_errors=True)

    def pull(self) -> Path:
        """The search's folder, with each driver file the remote copy holds a newer version of
        downloaded first (a copy keeps the remote's modification time: the next pull skips it)."""
        if not self.remote:
            return self.folder
        filesystem, root = _filesystem(self.storage_path)
        with reachable(self.storage_path):
            found = {Path(info.path).name: info for info in filesystem.get_file_info(
                pyarrow.fs.FileSelector(f"{root}/{self.name}", allow_not_found=True)) if info.is_file}
            for filename in DRIVER_FILES:
                info, local = found.get(filename), self.folder / filename
                if info is not None and (not local.exists() or info.mtime_ns > local.stat().st_mtime_ns):
                    self._download(filename, local, info.mtime_ns)
        return self.folder

    def download(self, filename: str, local: Path) -> None:
        """Copy one of the search's remote files to `local`, if the remote copy has it."""
        filesystem, path = self._remote(filename)
        with reachable(self.storage_path):
            info = filesystem.get_file_info(path)
            if info.type != pyarrow.fs.FileType.NotFound:
                self._download(filename, local, info.mtime_ns)

    def _download(self, filename: str, local: Path, mtime_ns: int) -> None:
        filesystem, path = self._remote(filename)
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.partial")
        with filesystem.open_input_stream(path) as source, open(partial, "wb") as target:
            shutil.copyfileobj(source, target)
        os.utime(partial, ns=(mtime_ns, mtime_ns))
        os.replace(partial, local)

    def write_text(self, filename: str, text: str) -> Path:
        """Write one of the search's own files in its folder and, for a URI, upload it."""
        local = self.folder / filename
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        return self.upload(filename)

    def upload(self, filename: str) -> Path:
        """For a URI, upload one of the search's own files from its folder; its local path."""
        local = self.folder / filename
        if self.remote:
            filesystem, path = self._remote(filename)
            with reachable(self.storage_path):
                with filesystem.open_output_stream(path) as target:
                    target.write(local.read_bytes())
                mtime_ns = filesystem.get_file_info(path).mtime_ns
            os.utime(local, ns=(mtime_ns, mtime_ns))
        return local

    def remote_location(self, path_on_storage: str) -> str:
        """A path on the search's filesystem as a location rows carry: a URI for remote storage."""
        return f"{urlsplit(self.storage_path).scheme}://{path_on_storage}" if self.remote else path_on_storage

    def local_copy(self, location: str) -> Path:
        """A folder of the search (e.g. a trial's prompt) on this machine: for a URI, downloaded once
        into the mirror (checkpoint folders never change once written)."""
        if not is_uri(location):
            return Path(location)
        filesystem, root = _filesystem(self.storage_path)
        path = location.split("://", 1)[1]
        local = self.folder / Path(path).relative_to(f"{root}/{self.name}")
        if local.is_dir():
            return local
        with atomic_folder(local) as partial, reachable(self.storage_path):
            pyarrow.fs.copy_files(path, str(partial), source_filesystem=filesystem)
        return local


class WorkingCopyStorage(optuna.storages.RDBStorage):
    """The live Optuna study of a search on a URI: a sqlite working copy on the driver's machine.
    Tune pickles the searcher, and this with it, into its state; unpickled elsewhere (a resume on
    another machine) it opens that machine's working copy, not a path of the one that started."""

    def __init__(self, search: SearchStorage):
        search.study_file.parent.mkdir(parents=True, exist_ok=True)
        self.search = search
        super().__init__(f"sqlite:///{search.study_file}")

    def __setstate__(self, state: dict) -> None:
        study_file = state["search"].study_file
        study_file.parent.mkdir(parents=True, exist_ok=True)
        super().__setstate__({**state, "url": f"sqlite:///{study_file}"})
