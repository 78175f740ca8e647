"""Facts of the KIND paper (ICML 2025) that kindjax reads: one home for each (configs, methods,
experiments and accounting read them from here; ``tests/test_facts.py`` checks that none is written
again elsewhere).  The ImageNet class tables (Tables 9–11) are data files: :mod:`kindjax.papers.kind.classes`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kindjax.data.class_groups import table_lines

#: §4.2 / Table 6: tailor components per class, ``N_T``, by DiT size.
N_TAILOR = {"B": 3, "L": 4}
#: Table 6: learngene components ``N_G`` with the paper's :data:`PRETRAIN_CLASSES` classes
#: (768 = 150·3 + 318, 1024 = 150·4 + 424).  kindjax's configs fill the rank to the hidden size with
#: the classes of the shipped tables instead (157: N_G 297 / 396), see :mod:`configs.imagenet_dit`.
N_LEARNGENE = {"B": 318, "L": 424}
#: §4.2: the pre-training classes of ImageNet (after merging, Appendix A.3).
PRETRAIN_CLASSES = 150
#: §4.2: pre-training steps (Table 6 lists 200K: ``--config.train.num_steps=200000``).
PRETRAIN_STEPS = 300_000
#: Table 7: every downstream method trains 50K steps.
TRANSFER_STEPS = 50_000
#: Table 7: each method's learning rate on the downstream tasks.
LEARNING_RATES = {"full_ft": 1e-4, "lora": 1e-3, "dora": 1e-3, "pissa": 1e-3, "oft": 1e-4, "loha": 1e-3,
                  "svdiff": 5e-3, "bitfit": 1e-3, "difffit": 1e-3, "heur_lg": 1e-4, "auto_lg": 1e-4, "kind": 1e-3}
#: Table 7: a method's learning rate that differs on one DiT size (SVDiff on DiT-L).
ARCH_LEARNING_RATES = {("svdiff", "L"): 3e-3}
#: Table 7: a method's batch size where it is not DiT's 256 (LoRA).
BATCH_SIZES = {"lora": 512}
#: Table 7: OFT's block number r for task #1..#18 (both DiT-B and DiT-L).
OFT_BLOCKS = (21, 11, 8, 7, 6, 6, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4)
#: Table 1's rows, in its order.
TABLE1_ENTRIES = ("trad_pt", "heur_lg", "laptop_diff", "auto_lg", "kind")
#: Table 1: the baselines train 100K steps after initialisation; KIND none.
TABLE1_STEPS = 100_000
#: Table 3's methods, in its row order.
TABLE3_METHODS = ("svdiff", "oft", "lora", "pissa", "loha", "dora", "kind")
#: Table 3's metric on every data set (its sweep writes it to ``table3.md``, each other metric to ``table3_<name>.md``).
TABLE3_METRIC = "fdd"
#: Table 3's data sets (columns), in its order, with its titles (``configs/downstream_data.py`` has their folders).
TABLE3_DATASETS = {"celebahq": "CelebA-HQ", "hubble": "Hubble", "mri": "MRI", "pokemon": "Pokémon"}


def paper_fid_tables() -> dict[tuple[str, str], tuple[float, np.ndarray]]:
    """``(arch, method) → (Table 2 FID, Table 8 FIDs of the 18 tasks)`` from
    ``tables/kind_fid_tables.tsv`` (KIND paper, Tables 2 and 8)."""
    out = {}
    for arch, method, table2, *tasks in table_lines("kindjax.papers.kind", "tables", "kind_fid_tables.tsv"):
        out[(arch, method)] = (float(table2), np.asarray(tasks, np.float64))
    return out


def paper_aggregation(task_sizes: Sequence[int]) -> list[dict]:
    """For each (arch, method) of the paper: Table 2's FID against the plain mean of Table 8's per-task
    FIDs, the mean weighted by the tasks' class counts (pooled samples with a fixed number per class
    would weight so), and the smallest per-task FID.  Any weighted mean of per-task FIDs lies between
    their min and max; a Table 2 FID below the min can only come from scoring pooled samples."""
    weights = np.asarray(task_sizes, np.float64)
    rows = []
    for (arch, method), (table2, tasks) in paper_fid_tables().items():
        rows.append(dict(arch=arch, method=method, table2=table2, mean=float(tasks.mean()),
                         class_weighted_mean=float(np.average(tasks, weights=weights)), min=float(tasks.min()),
                         ratio=table2 / float(tasks.mean())))
    return rows


#: KIND Table 2, "FLOPs (G)": per (arch, method), forward GFLOP per image of the DiT's linear layers,
#: each method at its Table 7 size, averaged over the 18 tasks (reading: :func:`kindjax.papers.kind.
#: accounting.table2_flops`).  Heur-LG, Auto-LG and full fine-tuning run the dense DiT.
TABLE2_FLOPS = {
    "B": {"svdiff": 43.6, "oft": 119.7, "lora": 50.1, "pissa": 50.1, "loha": 87.1, "dora": 129.5,
          "heur_lg": 43.6, "auto_lg": 43.6, "kind": 33.7, "full_ft": 43.6},
    "L": {"svdiff": 155.0, "oft": 425.6, "lora": 178.2, "pissa": 178.2, "loha": 309.6, "dora": 503.0,
          "heur_lg": 155.0, "auto_lg": 155.0, "kind": 119.6, "full_ft": 155.0},
}
