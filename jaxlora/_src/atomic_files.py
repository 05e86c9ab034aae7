"""Directories that appear complete or not at all: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax

from jaxlora._src import multihost


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


def _check_free(directory: Path, overwrite: bool) -> None:
    """Raises FileExistsError unless `directory` may be written (absent, or a directory and `overwrite`)."""
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{directory} already exists; pass overwrite=True to replace it "
            "(the old one is kept until the new one is completely written)"
        )
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose another path")


def _move_into_place(tmp: Path, directory: Path, token: str) -> None:
    """Renames the complete `tmp` to `directory`, replacing an existing one only once `tmp` is in place."""
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


def _remove_temporaries(directory: Path, token: str) -> None:
    for leftover in directory.parent.glob(f".{directory.name}.tmp-{token}*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling path to write into; it becomes `directory` only when the block succeeds.

    With `overwrite=False` an existing `directory` is an error; with `overwrite=True` it is replaced, and
    stays intact until the new one is completely written. On an exception nothing is left behind.
    """
    directory = Path(directory).expanduser().absolute()
    recover(directory)
    _check_free(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = directory.parent / f".{directory.name}.tmp-{token}"
    try:
        yield tmp
        _move_into_place(tmp, directory, token)
    finally:
        _remove_temporaries(directory, token)


@contextlib.contextmanager
def shared_atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """`atomic_directory` for every process of a multi-process run: all of them call it, in the same order.

    Every process gets the same temporary path (on a file system they share) and may write into it, or
    some may write and others not (e.g. process 0 alone). Once every process has left the block, process 0
    moves it into place; if the block raised on any process, it raises on every process and nothing is left.
    In a single-process run it is `atomic_directory`.
    """
    if jax.process_count() == 1:
        with atomic_directory(directory, overwrite) as tmp:
            yield tmp
        return
    directory = Path(directory).expanduser().absolute()
    if multihost.is_primary():
        recover(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
    multihost.sync(f"jaxlora: recovered {directory}")
    _check_free(directory, overwrite)  # every process sees the same files: all raise, or none
    token = multihost.shared_token()
    tmp = directory.parent / f".{directory.name}.tmp-{token}"
    try:
        failure = None
        try:
            yield tmp
        except BaseException as err:  # told to the other processes first, so that none waits forever
            failure = err
        _raise_on_every_process(failure, f"writing {directory}")
        if multihost.is_primary():
            try:
                _move_into_place(tmp, directory, token)
            except BaseException as err:
                failure = err
        _raise_on_every_process(failure, f"moving {tmp} to {directory}")
    finally:
        if multihost.is_primary():
            _remove_temporaries(directory, token)


def _raise_on_every_process(failure: BaseException | None, doing: str) -> None:
    """Raises `failure` where it happened and a RuntimeError on the other processes (a collective)."""
    if multihost.all_succeeded(failure is None):
        return
    if failure is not None:
        raise failure
    raise RuntimeError(f"another process failed while {doing}; nothing was written")
