"""The downstream image-folder data sets of the KIND (Table 3) and FINE (supplementary Tables 6, 8) papers.

Nothing is downloaded: the user points ``data.root`` at a folder of class sub-folders
(:mod:`kindjax.data.folder`). A data set *without* classes is one sub-folder holding every image
(``root/all/*.jpg``) and ``classes=1`` (the default); a data set with its own classes (e.g. an MRI set
sorted by diagnosis) has one sub-folder per class and ``classes=N``. The models are the 256² latent
DiTs, so the folder is encoded once to SD-VAE latents and training reads those:

    python -m kindjax.tools.encode --config CONFIG --config.data.root=FOLDER --vae VAE_DIR --out LATENTS
    python -m kindjax.main --config CONFIG --config.data.root=FOLDER --config.data.latents=LATENTS ...

``metric``: what FINE reports on the set: FID for natural images, FDD (DINOv2, ``eval.dinov2_weights``)
for the others. KIND's Table 3 reports FDD on all four of its sets (CelebA-HQ included).
"""
from __future__ import annotations

import dataclasses

from kindjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """``images``: the papers' size (FINE supplementary Table 6); ``fine_steps``: FINE Table 8's
    downstream training steps; ``metric``: FINE's, "fid" (natural images) or "fdd"."""

    title: str
    images: int
    metric: str
    fine_steps: int


DATASETS: dict[str, Dataset] = {
    "celebahq": Dataset("CelebA-HQ", 30_000, "fid", 100_000),
    "bedroom": Dataset("LSUN-Bedroom", 3_033_042, "fid", 150_000),
    "church": Dataset("LSUN-Church", 126_227, "fid", 150_000),
    "hubble": Dataset("Hubble", 2_706, "fdd", 20_000),
    "mri": Dataset("MRI", 3_753, "fdd", 20_000),
    "pokemon": Dataset("Pokémon", 833, "fdd", 20_000),
}


def parse_spec(spec: str, datasets: tuple[str, ...], options: dict[str, tuple[str, ...]],
               defaults: dict[str, str], usage: str) -> tuple[str, dict[str, str], int]:
    """``"DATASET[,TOKEN...]"`` → ``(dataset, {option: value}, classes)``: each token is a value of one
    of ``options`` (in any order) or ``classes=N``; ``defaults`` fill the options not given."""
    dataset, *tokens = [t.strip() for t in spec.split(",")] if spec else [""]
    if dataset not in datasets:
        raise ConfigError(f"config spec {spec!r}: the data set is one of {list(datasets)}, e.g. {usage}")
    chosen, classes = dict(defaults), 1
    for token in tokens:
        if token.startswith("classes="):
            value = token.removeprefix("classes=")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"config spec {spec!r}: classes={value!r} must be a positive number of classes "
                                  f"(the folder's class sub-folders; 1 for a data set without classes)")
            classes = int(value)
            continue
        owners = [name for name, values in options.items() if token in values]
        if not owners:
            allowed = "; ".join(f"{name}: {list(values)}" for name, values in options.items())
            raise ConfigError(f"config spec {spec!r}: unknown token {token!r}; give {allowed}, or classes=N "
                              f"(e.g. {usage})")
        chosen[owners[0]] = token
    return dataset, chosen, classes


def folder_data(config, num_classes: int):
    """``config`` (a 256² latent DiT config) reading a user's image folder: ``data.name="folder"``, no
    class grouping, ``model.num_classes = num_classes``; ``data.root`` and ``data.latents`` are the
    user's (empty here)."""
    config.data.update(name="folder", root="", latents="", grouping="", task="", classes=(), image_size=256)
    config.model.num_classes = num_classes
    return config
