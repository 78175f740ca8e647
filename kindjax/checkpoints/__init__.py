"""Every on-disk checkpoint layout of kindjax, in one package.

:mod:`.integrity`: the checksums every checkpoint records and every read verifies;
:mod:`.training`: the train state of ``WORKDIR/checkpoints/<step>/`` (save, restore, resume checks);
:mod:`.layout`: locating any checkpoint directory and reading its metadata and arrays (host numpy);
:mod:`.slicing`: writing the learngene or some tailors as a standalone checkpoint (import it as
``kindjax.checkpoints.slicing``: it reads through :mod:`kindjax.checkpoints.learngene`, which imports this package).
"""
from kindjax.checkpoints.integrity import CheckpointError, tree_checksums, verify
from kindjax.checkpoints.layout import (CHECKPOINTS, META, PARTS, Located, Source, check_part, config_of, locate,
                                        read_meta, restore_item, restore_leaves, source)
from kindjax.checkpoints.training import (SET_ASIDE, STATE_ITEMS, check_same_model, comparable,
                                          check_same_origin, checksums, config_json, manager, portable, restore,
                                          restore_state_item, restore_verified, rotate, save, set_aside,
                                          weights_digest)

__all__ = ["CHECKPOINTS", "META", "PARTS", "SET_ASIDE", "STATE_ITEMS", "CheckpointError", "Located", "Source",
           "check_part", "check_same_model", "check_same_origin", "comparable", "checksums", "config_json", "config_of", "locate",
           "manager", "portable", "read_meta", "restore", "restore_item", "restore_leaves", "restore_state_item",
           "restore_verified", "rotate", "save", "set_aside", "source", "tree_checksums", "verify", "weights_digest"]
