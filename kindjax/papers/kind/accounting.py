"""Parameter and FLOP accounting of every transfer method, for any model config.

``python -m kindjax.papers.kind.accounting --config configs/dit_b.py --num_classes 7`` prints, for each
method of :mod:`kindjax.papers.kind.methods` adapted to ``--num_classes`` new classes:

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

``--kind_tasks`` instead averages over the KIND paper's 18 downstream tasks, each method at that
task's Table 7 size (:func:`kindjax.papers.kind.methods.kind_task_sizes`), the parameter counts
(KIND Table 2's "Para." column) and :func:`table2_flops` (its "FLOPs (G)" column), e.g.
``--config configs/kind_dit_b.py --kind_tasks --n_learngene 318 --n_tailor 3`` (the paper's N_G, N_T).

The counts come from the parameter tree and XLA's cost analysis of the lowered computations at the
config's shapes (nothing is run); Table 2's unit, which XLA cannot give (it counts kindjax's
computation, not the paper's), is a count over the config's matrix shapes (:func:`table2_flops`).
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
from kindjax.layers.svd import matrix_shapes
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


def _matrix_macs(linear: ml_collections.ConfigDict, num_classes: int, d_in: int, d_out: int) -> int:
    """Multiply-accumulates per token of one ``d_in → d_out`` block matrix as the method applies it
    (see :func:`table2_flops`)."""
    dense = d_in * d_out
    if linear.kind in ("dense", "svdiff"):
        return dense
    if linear.kind in ("lora", "pissa"):
        return dense + linear.rank * (d_in + d_out)
    if linear.kind == "dora":
        return 2 * dense + linear.rank * (d_in + d_out)
    if linear.kind == "loha":
        return 2 * dense
    if linear.kind == "oft":
        return d_in * d_in + dense
    if linear.kind == "kind":
        return (linear.n_learngene + num_classes * linear.n_tailor) * (d_in + d_out)
    raise ValueError(f"model.linear.kind={linear.kind!r} has no KIND Table 2 FLOPs count")


def _matrix_macs_per_forward(linear: ml_collections.ConfigDict, d_in: int, d_out: int) -> int:
    """Multiply-accumulates of one block matrix done once per forward on weights, that Table 2 counts:
    DoRA's ``r·d_in·(d_in + d_out)``, peft's ``lora_B(lora_A(eye(d_in)))`` (``DoraLinearLayer.get_lora_weight``,
    the ``B·A`` of the weight norm computed as the identity through both LoRA layers); 0 otherwise."""
    return linear.rank * d_in * (d_in + d_out) if linear.kind == "dora" else 0


def table2_flops(config: ml_collections.ConfigDict) -> float:
    """KIND Table 2's "FLOPs (G)" unit, in FLOP: forward FLOPs per image of the DiT's linear layers, 2 × MACs.

    Per token, each block matrix ``d_in → d_out`` costs ``d_in·d_out`` (dense, a rebuilt SVDiff weight),
    ``d_in·d_out + r·(d_in + d_out)`` (LoRA, PiSSA: the unmerged ``x·A·B``), ``2·d_in·d_out`` (LoHa:
    ``x·W + x·ΔW``, peft's forward), ``d_in² + d_in·d_out`` (OFT: ``x`` through its block-diagonal
    ``R`` as one ``d_in × d_in`` matrix, then ``W``), ``2·d_in·d_out + r·(d_in + d_out)`` (DoRA, peft's
    training forward with LoRA dropout: ``x·W`` twice and the LoRA path), ``(N_G + N_cls·N_T)·(d_in + d_out)``
    (KIND: the learngene and every class's tailor as thin factors).  The other linear layers are dense: the patch embedding
    and final projection per token; the timestep MLP, every block's adaLN ``d → 6d`` and the final
    ``d → 2d`` per image.  Per image, as for one image per forward, the work on weights that passes
    through linear layers (:func:`_matrix_macs_per_forward`: DoRA's identity through ``lora_A`` and
    ``lora_B``).  Not counted: attention's score products, elementwise work and other work on weights
    (a LoHa ``ΔW``): with it the LoHa row would exceed twice the dense one.  Every method's mean over the
    18 tasks is within 2% of Table 2; DoRA's two terms are those of peft's DoRA layer in training under
    torch's FLOP counter (tests/test_tables.py).
    """
    m = config.model
    dims = resolve_dims(m)
    d, tokens = dims.hidden_size, (m.image_size // m.patch_size) ** 2
    patch = m.patch_size ** 2 * m.in_channels
    out = patch * (2 if m.learn_sigma else 1)
    shapes = matrix_shapes(m).values()
    blocks = sum(_matrix_macs(m.linear, m.num_classes, d_in, d_out) for d_in, d_out in shapes)
    per_token = dims.depth * blocks + patch * d + d * out
    per_image = 256 * d + d * d + dims.depth * 6 * d * d + 2 * d * d   # timestep MLP (256 frequencies), adaLN
    per_image += dims.depth * sum(_matrix_macs_per_forward(m.linear, d_in, d_out) for d_in, d_out in shapes)
    return 2.0 * (tokens * per_token + per_image)


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
                     methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, list[tuple[int, int, float]]]:
    """``method → [(trainable, stored, Table 2 FLOP)]`` on each of KIND's 18 downstream tasks, in task
    order, each method at the task's Table 7 size for ``config``'s width and depth (shape-only)."""
    dims = resolve_dims(config.model)
    counts = {name: [] for name in methods}
    for task in kind_tasks():
        classes, sizes = kind_task_sizes(task, n_learngene, n_tailor, dims.hidden_size, dims.depth)
        for name, c in adapted_configs(config, classes, sizes, methods).items():
            counts[name].append((*parameter_counts(c), table2_flops(c)))
    return counts


def task_average_markdown(counts: dict[str, list[tuple[int, int, float]]]) -> str:
    """The mean trainable and stored counts and Table 2 FLOPs over the tasks (KIND Table 2's "Para."
    and "FLOPs (G)")."""
    lines = ["| method | trainable (M), task mean | stored (M), task mean | FLOPs (G), task mean |",
             "|---|---:|---:|---:|"]
    for name, rows in counts.items():
        trainable, stored, flops = (sum(col) / len(rows) for col in zip(*rows))
        lines.append(f"| {name} | {trainable / 1e6:.3f} | {stored / 1e6:.2f} | {flops / 1e9:.1f} |")
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
    sizes = config_sizes(config, FLAGS.num_classes, FLAGS.n_learngene, FLAGS.n_tailor)
    if FLAGS.kind_tasks:
        print(f"{len(methods)} methods on KIND's {len(kind_tasks())} downstream tasks at Table 7's sizes; "
              f"N_G={sizes.n_learngene}, N_T={sizes.n_tailor}", flush=True)
        print(task_average_markdown(kind_task_counts(config, sizes.n_learngene, sizes.n_tailor, methods)))
        return
    sizes = dataclasses.replace(sizes, oft_blocks=FLAGS.oft_blocks or sizes.oft_blocks,
                                num_blocks=FLAGS.num_blocks or sizes.num_blocks)
    print(f"{len(methods)} methods adapted to {FLAGS.num_classes} classes; {sizes}", flush=True)
    print(markdown(accounts(config, FLAGS.num_classes, sizes, methods)))


if __name__ == "__main__":
    cli.define_config("Model config (configs/*.py).")
    flags.DEFINE_integer("num_classes", 7, "Number of new classes the methods adapt to (KIND task #1: 7).")
    flags.DEFINE_integer("n_learngene", 0, "KIND N_G (default: the config's, if it is a KIND config).")
    flags.DEFINE_integer("n_tailor", 0, "KIND N_T (default: the config's).")
    flags.DEFINE_integer("oft_blocks", 0, "OFT block number r (default: hidden size / 32).")
    flags.DEFINE_integer("num_blocks", 0, "Blocks Heur-LG / Auto-LG inherit (default: half the depth).")
    flags.DEFINE_list("methods", [], "Methods to list (default: all).")
    flags.DEFINE_bool("kind_tasks", False, "Average the parameter counts and Table 2's FLOPs over KIND's 18 "
                      "downstream tasks, each at its Table 7 size (Table 2's Para. and FLOPs), instead of --num_classes.")
    flags.mark_flags_as_required(["config"])
    cli.run(main)
