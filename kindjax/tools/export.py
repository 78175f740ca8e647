"""Exports a run for use outside kindjax: to diffusers, or its learngene to safetensors; each with a model card.

    python -m kindjax.tools.export --run RUN --format diffusers --out DIR [--classes 3] [--step N] [--noema]
    python -m kindjax.tools.export --run RUN --format safetensors --out DIR [--classes 0,3,7] [--force]

``--format diffusers`` writes a ``diffusers.DiTTransformer2DModel`` directory (``config.json``,
``diffusion_pytorch_model.safetensors``, float32) of the dense DiT that computes the run's model:

- a dense DiT: its weights;
- a FINE DiT, materialized: ``W_l = U·diag(σ_l)·Vᵀ`` (:func:`kindjax.papers.fine.transfer.materialize`);
- a KIND DiT assembled for ``--classes`` (default: all of them; label ``i`` is class ``classes[i]``,
  :func:`kindjax.assemble`): every KIND layer's kernel ``W = V_G diag(σ_G) U_Gᵀ + Σ_c V_T[c] diag(σ_T[c])
  U_T[c]ᵀ`` over the kept classes ``c``, the layer's own product applied to the identity.

A dense DiT has one weight per layer for every label.  That is exactly KIND's ungated formulation
(ablation #3), for any classes.  A class-gated KIND model gives each label its own tailor and the null
label the learngene alone, which one dense weight cannot: it is exported for one class at a time
(``--classes c``), where every conditional output is exact and the unconditional branch of guidance
carries the class's tailor too (kindjax's carries none; the card says so).

The keys, layouts, per-block embedder copies and config are :mod:`kindjax.tools.convert`'s table run backwards,
so ``python -m kindjax.tools.convert --src DIR`` reads the directory back into the same parameters.  The label
table is padded with copies of the null row to 1001 rows, so that label 1000 (DiTPipeline's null class)
is the null class; ``config.json`` keeps the true class count under ``_kindjax``.  What diffusers' DiT
cannot express (the original DiT's timestep embedding, other LayerNorm eps or MLP ratio, DiffFit
scales, adapters) is refused in one line.

``--format safetensors`` writes a KIND run's learngene (``learngene.safetensors``), with ``--classes``
also those classes' tailors (``tailors.safetensors``), and the card ``learngene.json``: arch and sizes,
``N_G``, ``N_T``, the run's classes with their names, the training data, steps and config
fingerprint (:func:`kindjax.train.stages.fingerprint`, hashed), kindjax's version, each file's SHA-256 and
the full config.  :func:`kindjax.load_learngene`, :func:`kindjax.load_tailors` and
``init.learngene`` read it (:mod:`kindjax.checkpoints.tensorfiles`) and refuse a file whose hash is
not the card's.

Both formats add a model card ``README.md``.  ``--out`` must not exist unless ``--force``, which replaces
only an earlier export or an empty directory; the export is written beside it and moved in place at
the end, so a failed export leaves an earlier one as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from kindjax import checkpoints, cli
from kindjax import params as param_rules
from kindjax.archs import resolve_dims
from kindjax.checkpoints import tensorfiles
from kindjax.checkpoints.learngene import assemble, load_learngene, load_params, load_tailors
from kindjax.data import class_names
from kindjax.io.paths import as_path, read_json, refuse_existing, write_bytes, write_json
from kindjax.models.dit import abstract_params, build_model
from kindjax.papers.fine.transfer import materialize
from kindjax.papers.kind.layer import kind_formulation, ungated_kind_linear
from kindjax.tools.convert import KINDJAX_KEY, PIPELINE_NULL, dit_config_to_diffusers, dit_params_to_diffusers
from kindjax.train.stages import fingerprint

FORMATS = ("diffusers", "safetensors")
#: The weights file of a diffusers model directory.
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
#: The model card of every export.
MODEL_CARD = "README.md"
#: ``format`` of a ``learngene.json`` card, and its version.
CARD_FORMAT, CARD_VERSION = "kindjax-learngene", 1
#: The linear variants an export reads (others are refused).
EXPORTABLE = ("dense", "kind", "fine")


@dataclasses.dataclass(frozen=True)
class Run:
    """What an export knows of a run before reading weights: the checkpoint it resolved to, its config,
    where the weights come from, the figures of its ``metrics.json`` at that step ({} when none), the
    names of its classes (None when its data cannot be read here) and its config fingerprint."""

    path: str
    located: checkpoints.Located
    config: ml_collections.ConfigDict
    source: checkpoints.Source
    metrics: dict[str, float]
    names: tuple[str, ...] | None
    fingerprint: str | None


def kindjax_version() -> str:
    """The installed kindjax version (``unknown`` when it is run from a source tree that is not installed)."""
    try:
        return importlib.metadata.version("kindjax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _metrics(located: checkpoints.Located, source: checkpoints.Source) -> dict[str, float]:
    """The numeric figures of the run's ``metrics.json`` when they are of the exported step."""
    if located.kind == "exported":
        return dict(located.meta["training"]["metrics"])
    path = as_path(source.checkpoint).parent.parent / "metrics.json"
    if not path.exists():
        return {}
    metrics = read_json(path)
    if metrics.get("step", source.step) != source.step:
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _names(located: checkpoints.Located, config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    if located.kind == "exported":
        return tuple(c["name"] for c in located.meta["classes"])
    try:
        return class_names(config)
    except (ValueError, OSError):   # the training data is not on this machine: the card says "unknown"
        return None


def _fingerprint(located: checkpoints.Located, config: ml_collections.ConfigDict) -> str | None:
    """SHA-256 of :func:`kindjax.train.stages.fingerprint` (canonical JSON) of the run that wrote the weights;
    None for a sliced checkpoint, whose metadata does not say what the run started from."""
    if located.kind == "exported":
        return located.meta["training"]["fingerprint"]
    if located.kind == "sliced":
        return None
    document = json.dumps(fingerprint(config, located.meta.get("origin", {})), sort_keys=True)
    return "sha256:" + tensorfiles.sha256(document.encode())


def open_run(path: str, step: int | None = None, ema: bool = True) -> Run:
    """The :class:`Run` at ``path`` (a training workdir, a step, sliced or exported directory)."""
    located = checkpoints.locate(path, step)
    config = checkpoints.config_of(located)
    source = checkpoints.source(located, ema)
    return Run(str(path), located, config, source, _metrics(located, source), _names(located, config),
               _fingerprint(located, config))


def dense_config(config: ml_collections.ConfigDict, num_classes: int) -> ml_collections.ConfigDict:
    """``config`` with the dense linear layer and ``num_classes`` classes (the exported model's)."""
    c = config.copy_and_resolve_references()
    c.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    c.model.num_classes = num_classes
    return c


def materialize_kind(params: Mapping[str, Any]) -> dict:
    """The dense DiT's tree computing the KIND tree ``params`` with its tailors applied to every label:
    each KIND layer's kernel ``W = V_G diag(σ_G) U_Gᵀ + Σ_c V_T[c] diag(σ_T[c]) U_T[c]ᵀ`` (``d_in × d_out``),
    the layer's own ungated product (:func:`ungated_kind_linear`) of the identity ``I_{d_in}``; biases and
    every other leaf copied."""
    def dense(node: dict, key: jax.Array) -> dict:
        del key
        learngene, tailors = node["learngene"], node["tailors"]
        eye = jnp.eye(learngene["V"].shape[0], dtype=jnp.float32)
        kernel = ungated_kind_linear(eye, None, learngene, tailors, jnp.zeros(learngene["U"].shape[0]))
        return {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(node["bias"], np.float32)}

    tree = param_rules.map_layers(param_rules.as_dict(params), lambda name, node: "learngene" in node
                                  and "tailors" in node, dense, jax.random.key(0))
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), tree)


