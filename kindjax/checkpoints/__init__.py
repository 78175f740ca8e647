"""Every on-disk checkpoint layout of kindjax, in one package.

:mod:`.training`: the train state of ``WORKDIR/checkpoints/<step>/`` (save, restore, resume checks);
:mod:`.layout`: locating any checkpoint directory and reading its metadata and arrays (host numpy);
:mod:`.slicing`: writing the learngene or some tailors as a standalone checkpoint (import it as
``kindjax.checkpoints.slicing``: it reads through :mod:`kindjax.checkpoints.learngene`, which imports this package).
"""
from kindjax.checkpoints.layout import (CHECKPOINTS, META, PARTS, Located, Source, check_part, config_of, locate,
                                        read_meta, restore_item, restore_leaves, source)
from kindjax.checkpoints.training import (SET_ASIDE, STATE_ITEMS, CheckpointError, check_same_model,
                                          check_same_origin, checksums, config_json, manager, restore,
                                          restore_state_item, restore_verified, rotate, save, set_aside)

__all__ = ["CHECKPOINTS", "META", "PARTS", "SET_ASIDE", "STATE_ITEMS", "CheckpointError", "Located", "Source",
           "check_part", "check_same_model", "check_same_origin", "checksums", "config_json", "config_of", "locate",
           "manager", "read_meta", "restore", "restore_item", "restore_leaves", "restore_state_item",
           "restore_verified", "rotate", "save", "set_aside", "source"]
