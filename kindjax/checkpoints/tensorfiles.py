"""Parameter trees as safetensors files, each listed with its SHA-256 in a JSON card.

A directory written this way holds a card (:data:`CARD`, JSON, written last) and the tensor files it
lists under ``files``: ``{"<part>.safetensors": {"sha256": hex, "bytes": n, "arrays": a,
"parameters": p}}``.  The card also carries ``step`` and the full ``config`` (as a checkpoint's
``meta`` does), so :func:`kindjax.checkpoints.locate` reads it as one more checkpoint kind,
``exported``.  Keys inside a tensor file are parameter paths joined by ``/``
(``block_0/attn/q/learngene/U``); any safetensors reader (PyTorch, NumPy, JAX) opens the files.

:func:`read_part` hashes a file before parsing it and refuses one whose SHA-256 is not the card's,
so a changed or damaged file is never loaded.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np
from etils import epath
from flax import traverse_util

from kindjax.io.paths import as_path, write_bytes

#: The card of an exported directory.
CARD = "learngene.json"
#: Suffix of a part's tensor file (``<part>.safetensors``).
SUFFIX = ".safetensors"


def part_file(part: str) -> str:
    """The tensor file name of ``part`` (``learngene`` → ``learngene.safetensors``)."""
    return part + SUFFIX


def is_exported(directory: epath.PathLike) -> bool:
    """Whether ``directory`` holds a card (:data:`CARD`)."""
    return (as_path(directory) / CARD).is_file()


def sha256(data: bytes) -> str:
    """The SHA-256 of ``data``, as hex."""
    return hashlib.sha256(data).hexdigest()


def write_part(directory: epath.PathLike, part: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the nested-dict ``tree`` as ``<part>.safetensors`` in ``directory`` (float arrays as
    they are, keys ``/``-joined paths); returns its card entry (``sha256``, ``bytes``, ``arrays``,
    ``parameters``)."""
    from safetensors.numpy import save

    flat = {"/".join(key): np.ascontiguousarray(np.asarray(leaf))
            for key, leaf in traverse_util.flatten_dict(dict(tree)).items()}
    data = save(flat)
    write_bytes(as_path(directory) / part_file(part), data, atomic=True)
    return {"sha256": sha256(data), "bytes": len(data), "arrays": len(flat),
            "parameters": int(sum(a.size for a in flat.values()))}


def read_part(directory: epath.PathLike, part: str, card: Mapping[str, Any]) -> dict[str, Any]:
    """The tree of ``<part>.safetensors`` in ``directory`` (nested dicts of numpy arrays, keys sorted), after
    its SHA-256 matched the one ``card`` records; ValueError (one line) when the card lists no such file,
    the file is missing, or its hash differs."""
    name = part_file(part)
    directory = as_path(directory)
    entry = card.get("files", {}).get(name)
    if entry is None:
        raise ValueError(f"{directory / CARD} lists no {name} (it holds {sorted(card.get('files', {}))}): "
                         f"export the {part} too")
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing but {CARD} lists it: copy the whole exported directory")
    data = path.read_bytes()
    found = sha256(data)
    if found != entry["sha256"]:
        raise ValueError(f"{path} has SHA-256 {found[:16]}…, but {CARD} records {entry['sha256'][:16]}…: the file "
                         f"was changed or damaged after export; export it again or fetch an intact copy")
    from safetensors.numpy import load

    # Keys sorted at every level, as an Orbax restore gives them: code that walks a tree in its dict order
    # (e.g. :func:`kindjax.params.map_layers` drawing one PRNG key per layer) sees the same tree either way.
    flat = {tuple(key.split("/")): value for key, value in load(data).items()}
    return traverse_util.unflatten_dict({key: flat[key] for key in sorted(flat)})