def _run_classes(run: Run, classes: Sequence[int] | None) -> Sequence[int]:
    """``classes``, or every class the run holds tailors of (a workdir: all; an export: its tailors)."""
    if classes is not None:
        return classes
    if run.located.kind == "exported":
        return run.located.meta["tailor_classes"]
    if run.located.kind == "sliced":
        return run.located.meta["classes"] or ()
    return range(run.config.model.num_classes)


@dataclasses.dataclass(frozen=True)
class DenseModel:
    """The dense DiT an export writes: its parameters and config, the run's labels of its classes (label
    ``i`` is run label ``classes[i]``) and what the model card must say about it."""

    params: dict
    config: ml_collections.ConfigDict
    classes: tuple[int, ...]
    description: str
    caveat: str = ""


def kind_dense(run: Run, classes: Sequence[int] | None, step: int | None, ema: bool) -> DenseModel:
    """The KIND model of ``run`` assembled for ``classes`` (:func:`kindjax.assemble`), materialized
    (:func:`materialize_kind`); refuses a class-gated model with other than one class."""
    tailors = load_tailors(run.path, _run_classes(run, classes), step=step, ema=ema)   # checks the class ids
    formulation = kind_formulation(run.config.model.linear)
    chosen = tailors.classes
    if formulation != "ungated" and len(chosen) != 1:
        raise ValueError(f"{run.path} is a class-gated KIND model (model.linear.formulation={formulation!r}): each "
                         f"label computes with its own tailor, which diffusers' DiT (one weight for every label) "
                         f"cannot express for {len(chosen)} classes; export one class per directory (--classes "
                         f"{chosen[0]}), or the learngene and tailors with --format safetensors")
    assembled = assemble(load_learngene(run.path, step=step, ema=ema), tailors, verbose=False)
    linear = run.config.model.linear
    description = (f"a KIND DiT assembled for {len(chosen)} of its {run.config.model.num_classes} classes and "
                   f"materialized: the learngene (N_G = {linear.n_learngene} components per matrix) plus the "
                   f"tailors (N_T = {linear.n_tailor} components each) of these classes, each matrix built once "
                   f"as W = U_G·diag(σ_G)·V_Gᵀ + Σ_c U_c·diag(σ_c)·V_cᵀ")
    caveat = "" if formulation == "ungated" else (
        "The KIND model is class-gated: in kindjax the null label (the unconditional branch of classifier-free "
        "guidance) computes with the learngene alone. A dense DiT has one weight for every label, so here the "
        "null label carries this class's tailor as well: conditional outputs are kindjax's exactly, guided "
        "samples are not the same as kindjax's.")
    return DenseModel(materialize_kind(assembled.params), dense_config(assembled.config, len(chosen)), chosen,
                      description, caveat)


