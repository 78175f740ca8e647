"""Parameter and FLOP accounting of every transfer method, for any model config.

``python -m kindjax.papers.kind.accounting --config configs/dit_b.py --classes 7`` prints, for each
method of :mod:`kindjax.papers.kind.methods` adapted to ``--classes`` new classes:

- **trainable**: scalars in leaves the optimizer updates (``train.trainable`` and the
  frozen learngene rule, :func:`kindjax.params.update_rule`);
- **stored**: scalars in the adapted model's parameter tree (what it takes to sample);
- **forward GMACs / image**: multiply-accumulates of one forward pass (the unit of
  DiT's "GFLOPs", e.g. 23 for DiT-B/2 at 256²), and
- **train GFLOP / image**: floating-point operations of the forward pass plus the
  gradient with respect to the trainable leaves only, per image,

both for a batch of ``train.batch_size`` images divided by the batch size, so work done
once per batch (building a weight: SVDiff, OFT's rotation, KIND's learngene product) is
shared as in training.

``--kind_tasks`` instead averages the parameter counts over the KIND paper's 18 downstream
tasks, each method at that task's Table 7 size (:func:`kindjax.papers.kind.methods.kind_task_sizes`):
KIND Table 2's "Para." column, e.g. ``--config configs/kind_dit_b.py --kind_tasks
--n_learngene 318 --n_tailor 3`` (the paper's N_G, N_T).

All numbers come from the parameter tree and XLA's cost analysis of the lowered
computations at the config's shapes (nothing is hand-typed, nothing is run).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from flax import traverse_util

from kindjax import cli
from kindjax import params as param_rules
from kindjax.archs import resolve_dims
from kindjax.papers.kind.classes import kind_tasks
from kindjax.papers.kind.methods import METHODS, Sizes, config_sizes, kind_task_sizes, method_config
from kindjax.models.dit import abstract_params, build_model, unrolled


@dataclasses.dataclass(frozen=True)
class Account:
    method: str
    trainable: int
    stored: int
    forward_macs: float
    train_flops: float


def _flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def _shapes(config: ml_collections.ConfigDict, batch: int) -> tuple:
    """The model, its parameter shapes, and input shapes ``(x, t/y)`` for ``batch`` images."""
    model = unrolled(build_model(config))   # every block counted, whatever model.scan_blocks is
    x = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, model.in_channels), jnp.float32)
    i = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return model, abstract_params(model), x, i


def _split(config: ml_collections.ConfigDict, params) -> tuple[dict, dict]:
    """Flat ``(trainable, frozen)`` leaves by the optimizer's rule."""
    is_trainable = param_rules.update_rule(config).trainable
    flat = traverse_util.flatten_dict(param_rules.as_dict(params))
    keys = {k: is_trainable(tuple(jax.tree_util.DictKey(n) for n in k)) for k in flat}
    return ({k: v for k, v in flat.items() if keys[k]}, {k: v for k, v in flat.items() if not keys[k]})


def parameter_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(trainable, stored)`` scalars of ``config``'s model (from shapes; nothing is built)."""
    _, params, _, _ = _shapes(config, 1)
    return param_rules.count(_split(config, params)[0]), param_rules.count(params)


def account(config: ml_collections.ConfigDict) -> tuple[int, int, float, float]:
    """``(trainable, stored, forward MACs, training FLOPs)`` per image for ``config``'s model."""
    b = config.train.batch_size
    model, params, x, i = _shapes(config, b)
    trainable, frozen = _split(config, params)

    def loss(train_part, frozen_part, x, t, y):
        p = traverse_util.unflatten_dict({**train_part, **frozen_part})
        return jnp.mean(jnp.square(model.apply({"params": p}, x, t, y)))

    def forward(p, x, t, y):
        return model.apply({"params": p}, x, t, y)

    forward_flops = _flops(forward, params, x, i, i)
    train_flops = _flops(jax.grad(loss), trainable, frozen, x, i, i) if trainable else forward_flops
    return param_rules.count(trainable), param_rules.count(params), forward_flops / 2 / b, train_flops / b


