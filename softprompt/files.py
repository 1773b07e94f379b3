"""Folders written whole or not at all. No torch: the driver's storage code uses it too."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """A fresh sibling folder to write `target` into. When the block ends its files are on disk and it
    replaces `target` whole, so a reader, or a crash, finds the old folder or the new one, never half of
    one; when the block raises it is removed and `target` is left as it was."""
    target = Path(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        for path in (*partial.rglob("*"), partial):  # on disk before the swap, not just in the page cache
            handle = os.open(path, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")  # a crash between the two renames leaves it
        if target.exists():
            os.replace(target, old)
        os.replace(partial, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