def fine_dense(run: Run, step: int | None, ema: bool) -> DenseModel:
    """The FINE model of ``run`` materialized (:func:`kindjax.papers.fine.transfer.materialize`)."""
    params, config = load_params(run.path, step=step, ema=ema)
    dense = dense_config(config, config.model.num_classes)
    tree = materialize(params, abstract_params(build_model(dense)))
    linear = config.model.linear
    return DenseModel(jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), tree), dense,
                      tuple(range(config.model.num_classes)),
                      f"a FINE DiT materialized: singular vectors U, V shared by all layers (rank {linear.rank}, "
                      f"layout {linear.get('layout', 'per_role')!r}), each layer's matrix built once as "
                      f"W_l = U·diag(σ_l)·Vᵀ")


def dense_model(run: Run, classes: Sequence[int] | None, step: int | None, ema: bool) -> DenseModel:
    """The dense DiT computing ``run``'s model (module docstring); refuses what it cannot be."""
    kind = run.config.model.linear.kind
    if kind not in EXPORTABLE:
        raise ValueError(f"{run.path} holds a DiT with model.linear.kind={kind!r}: export writes dense, KIND and "
                         f"FINE models; merge the adapters into a dense DiT first")
    if kind != "kind" and classes is not None:
        raise ValueError(f"{run.path} holds a {kind!r} DiT (model.linear.kind={kind!r}), which has no tailors: "
                         f"--classes selects KIND tailors, and this model serves all its "
                         f"{run.config.model.num_classes} classes; export it without --classes")
    dit_config_to_diffusers(run.config)                      # refuse what diffusers cannot express, before reading
    if kind == "kind":
        return kind_dense(run, classes, step, ema)
    if kind == "fine":
        return fine_dense(run, step, ema)
    params, config = load_params(run.path, step=step, ema=ema)
    return DenseModel(jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), param_rules.as_dict(params)), config,
                      tuple(range(config.model.num_classes)), "a dense DiT, its weights as trained")