def adapted_configs(config: ml_collections.ConfigDict, classes: int, sizes: Sizes,
                    methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, ml_collections.ConfigDict]:
    """``config``'s model set up for each method, adapted to ``classes`` new classes at ``sizes``."""
    base = config.copy_and_resolve_references()
    base.model.num_classes = classes
    base.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    base.data.classes = ()
    return {name: method_config(base, name, sizes, pretrained="<dense>", learngene="<kind>") for name in methods}


def accounts(config: ml_collections.ConfigDict, classes: int, sizes: Sizes,
             methods: tuple[str, ...] = tuple(METHODS)) -> list[Account]:
    """One :class:`Account` per method, each adapted to ``classes`` new classes."""
    return [Account(name, *account(c)) for name, c in adapted_configs(config, classes, sizes, methods).items()]


def kind_task_counts(config: ml_collections.ConfigDict, n_learngene: int, n_tailor: int,
                     methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, list[tuple[int, int]]]:
    """``method → [(trainable, stored)]`` on each of KIND's 18 downstream tasks, in task order, each
    method at the task's Table 7 size for ``config``'s width and depth (shape-only)."""
    dims = resolve_dims(config.model)
    counts = {name: [] for name in methods}
    for task in kind_tasks():
        classes, sizes = kind_task_sizes(task, n_learngene, n_tailor, dims.hidden_size, dims.depth)
        for name, c in adapted_configs(config, classes, sizes, methods).items():
            counts[name].append(parameter_counts(c))
    return counts


def task_average_markdown(counts: dict[str, list[tuple[int, int]]]) -> str:
    """The mean trainable and stored counts over the tasks (KIND Table 2's "Para." is the first)."""
    lines = ["| method | trainable (M), task mean | stored (M), task mean |", "|---|---:|---:|"]
    for name, rows in counts.items():
        trainable, stored = (sum(col) / len(rows) / 1e6 for col in zip(*rows))
        lines.append(f"| {name} | {trainable:.3f} | {stored:.2f} |")
    return "\n".join(lines)


def markdown(rows: list[Account]) -> str:
    lines = ["| method | trainable (M) | stored (M) | forward GMACs / image | train GFLOP / image |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.method} | {r.trainable / 1e6:.3f} | {r.stored / 1e6:.2f} | {r.forward_macs / 1e9:.2f} "
              f"| {r.train_flops / 1e9:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Prints the accounting table of ``--methods`` (default: all) for ``--config``."""
    del argv
    FLAGS = flags.FLAGS
    methods = tuple(FLAGS.methods) or tuple(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    config = FLAGS.config
    sizes = config_sizes(config, FLAGS.classes, FLAGS.n_learngene, FLAGS.n_tailor)
    if FLAGS.kind_tasks:
        print(f"{len(methods)} methods on KIND's {len(kind_tasks())} downstream tasks at Table 7's sizes; "
              f"N_G={sizes.n_learngene}, N_T={sizes.n_tailor}", flush=True)
        print(task_average_markdown(kind_task_counts(config, sizes.n_learngene, sizes.n_tailor, methods)))
        return
    sizes = dataclasses.replace(sizes, oft_blocks=FLAGS.oft_blocks or sizes.oft_blocks,
                                num_blocks=FLAGS.num_blocks or sizes.num_blocks)
    print(f"{len(methods)} methods adapted to {FLAGS.classes} classes; {sizes}", flush=True)
    print(markdown(accounts(config, FLAGS.classes, sizes, methods)))


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Model config (configs/*.py).", lock_config=False)
    flags.DEFINE_integer("classes", 7, "Number of new classes the methods adapt to (KIND task #1: 7).")
    flags.DEFINE_integer("n_learngene", 0, "KIND N_G (default: the config's, if it is a KIND config).")
    flags.DEFINE_integer("n_tailor", 0, "KIND N_T (default: the config's).")
    flags.DEFINE_integer("oft_blocks", 0, "OFT block number r (default: hidden size / 32).")
    flags.DEFINE_integer("num_blocks", 0, "Blocks Heur-LG / Auto-LG inherit (default: half the depth).")
    flags.DEFINE_list("methods", [], "Methods to list (default: all).")
    flags.DEFINE_bool("kind_tasks", False, "Average the parameter counts over KIND's 18 downstream tasks, each "
                      "at its Table 7 size (Table 2's Para.), instead of --classes (no FLOPs).")
    flags.mark_flags_as_required(["config"])
    cli.run(main, "accounting")
