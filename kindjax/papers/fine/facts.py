"""Facts of the FINE paper that kindjax reads: one home for each (configs and experiments read them
from here; ``tests/test_facts.py`` checks that none is written again elsewhere).  How sure each fact
is: ``/work/shared/papers/fine_main_notes.md`` and the supplementary.
"""
from __future__ import annotations

#: Supplementary Table 7's "sigma share", read as the shared rank r (:mod:`kindjax.papers.fine.layer`).
RANK = {"B": 100, "L": 148}
#: Supplementary Table 7: pre-training steps, batch size and drop path.
PRETRAIN_STEPS = 300_000
PRETRAIN_BATCH = 64
PRETRAIN_DROP_PATH = 0.5
#: Main text, Table 1: the depths of the initialised targets, each trained this many steps.
TARGET_DEPTHS = (4, 6, 8, 10, 12)
TARGET_STEPS = 100_000
#: Supplementary Table 8: drop path downstream (every data set).
DOWNSTREAM_DROP_PATH = 0.1
#: Table 1's baselines as initialisers of a dense DiT of any depth (``init.grow``,
#: :mod:`kindjax.papers.fine.growth`): He ("scratch"), Mimetic, Share, TLEG, LiGO, and layer pruning.
GROWTH = ("scratch", "mimetic", "share", "tleg", "ligo", "prune")
#: Those of :data:`GROWTH` that read a pre-trained source (``init.grow_from``).
GROWTH_FROM_SOURCE = ("share", "tleg", "ligo", "prune")
