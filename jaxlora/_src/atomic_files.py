"""Directories that appear complete or not at all: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _siblings(directory: Path, kind: str) -> list[Path]:
    return sorted(directory.parent.glob(f".{directory.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)


def committed(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint at `directory`, or the one a replacement cut short by a crash moved aside."""
    directory = Path(directory).expanduser().absolute()
    if directory.exists():
        return directory
    old = _siblings(directory, "old")
    return old[-1] if old else None


def recover(directory: str | os.PathLike) -> None:
    """Before writing `directory`: undoes a replacement cut short by a crash and removes half-written saves.

    If the process died between moving the old checkpoint aside and moving the new one in, the old one is
    put back; temporaries of saves that never finished are deleted.
    """
    directory = Path(directory).expanduser().absolute()
    old = _siblings(directory, "old")
    if old and not directory.exists():
        os.rename(old[-1], directory)
        old = old[:-1]
    for path in old + _siblings(directory, "tmp"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling path to write into; it becomes `directory` only when the block succeeds.

    With `overwrite=False` an existing `directory` is an error; with `overwrite=True` it is replaced, and
    stays intact until the new one is completely written. On an exception nothing is left behind.
    """
    directory = Path(directory).expanduser().absolute()
    recover(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{directory} already exists; pass overwrite=True to replace it "
            "(the old one is kept until the new one is completely written)"
        )
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose another path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = directory.parent / f".{directory.name}.tmp-{token}"
    try:
        yield tmp
        if not tmp.is_dir():
            raise RuntimeError(f"nothing was written to {tmp}")
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{token}"
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        for leftover in directory.parent.glob(f".{directory.name}.tmp-{token}*"):
            shutil.rmtree(leftover, ignore_errors=True)