def _class_rows(run: Run, labels: Sequence[int]) -> list[dict[str, Any]]:
    names = run.names
    return [{"label": i, "run_label": int(c), "name": names[c] if names else None} for i, c in enumerate(labels)]


def _is_replaceable(out: epath.Path) -> bool:
    """``--force`` replaces an earlier export (or an empty directory: :func:`refuse_existing`)."""
    if not out.is_dir():
        return False
    if tensorfiles.is_exported(out):
        return True
    config = out / "config.json"
    return config.is_file() and KINDJAX_KEY in read_json(config)


@contextlib.contextmanager
def staged(out: str, force: bool) -> Iterator[epath.Path]:
    """A fresh directory beside ``out`` to write the export in, moved to ``out`` when the block ends
    without error (an earlier export there replaced only then); removed when it fails."""
    out_path = as_path(out)
    refuse_existing(out_path, force, _is_replaceable, "an earlier export")
    stage = out_path.parent / f".{out_path.name}.partial"
    if stage.exists():
        stage.rmtree()
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        stage.rmtree()
        raise
    old = out_path.parent / f".{out_path.name}.replaced"
    if out_path.exists():
        if old.exists():
            old.rmtree()
        out_path.rename(old)
    stage.rename(out_path)
    if old.exists():
        old.rmtree()


def export_diffusers(run: Run, out: epath.Path, name: str, classes: Sequence[int] | None, step: int | None,
                     ema: bool) -> dict[str, Any]:
    """Writes the diffusers directory of ``run`` into ``out`` (to be moved to ``name``); returns its
    ``config.json``."""
    model = dense_model(run, classes, step, ema)
    config = dit_config_to_diffusers(model.config)
    config[KINDJAX_KEY].update({
        "method": run.config.model.linear.kind,
        "classes": _class_rows(run, model.classes),
        "source": {"path": run.path, "checkpoint": run.source.checkpoint, "step": run.source.step,
                   "item": run.source.item},
        "config_fingerprint": run.fingerprint,
        "kindjax_version": kindjax_version(),
    })
    from safetensors.numpy import save

    state = dit_params_to_diffusers(model.params, model.config)
    write_bytes(out / DIFFUSERS_WEIGHTS, save(state, metadata={"format": "pt"}))
    write_json(out / "config.json", config)
    write_bytes(out / MODEL_CARD, diffusers_card(run, model, config, name).encode())
    return config


def learngene_card(run: Run, files: dict[str, dict], tailor_classes: Sequence[int]) -> dict[str, Any]:
    """The ``learngene.json`` card (module docstring) of ``run``'s learngene and the tailors of
    ``tailor_classes`` written as ``files``."""
    m, config = run.config.model, run.config
    dims = resolve_dims(m)
    return {
        "format": CARD_FORMAT, "format_version": CARD_VERSION, "kindjax_version": kindjax_version(),
        "model": {"method": "kind", "formulation": kind_formulation(m.linear), "arch": m.arch or None,
                  "hidden_size": dims.hidden_size, "depth": dims.depth, "num_heads": dims.num_heads,
                  "mlp_ratio": m.mlp_ratio, "patch_size": m.patch_size, "image_size": m.image_size,
                  "in_channels": m.in_channels, "learn_sigma": m.learn_sigma,
                  "n_learngene": m.linear.n_learngene, "n_tailor": m.linear.n_tailor, "num_classes": m.num_classes},
        "classes": [{"label": c, "name": run.names[c] if run.names else None} for c in range(m.num_classes)],
        "tailor_classes": [int(c) for c in tailor_classes],
        "training": {"data": checkpoints.config_json(config)["data"], "steps": run.source.step,
                     "batch_size": config.train.batch_size, "lr": config.optim.lr,
                     "weights": run.source.item, "fingerprint": run.fingerprint, "metrics": run.metrics},
        "step": run.source.step,
        "source": {"path": run.path, "checkpoint": run.source.checkpoint, "item": run.source.item},
        "files": files,
        "config": checkpoints.config_json(config),
    }


