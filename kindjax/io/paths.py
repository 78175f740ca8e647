"""Workdir and data paths as ``etils.epath.Path``: local paths and cloud URIs (``gs://``, ``s3://``)
alike, so every read and write of a run goes through one API that Orbax, TensorBoard files and
NumPy arrays share.

``os.path`` is wrong for a URI: ``os.path.abspath("gs://b/r")`` is ``<cwd>/gs:/b/r``.  Here a URI is
kept as it is and only a local path is made absolute.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Callable

import numpy as np
from etils import epath


def is_uri(path: epath.PathLike) -> bool:
    """Whether ``path`` names a cloud object (``scheme://...``) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URI unchanged, a local path expanded (``~``) and absolute."""
    text = os.fspath(path)
    if is_uri(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def read_json(path: epath.PathLike) -> Any:
    """The JSON document at ``path``."""
    return json.loads(as_path(path).read_text())


def write_json(path: epath.PathLike, value: Any, *, atomic: bool = False) -> None:
    """Writes ``value`` as indented JSON to ``path``, making its directory; ``atomic``: through a
    ``.tmp`` file renamed over ``path``, so a reader never sees half a file."""
    write_bytes(path, json.dumps(value, indent=2).encode(), atomic=atomic)


def write_bytes(path: epath.PathLike, data: bytes, *, atomic: bool = False) -> None:
    """Writes ``data`` to ``path`` (its directory made); ``atomic``: see :func:`write_json`."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not atomic:
        path.write_bytes(data)
        return
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_npy(path: epath.PathLike, array: np.ndarray, *, atomic: bool = False) -> None:
    """``np.save`` of ``array`` to ``path`` (local or cloud)."""
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes(path, buf.getvalue(), atomic=atomic)


def load_npy(path: epath.PathLike) -> np.ndarray:
    """``np.load`` of the ``.npy`` file at ``path`` (local or cloud), read whole."""
    with as_path(path).open("rb") as f:
        return np.load(io.BytesIO(f.read()))


def refuse_existing(out: epath.Path, force: bool, replaceable: Callable[[epath.Path], bool], what: str) -> None:
    """Refuses an existing ``out`` unless ``force``, and even then unless it is an empty directory or
    ``replaceable(out)`` (``what`` it may replace, for the message): a command never overwrites what it
    did not write."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not ((out.is_dir() and not any(out.iterdir())) or replaceable(out)):
        raise FileExistsError(f"{out} is neither {what} nor an empty directory; --force does not replace it")


def disk_bytes(path: epath.PathLike) -> int:
    """Bytes of every file under directory ``path`` (``epath.Path.walk`` yields bucket-relative roots
    for cloud paths, so this walks with ``iterdir``)."""
    total, todo = 0, [as_path(path)]
    while todo:
        for child in todo.pop().iterdir():
            if child.is_dir():
                todo.append(child)
            else:
                total += child.stat().length
    return total


def unwritable(directory: epath.PathLike) -> str | None:
    """Why ``directory`` (made if missing) cannot take new files, or None when it can: a probe file
    is written there and removed (a read-only mount, missing permissions, a file in the way)."""
    path = as_path(directory)
    probe = path / f".kindjax-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None
