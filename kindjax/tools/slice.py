"""Writes the learngene, or the tailors of some classes, as a standalone checkpoint.

    python -m kindjax.tools.slice --run RUN --out OUT --part learngene
    python -m kindjax.tools.slice --run RUN --out OUT --part tailors --classes 0,3,7

``--run`` is a training workdir, one of its step directories or another sliced checkpoint;
``--step`` picks a step of a workdir (default: the latest), ``--noema`` the raw
weights instead of the EMA.  The layout of ``OUT`` is described in
:mod:`kindjax.checkpoints.slicing`; it is read by :func:`kindjax.load_learngene` /
:func:`kindjax.load_tailors`.
"""
from __future__ import annotations

from absl import flags

from kindjax import cli
from kindjax.checkpoints import PARTS
from kindjax.checkpoints.slicing import describe, slice_checkpoint


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    meta = slice_checkpoint(f.run, f.out, f.part, f.classes, step=f.step, ema=f.ema, force=f.force)
    print(describe(f.out, meta))


if __name__ == "__main__":
    flags.DEFINE_string("run", None, "Training workdir (read), one of its step directories, or a sliced checkpoint.")
    flags.DEFINE_string("out", None, "Directory to write (must not exist, unless --force).")
    flags.DEFINE_enum("part", None, PARTS, "The part to write.")
    cli.define_classes("Original class ids of the tailors to write, e.g. 0,3,7.")
    flags.DEFINE_integer("step", None, "Step of the run (default: the latest).")
    flags.DEFINE_boolean("ema", True, "Read the EMA weights; --noema reads the raw weights.")
    flags.DEFINE_boolean("force", False, "Replace an existing sliced checkpoint at --out.")
    flags.mark_flags_as_required(["run", "out", "part"])
    cli.run(main)