def export_safetensors(run: Run, out: epath.Path, name: str, classes: Sequence[int] | None, step: int | None,
                       ema: bool) -> dict[str, Any]:
    """Writes ``run``'s learngene (and the tailors of ``classes``) and its card into ``out`` (to be moved to
    ``name``); returns the card."""
    kind = run.config.model.linear.kind
    if kind != "kind":
        raise ValueError(f"{run.path} holds a {kind!r} DiT (model.linear.kind={kind!r}), not a KIND one: it has no "
                         f"learngene to write; export its model with --format diffusers")
    tailors = load_tailors(run.path, classes, step=step, ema=ema) if classes is not None else None
    learngene = load_learngene(run.path, step=step, ema=ema)
    files = {tensorfiles.part_file("learngene"): tensorfiles.write_part(out, "learngene", learngene.params)}
    if tailors is not None:
        files[tensorfiles.part_file("tailors")] = tensorfiles.write_part(out, "tailors", tailors.params)
    card = learngene_card(run, files, tailors.classes if tailors is not None else ())
    write_bytes(out / MODEL_CARD, learngene_readme(run, card, name).encode())
    write_json(out / tensorfiles.CARD, card)
    return card


def export(workdir: str, out: str, format: str, classes: Sequence[int] | None = None, *,
           step: int | None = None, ema: bool = True, force: bool = False) -> dict[str, Any]:
    """Exports the run at ``workdir`` to ``out`` in ``format`` (:data:`FORMATS`; module docstring);
    returns what it wrote (the diffusers ``config.json``, or the ``learngene.json`` card)."""
    if format not in FORMATS:
        raise ValueError(f"--format={format!r}: use one of {FORMATS}")
    run = open_run(workdir, step, ema)
    write = export_diffusers if format == "diffusers" else export_safetensors
    with staged(out, force) as stage:
        return write(run, stage, str(out), classes, step, ema)


# ----------------------------------------------------------------------------------------------- model cards

def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _figure(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _training_lines(run: Run) -> list[str]:
    c = run.config
    data = c.data
    what = f"`{data.name}`" + (f" (latents of `{data.latents}`)" if data.latents else "") + \
        (f", root `{data.root}`" if data.root else "") + (f", grouping `{data.grouping}`" if data.grouping else "") + \
        (f", task `{data.task}`" if data.task else "") + (f", classes {list(data.classes)}" if data.classes else "")
    lines = [f"- data: {what}",
             f"- {run.source.step:,} steps, batch size {c.train.batch_size}, AdamW lr {c.optim.lr:g}; "
             f"{'EMA' if run.source.item == 'ema_params' else 'raw (not EMA)'} weights"
             + (f" (decay {c.train.ema_decay:g})" if run.source.item == "ema_params" else ""),
             f"- checkpoint: `{run.source.checkpoint}`",
             f"- config fingerprint: `{run.fingerprint or 'unknown (a sliced checkpoint)'}`",
             f"- exported with kindjax {kindjax_version()}"]
    figures = [(k, _figure(v)) for k, v in run.metrics.items() if k != "step"]
    if figures:
        lines += ["", f"Figures of its `metrics.json` (step {run.source.step}):", ""]
        lines += _table(figures, ("metric", "value"))
    else:
        lines += ["", "No figures of this step were found (`metrics.json` beside the checkpoint: none, of another "
                  "step, or a run without an evaluator)."]
    return lines


def _is_latent(config: ml_collections.ConfigDict) -> bool:
    """A model of SD-VAE latents (ImageNet is trained on its latents only), not of pixels."""
    return bool(config.data.latents) or config.data.name in ("latents", "imagenet")


def pipeline_snippet(out: str, config: ml_collections.ConfigDict, labels: Sequence[int]) -> str:
    """Python that samples ``labels`` from the exported directory ``out`` with diffusers' ``DiTPipeline``
    (its linear β schedule; a latent model decoded by its VAE, a pixel model by the identity)."""
    d = config.diffusion
    scheduler = (f"DPMSolverMultistepScheduler(num_train_timesteps={d.num_timesteps}, beta_start={d.beta_start:g}, "
                 f"beta_end={d.beta_end:g}, beta_schedule=\"linear\")")
    call = (f"pipe(class_labels={list(labels)}, num_inference_steps=25, guidance_scale={config.sample.cfg_scale:g}"
            + ("" if _is_latent(config) else ", output_type=\"np\"") + ").images")
    if _is_latent(config):
        vae = config.vae.weights or "stabilityai/sd-vae-ft-ema"
        return "\n".join([
            "from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler",
            f"transformer = DiTTransformer2DModel.from_pretrained({out!r})",
            f"scheduler = {scheduler}",
            f"pipe = DiTPipeline(transformer, AutoencoderKL.from_pretrained({vae!r}), scheduler)",
            f"images = {call}"])
    return "\n".join([
        "import types, torch",
        "from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler",
        "",
        "class Pixels(torch.nn.Module):  # a pixel-space model: DiTPipeline's VAE decode is the identity",
        "    config, device, dtype = types.SimpleNamespace(scaling_factor=1.0), torch.device(\"cpu\"), torch.float32",
        "    def decode(self, x): return types.SimpleNamespace(sample=x)",
        "",
        f"transformer = DiTTransformer2DModel.from_pretrained({out!r})",
        f"scheduler = {scheduler}",
        "pipe = DiTPipeline(transformer, Pixels(), scheduler)",
        f"images = {call}"])


def _vae_note(config: ml_collections.ConfigDict) -> str:
    if not _is_latent(config):
        return ("The model was trained on pixels in [-1, 1] (no VAE): `Pixels` stands in for DiTPipeline's VAE, "
                "and DiTPipeline maps the samples to [0, 1].")
    used = f"`{config.vae.weights}`" if config.vae.weights else "the VAE that encoded the training latents"
    return (f"Pair it with {used}: the latents were encoded with it and scaled by {config.vae.scale:g}. DiTPipeline "
            f"divides by the VAE's `config.scaling_factor`, which must be {config.vae.scale:g} (the SD VAEs "
            f"`stabilityai/sd-vae-ft-ema` and `-mse`, which DiT used, have 0.18215).")


def diffusers_card(run: Run, model: DenseModel, config: Mapping[str, Any], name: str) -> str:
    """The ``README.md`` of a diffusers export."""
    m = model.config.model
    dims = resolve_dims(m)
    params = param_rules.count(model.params)
    k = m.num_classes
    labels = list(range(min(k, 4)))
    rows = [(c["label"], c["run_label"], c["name"] or "unknown") for c in config[KINDJAX_KEY]["classes"]]
    method = {"kind": "KIND", "fine": "FINE", "dense": "dense"}[run.config.model.linear.kind]
    lines = [f"# {as_path(name).name}: a {method} DiT for {k} class{'es' if k > 1 else ''}, exported from kindjax", "",
             f"A diffusers `DiTTransformer2DModel` ({dims.depth} blocks, width {dims.hidden_size}, {dims.num_heads} "
             f"heads, patch {m.patch_size}, input {m.image_size}×{m.image_size}×{m.in_channels}, "
             f"{'ε and learned variance' if m.learn_sigma else 'ε'} out; {params:,} parameters): "
             f"{model.description}.", ""]
    if model.caveat:
        lines += [f"**Note.** {model.caveat}", ""]
    lines += ["## Classes", "", f"Label `i` of this model is label `run_label` of the run; label {PIPELINE_NULL} "
              f"(DiTPipeline's) and every unused label up to it are the null class.", ""]
    lines += _table(rows, ("label", "run_label", "name")) + [""]
    lines += ["## Training", ""] + _training_lines(run) + [""]
    lines += ["## Sample with diffusers", "", "```python", pipeline_snippet(name, model.config, labels), "```", "",
              _vae_note(model.config), ""]
    lines += ["## Back into kindjax", "", "```", f"python -m kindjax.tools.convert --src {name} --config CONFIG "
              f"--workdir WORKDIR", "```", "", "gives back these parameters (the label table without its padding)."]
    return "\n".join(lines) + "\n"


def learngene_readme(run: Run, card: Mapping[str, Any], name: str) -> str:
    """The ``README.md`` of a safetensors export."""
    m = card["model"]
    tailors = card["tailor_classes"]
    names = {c["label"]: c["name"] or "unknown" for c in card["classes"]}
    lines = [f"# {as_path(name).name}: a KIND learngene" + (f" and {len(tailors)} tailors" if tailors else "")
             + ", exported from kindjax", "",
             f"The class-agnostic part (learngene) of a KIND DiT ({m['depth']} blocks, width {m['hidden_size']}, "
             f"{m['num_heads']} heads, patch {m['patch_size']}, input {m['image_size']}×{m['image_size']}×"
             f"{m['in_channels']}) pre-trained on {m['num_classes']} classes: each of its six matrices per block "
             f"keeps N_G = {m['n_learngene']} singular components (U, σ, V), plus every other class-agnostic "
             f"parameter and the null row of the label table."
             + (f" `tailors.safetensors` holds the class-specific parts (N_T = {m['n_tailor']} components per "
                f"matrix) of classes {tailors}." if tailors else ""), ""]
    lines += ["## Files", ""] + _table([(f, e["sha256"], f"{e['parameters']:,}") for f, e in card["files"].items()],
                                       ("file", "SHA-256", "parameters"))
    lines += ["", "`learngene.json` records the model, the classes, the training and the full config; the loaders "
              "check each file's SHA-256 against it before reading.", ""]
    lines += ["## Pre-training classes", ""] + _table([(c, names[c]) for c in range(m["num_classes"])],
                                                       ("label", "name")) + [""]
    lines += ["## Training", ""] + _training_lines(run) + [""]
    use = ["import kindjax", "", f"learngene = kindjax.load_learngene({name!r})"]
    if tailors:
        use += [f"model = kindjax.assemble(learngene, kindjax.load_tailors({name!r}, {tailors[:2]}))"]
    lines += ["## Use it", "", "```python"] + use + ["```", "",
              f"Transfer it to new classes with fresh tailors: `--config.init.learngene={name} "
              f"--config.train.freeze_learngene=True` (README: KIND transfer). Any safetensors reader "
              f"(`safetensors.torch.load_file`) opens the files; keys are parameter paths."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    written = export(f.run, f.out, f.format, f.classes, step=f.step, ema=f.ema, force=f.force)
    if f.format == "diffusers":
        rows = written[KINDJAX_KEY]["classes"]
        print(f"Wrote a diffusers DiTTransformer2DModel ({written['num_layers']} blocks, {len(rows)} classes: "
              f"{[r['name'] or r['run_label'] for r in rows]}) to {f.out}; sampling code in {f.out}/{MODEL_CARD}")
    else:
        sizes = ", ".join(f"{name} {entry['parameters']:,} parameters" for name, entry in written["files"].items())
        print(f"Wrote {sizes} and {tensorfiles.CARD} to {f.out}; load with kindjax.load_learngene({f.out!r})")


if __name__ == "__main__":
    flags.DEFINE_string("run", None, "Training workdir (read), one of its step directories, a sliced or an "
                        "exported checkpoint.")
    flags.DEFINE_enum("format", None, FORMATS, "diffusers: a DiTTransformer2DModel directory; safetensors: the "
                      "KIND learngene (and tailors) with a learngene.json card.")
    flags.DEFINE_string("out", None, "Directory to write (must not exist, unless --force).")
    cli.define_classes("Class ids of the run, e.g. 0,3,7: the KIND tailors to keep (diffusers: default all; "
                       "safetensors: default none, the learngene alone).")
    flags.DEFINE_integer("step", None, "Step of the run (default: the latest).")
    flags.DEFINE_boolean("ema", True, "Read the EMA weights; --noema reads the raw weights.")
    flags.DEFINE_boolean("force", False, "Replace an earlier export at --out.")
    flags.mark_flags_as_required(["run", "format", "out"])
    cli.run(main)
