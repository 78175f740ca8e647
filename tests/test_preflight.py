"""The pre-flight compiles the trainer's real step for TPU slices on this CPU host (libtpu's
compile-only devices, XLA:TPU's compiler), and what it reads from the compiled program is checked
on the program itself: the splash kernel's Mosaic custom call, the memory analysis, the dtype of
every gradient reduction, and the absence of activation all-to-alls under FSDP.  Tiny DiTs (dense,
KIND, FINE): about four minutes in all, run serially."""
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kindjax
from conftest import ROOT
from kindjax import sharding
from kindjax.config import base_config
from kindjax.models import attention
from kindjax.models.dit import abstract_params
from kindjax.tools import preflight
from kindjax.tools.bench_accelerator import forward_flops
from kindjax.train.trainer import Trainer, train_step

LINEARS = {"dense": dict(kind="dense"), "kind": dict(kind="kind", n_learngene=108, n_tailor=2),
           "fine": dict(kind="fine", rank=40)}


def tiny(linear: str = "dense", **model) -> "ml_collections.ConfigDict":  # noqa: F821
    """A two-block 128-wide bf16 DiT on 8×8×4 latents with splash attention, batch 16."""
    config = base_config()
    config.model.update({**dict(hidden_size=128, depth=2, num_heads=2, image_size=8, in_channels=4, dtype="bfloat16",
                                attention="pallas"), **model})
    config.model.linear.update(LINEARS[linear])
    config.train.batch_size = 16
    return config


def param_bytes(config) -> int:
    config = config.copy_and_resolve_references()
    config.mesh.update(data=-1, fsdp=1)
    trainer = Trainer(config, "", devices=jax.devices()[:1], dataset=preflight.ShapesOnly(config.model.num_classes))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trainer.abstract_state["params"]))


def check_gradients_reduce_in_f32(result: dict, config) -> None:
    """Every reduction is f32 (no bf16 partial sum crosses a chip), and the f32 reductions carry at
    least every parameter's gradient (an FSDP-sharded one reduce-scattered: its 1/fsdp per chip)."""
    reductions = {op: result["collectives"].get(op, {}) for op in ("all-reduce", "reduce-scatter")}
    assert {dtype for by_dtype in reductions.values() for dtype in by_dtype} <= {"f32", "s32"}, reductions
    scattered = reductions["reduce-scatter"].get("f32", {"bytes": 0})["bytes"] * result["mesh"]["fsdp"]
    assert reductions["all-reduce"]["f32"]["bytes"] + scattered >= param_bytes(config)


def test_dense_step_compiles_for_v5p_8_with_splash_and_prints_the_json_last():
    overrides = dict(depth=2, num_heads=2, dtype="bfloat16", attention="pallas")   # the digits DiT, 128 wide
    command = [sys.executable, "-m", "kindjax.tools.preflight", "--config", os.path.join(ROOT, "configs/dit_digits.py"),
               "--topology", "v5p-8", "--batch", "16", *[f"--config.model.{k}={v}" for k, v in overrides.items()]]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=""))   # the module picks the CPU itself
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["compiled"] and result["error"] is None and result["fits"]
    assert (result["topology"], result["chips"], result["mesh"]) == ("v5p-8", 4, {"data": 4, "fsdp": 1})
    assert result["attention"] == "splash"
    memory = result["memory_gib_per_chip"]
    assert memory["argument"] > 0 and memory["temp"] > 0 and memory["peak"] >= memory["argument"]
    assert result["hbm_gib_per_chip"] == 95
    assert result["gflop_per_image"] >= result["analytic_gflop_per_image"] > 0
    assert result["roofline_images_per_s"] == pytest.approx(16 / result["roofline_step_s"], rel=1e-3)
    assert "splash" in run.stdout and "fits" in run.stdout   # the human summary before the JSON
    from configs.dit_digits import get_config

    config = get_config()
    config.model.update(overrides)
    check_gradients_reduce_in_f32(result, config)


def all_reducing(linear: str) -> "ml_collections.ConfigDict":  # noqa: F821
    """:func:`tiny` with every gradient all-reduced (``train.class_row_reduce``; the gathered rows: below)."""
    config = tiny(linear)
    config.train.class_row_reduce = "all_reduce"
    return config


@functools.cache
def all_reducing_preflight(linear: str) -> dict:
    """The pre-flight of :func:`all_reducing`, compiled once for the tests of the ``all_reducing`` group."""
    return preflight.preflight(all_reducing(linear), "v5p-8", advise=False)


@pytest.mark.xdist_group("all_reducing")
@pytest.mark.parametrize("linear", ["kind", "fine"])
def test_kind_and_fine_steps_compile_with_splash_and_f32_gradients(linear):
    config = all_reducing(linear)
    result = all_reducing_preflight(linear)
    assert result["compiled"] and result["fits"] and result["attention"] == "splash", result["error"]
    assert result["memory_gib_per_chip"]["temp"] > 0
    check_gradients_reduce_in_f32(result, config)


@pytest.mark.xdist_group("all_reducing")
def test_a_class_gated_step_gathers_the_labelled_tailor_rows_instead_of_all_reducing_the_tailors():
    """KIND's tailors (and the label table) on v5p-8, 16 images on 4 chips, 10 classes: each chip sends the
    f32 rows of its own 4 labels (16 rows in all arrive, ``(S−1)·B_s`` = 12 from the others) where the
    all-reduce moved every row of every class-row leaf; the other gradients are all-reduced in f32 as before."""
    from kindjax import params as param_rules

    config = tiny("kind")
    config.train.class_row_reduce = "gather"
    found = {"gather": preflight.preflight(config, "v5p-8", advise=False)["collectives"],
             "all_reduce": all_reducing_preflight("kind")["collectives"]}
    trainer = Trainer(config, "", devices=jax.devices()[:1], dataset=preflight.ShapesOnly(config.model.num_classes))
    class_rows = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.abstract_state["params"])
                  if param_rules.has_class_rows(path)]
    whole = sum(4 * leaf.size for leaf in class_rows)
    rows = sum(4 * leaf.size // leaf.shape[0] for leaf in class_rows)
    assert found["gather"]["all-gather"]["f32"]["bytes"] == 16 * rows
    assert "all-gather" not in found["all_reduce"]
    assert found["all_reduce"]["all-reduce"]["f32"]["bytes"] - found["gather"]["all-reduce"]["f32"]["bytes"] == whole


def test_compare_dense_sets_the_step_beside_the_dense_dits():
    result = preflight.compare_dense(tiny("kind"), "v5p-8")
    dense = result["dense"]
    assert result["compiled"] and dense["compiled"] and dense["linear"] == "dense" and result["linear"] == "kind"
    assert (dense["batch"], dense["mesh"], dense["model"]) == (result["batch"], result["mesh"], result["model"])
    ratios = result["kind_over_dense"]
    assert ratios["roofline_step"] == pytest.approx(result["roofline_step_s"] / dense["roofline_step_s"], rel=1e-3)
    assert ratios["hbm_bytes"] == pytest.approx(result["hbm_gib_per_step"] / dense["hbm_gib_per_step"], rel=1e-3)
    assert ratios["xla_bytes_accessed"] == pytest.approx(
        result["xla_bytes_accessed_gib"] / dense["xla_bytes_accessed_gib"], rel=1e-3)
    peak = preflight.peak_flops(preflight.topology_devices("v5p-8")[0])
    for r in (result, dense):   # the roofline's bytes are the HBM traffic, not XLA's bytes accessed
        images_per_chip = r["batch"] / r["chips"]
        compute_bound = max(r["gflop_per_image"], r["analytic_gflop_per_image"]) * 1e9 * images_per_chip / peak
        memory_bound = r["hbm_gib_per_step"] * preflight.GIB / preflight.CHIPS["TPU v5"].hbm_bytes_per_s
        assert r["roofline_step_s"] == pytest.approx(max(compute_bound, memory_bound), rel=2e-3)
        assert r["xla_bytes_accessed_gib"] > r["hbm_gib_per_step"]
    assert ratios["flops"] == pytest.approx(result["gflop_per_image"] / dense["gflop_per_image"], rel=1e-3)
    assert result["xla_estimated_mcycles"] > 0 and dense["xla_estimated_mcycles"] > 0
    assert ratios["xla_estimated_cycles"] == pytest.approx(
        result["xla_estimated_mcycles"] / dense["xla_estimated_mcycles"], rel=1e-3)
    assert preflight.estimated_mcycles('%f = f32[2] fusion(%a), backend_config={"estimated_cycles":"1500000"}\n'
                                       '%g = f32[2] fusion(%f), backend_config={"estimated_cycles":"500000"}') == 2.0
    assert preflight.estimated_mcycles("%f = f32[2] fusion(%a)") is None
    # Where the cycles go: every cycle under one source, the tailors' products in KIND's alone.
    for r in (result, dense):
        assert sum(r["xla_mcycles_by_source"].values()) == pytest.approx(r["xla_estimated_mcycles"], abs=1e-3)
    tailor_products = [s for s in result["xla_mcycles_by_source"] if "bik->" in s or "bok->" in s]
    assert tailor_products and not [s for s in dense["xla_mcycles_by_source"] if "bik->" in s or "bok->" in s]
    excess = result["mcycles_over_dense_by_source"]
    assert 0 < len(excess) <= preflight.SOURCES_LOGGED and set(tailor_products) & set(excess)
    for source, mcycles in excess.items():
        want = result["xla_mcycles_by_source"].get(source, 0) - dense["xla_mcycles_by_source"].get(source, 0)
        assert mcycles == pytest.approx(want, abs=1e-3)
    # Where the HBM bytes go: every byte under one source and one phase; the tailors' products in KIND's alone.
    for r in (result, dense):
        assert sum(r["hbm_gib_by_source"].values()) == pytest.approx(r["hbm_gib_per_step"], rel=1e-3)
        assert sum(r["hbm_gib_by_phase"].values()) == pytest.approx(r["hbm_gib_per_step"], rel=1e-3)
        assert min(r["hbm_gib_by_phase"].values()) > 0
    assert [s for s in result["hbm_gib_by_source"] if "bik->" in s]
    assert not [s for s in dense["hbm_gib_by_source"] if "bik->" in s]
    for source, gib in result["hbm_gib_over_dense_by_source"].items():
        want = result["hbm_gib_by_source"].get(source, 0) - dense["hbm_gib_by_source"].get(source, 0)
        assert gib == pytest.approx(want, abs=1e-3)


def test_cycles_are_summed_by_the_jax_operation_they_come_from():
    hlo = "\n".join([
        '  %f.1 = bf16[8]{0} fusion(%a), metadata={op_name="jit(train_step)/shard_map/jvp(DiT)/block_0/q/dot_general"'
        ' stack_frame_id=3}, backend_config={"estimated_cycles":"1000000"}',
        '  %f.2 = bf16[8]{0} fusion(%b), metadata={op_name="jit(train_step)/shard_map/jvp(DiT)/block_11/q/dot_general"}'
        ', backend_config={"estimated_cycles":"500000"}',
        '  %c.3 = (bf16[8]{0}, f32[2]{0}) fusion(%c), metadata={op_name="jit(train_step)/convert.17"}, '
        'backend_config={"estimated_cycles":"250000"}',
        '  %copy.4 = bf16[8]{0:T(8)} copy(%f.1), backend_config={"estimated_cycles":"2000000"}',
        '  %g = bf16[8]{0} add(%f.1, %f.2)'])
    assert preflight.cycles_by_source(hlo) == {"copy": 2.0, "jvp(DiT)/block_*/q/dot_general": 1.5, "convert": 0.25}
    assert preflight.cycles_by_source("%g = bf16[8]{0} add(%f, %f)") == {}
    assert preflight.excess_over({"a": 1.0, "b": 3.0}, {"a": 2.5, "c": 0.5}) == {"b": 3.0, "a": -1.5, "c": -0.5}


def test_the_fused_kind_step_compiles_its_kernels_for_v5p_8():
    """``formulation="fused"`` lowers to Mosaic kernels that XLA:TPU compiles: a forward and a backward
    kernel for each of the six matrices of both blocks, beside splash's, and ``"fused_mlp"`` to its four
    kernels per block, on the data-parallel mesh; their cost estimates enter XLA's
    cost analysis (the backward kernel recomputes ``h``: more FLOPs than the grouped step's products)."""
    devices, flops = preflight.topology_devices("v5p-8"), {}
    # fused: a forward and a backward kernel per matrix; fused_mlp: two of each per block's MLP half.
    for formulation, expected in (("fused", 2 * 6 * 2), ("grouped", 0), ("fused_mlp", 4 * 2)):
        config = tiny("kind")
        config.model.linear.formulation = formulation
        compiled, _, _ = preflight.compile_step(config, devices)
        kernels = [line for line in compiled.as_text().splitlines()
                   if 'custom_call_target="tpu_custom_call"' in line and not re.match(r"^\s*(?:ROOT\s+)?%splash", line)]
        assert len(kernels) == expected, formulation
        flops[formulation] = compiled.cost_analysis()["flops"]
    assert flops["grouped"] < flops["fused"] < 1.5 * flops["grouped"]
    assert flops["grouped"] < flops["fused_mlp"] < 1.5 * flops["grouped"]   # the MLP kernels' estimates counted too
    # The analytic count traces the model for the host: the kernels' layers count as their XLA twins'.
    counted = {}
    for formulation in ("fused", "grouped", "fused_mlp"):
        config = tiny("kind")
        config.model.linear.formulation = formulation
        model = kindjax.build_model(config.model)
        counted[formulation] = forward_flops(model, abstract_params(model), 16)
    assert counted["fused"] == counted["fused_mlp"] == counted["grouped"] > 0
    # --layers compiles a layer alone on a one-chip mesh, where the kernel (not its interpreter) lowers:
    # XLA counts its products, forward 2·rows·K·(d_in + d_out) and backward 2·rows·K·(3·d_in + 2·d_out).
    config = tiny("kind")
    config.model.linear.formulation = "fused"
    rows, k, d = 16 // 4 * 16, 128, 128    # 4 images per chip of 16 tokens; K = 108 + 4·2 + 1 padded to 128
    q = preflight.layer_costs(config, "v5p-8")["model"]["q"]
    assert 2 * rows * k * (2 * d + 5 * d) <= q["gflop"] * 1e9 <= 1.2 * 2 * rows * k * (2 * d + 5 * d)


@pytest.mark.parametrize("formulation", ["fused", "fused_mlp"])
def test_fused_kind_refuses_a_token_count_a_tpu_cannot_tile_in_one_line(formulation):
    config = tiny("kind", image_size=6)     # 3 × 3 = 9 tokens per image
    config.model.linear.formulation = formulation
    result = preflight.preflight(config, "v5p-8", advise=False)
    assert not result["compiled"] and f"formulation='{formulation}' runs one sample's 9 tokens" in result["error"]
    assert "use formulation='grouped'" in result["error"]


def test_layers_compile_each_matrix_alone_beside_the_dense_ones():
    """``--layers``: each of a block's six matrices, forward and backward on one chip's 4 images of 16 tokens;
    the dense ones' FLOPs are the three products' ``3 · 2·rows·d_in·d_out`` (plus the bias work)."""
    found = preflight.layer_costs(tiny("kind"), "v5p-8")
    shapes = {"q": (128, 128), "k": (128, 128), "v": (128, 128), "attn_out": (128, 128), "mlp_in": (128, 512),
              "mlp_out": (512, 128)}
    assert set(found) == {"model", "dense"} and all(set(found[n]) == set(shapes) for n in found)
    for role, (d_in, d_out) in shapes.items():
        assert found["dense"][role]["gflop"] * 1e9 == pytest.approx(3 * 2 * 4 * 16 * d_in * d_out, rel=0.05)
        for name in found:
            figures = found[name][role]
            assert figures["mib"] > 0 and figures["mcycles"] > 0 and figures["roofline_us"] > 0
    assert found["model"]["q"]["mib"] > found["dense"]["q"]["mib"]   # the tailors' passes over the activations


@pytest.mark.parametrize("every_axis", [True, False])
def test_splash_on_a_mesh_with_a_size_one_axis_needs_a_shard_map_manual_over_every_axis(monkeypatch, every_axis):
    """Outside the train step's data-parallel region (sampling, evaluation) splash runs under XLA's
    automatic partitioning on the (data 4, fsdp 1) mesh of v5p-8: it compiles, as the Mosaic kernel,
    when its shard_map is manual over every axis; leaving the size-1 ``fsdp`` axis automatic (as
    before the fix) is refused by the Mosaic lowering."""
    if not every_axis:
        real = attention.splash_mesh

        def without_size_one_axes(x):
            mesh, free, batch = real(x)
            return mesh, tuple(a for a in free if mesh.shape[a] > 1), tuple(a for a in batch if mesh.shape[a] > 1)

        monkeypatch.setattr(attention, "splash_mesh", without_size_one_axes)
    mesh = Mesh(np.array(preflight.topology_devices("v5p-8")).reshape(4, 1), ("data", "fsdp"))
    q = jax.ShapeDtypeStruct((8, 16, 2, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    attend = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, "pallas"))
    if every_axis:
        assert preflight.attention_lowered(attend.lower(q, q, q).compile().as_text()) == "splash"
    else:
        with pytest.raises(NotImplementedError, match="Mosaic kernels cannot be automatically partitioned"):
            attend.lower(q, q, q).compile()


def test_fsdp_on_v5p_64_has_no_all_to_all_and_the_automatic_step_had_some():
    config = tiny(hidden_size=256, attention="xla")
    config.mesh.fsdp = 4
    config.train.batch_size = 64
    result = preflight.preflight(config, "v5p-64", advise=False)
    assert result["compiled"] and result["mesh"] == {"data": 8, "fsdp": 4}
    ops = result["collectives"]
    assert "all-to-all" not in ops and "ragged-all-to-all" not in ops, ops
    assert ops["reduce-scatter"]["f32"]["count"] > 0 and ops["all-gather"]   # FSDP: gathered, reduce-scattered
    check_gradients_reduce_in_f32(result, config)
    # The same step left to XLA's automatic partitioning (no data-parallel shard_map) reshards
    # activations with all-to-alls and reduces bf16 partial gradients: what the check above excludes.
    devices = preflight.topology_devices("v5p-64")
    trainer = Trainer(config, "", devices=devices, dataset=preflight.ShapesOnly(config.model.num_classes))
    step = functools.partial(train_step, model=trainer.model, diffusion=trainer.diffusion, optimizer=trainer.optimizer,
                             config=config, base_key=trainer.base_key, mesh=None)
    automatic = jax.jit(step, in_shardings=(trainer.state_sharding, trainer.batch_sharding, None),
                        out_shardings=(trainer.state_sharding, sharding.replicated(trainer.mesh)), donate_argnums=0)
    hlo = automatic.lower(trainer.abstract_state, trainer.abstract_batch(), None).compile().as_text()
    old = preflight.collectives(hlo)
    assert old["all-to-all"] and "bf16" in old["all-reduce"]


def test_scanned_blocks_count_every_block():
    """XLA's cost analysis counts a scan body once; the pre-flight's FLOPs are the unrolled program's."""
    config = tiny(depth=3, scan_blocks=True, remat="dots_saveable")
    result = preflight.preflight(config, "v5p-8")
    assert result["compiled"] and result["flops_from"].startswith("compiled unrolled twin")
    assert result["gflop_per_image"] >= 0.95 * result["analytic_gflop_per_image"]


def test_the_abstract_batch_is_the_batch_the_loop_gives(tmp_path):
    from conftest import tiny_config
    from kindjax.train.trainer import Preemption

    trainer = Trainer(tiny_config(), str(tmp_path))
    preemption = Preemption()
    try:
        real = {**trainer.global_batch(0), **preemption.placed(trainer.place, trainer.config.train.batch_size)}
    finally:
        preemption.restore()
    abstract = trainer.abstract_batch()
    assert {k: (v.shape, v.dtype, v.sharding) for k, v in real.items()} == \
        {k: (v.shape, v.dtype, v.sharding) for k, v in abstract.items()}


def test_a_step_that_does_not_fit_gets_the_remat_or_the_batch_that_fits(monkeypatch):
    """The search itself, with a compiler that runs out of memory above 4 images per chip with
    block remat, above 2 without."""
    tried = []

    def fake_compile(config, devices):
        per_chip = config.train.batch_size // len(devices)
        tried.append((config.model.remat, per_chip))
        if per_chip > (4 if config.model.remat == "block" else 2):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
        return "compiled", None, 1.0

    monkeypatch.setattr(preflight, "compile_step", fake_compile)
    monkeypatch.setattr(preflight, "memory_gib", lambda compiled: {"peak": 1.0})
    config = tiny()
    config.train.batch_size = 64   # 16 per chip on v5p-8
    result = preflight.preflight(config, "v5p-8")
    assert not result["compiled"] and not result["fits"] and "RESOURCE_EXHAUSTED" in result["error"]
    assert tried == [("none", 16), ("dots_saveable", 16), ("block", 16), ("none", 8), ("none", 4), ("none", 2)]
    assert result["advice"] == {"train.batch_size": 8, "per_chip_batch": 2}
    tried.clear()
    config.train.batch_size = 16   # 4 per chip: block remat is enough
    assert preflight.preflight(config, "v5p-8")["advice"] == {"model.remat": "block"}


def test_cloud_tpu_accelerator_types_are_libtpu_topologies():
    parse = preflight.parse_topology
    assert parse("v5p-8") == preflight.Topology("v5:2x2x1", "megacore", (2, 2, 1))
    assert parse("v5p-64").name == "v5:2x4x4" and parse("v4-8").name == "v4:2x2x1"
    assert parse("v5p-128").wrap == (True, True, True) and parse("v5p-64").wrap == (False, False, False)
    assert parse("v5litepod-8") == parse("v5e-8") == preflight.Topology("v5e:2x4", "default", (2, 4, 1))
    assert parse("v6e-256").name == "v6e:16x16" and parse("2xv5p-8").slices == 2
    assert [len(preflight.topology_devices(name)) for name in preflight.TOPOLOGY_NAMES] == [4, 8, 4, 32, 8, 8]


def test_unknown_topology_and_teacher_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"--topology 'v9-8': give a Cloud TPU accelerator type such as v4-8"):
        preflight.topology_devices("v9-8")
    with pytest.raises(ValueError, match=r"no v5p slice has 12 TensorCores; sizes: \[8, 16, 32, 64, 128"):
        preflight.parse_topology("v5p-12")
    config = tiny()
    config.train.distill.teacher = "/some/run"
    result = preflight.preflight(config, "v5p-8")
    assert not result["compiled"] and "train.distill.teacher" in result["error"]


def test_collectives_are_counted_by_op_dtype_and_result_bytes():
    hlo = "\n".join([
        "  %all-reduce.1 = (f32[4,8]{1,0:T(8,128)}, bf16[16]{0}) all-reduce(%a, %b), channel_id=1",
        "  %ags = (bf16[2,8]{1,0}, bf16[8,8]{1,0}) all-gather-start(%c), dimensions={0}",
        "  %agd = bf16[8,8]{1,0} all-gather-done(%ags)",
        "  ROOT %rs = f32[2]{0} reduce-scatter(%d), dimensions={0}",
        "  %fusion = f32[4,8]{1,0} fusion(%all-reduce.1), kind=kLoop",
        '  %splash_mha_fwd.2 = bf16[2,4]{1,0} custom-call(%q), custom_call_target="tpu_custom_call"'])
    assert preflight.collectives(hlo) == {"all-reduce": {"f32": {"count": 1, "bytes": 128},
                                                         "bf16": {"count": 1, "bytes": 32}},
                                          "all-gather": {"bf16": {"count": 1, "bytes": 128}},
                                          "reduce-scatter": {"f32": {"count": 1, "bytes": 8}}}
    assert preflight.attention_lowered(hlo) == "splash"
    assert preflight.attention_lowered(hlo.replace("%splash_mha", "%other")) == "xla"
    assert np.isclose(preflight._significant(0.000123456), 0.0001235)


def test_hbm_traffic_counts_each_hbm_array_once_and_nothing_in_on_chip_memory():
    """Hand-counted: ``a`` (100×300 bf16, tiles of 8×128: 104×384) is prefetched into memory space 1 and read
    from there, ``b`` (304×256 padded) read from HBM, the 104×256 result written; a while body counts once,
    a fused computation's instructions not at all (the fusion counts its operands and result)."""
    hlo = "\n".join([
        "%fused (p: bf16[100,300]) -> bf16[100,200] {",
        "  ROOT %big = bf16[9999,9999]{1,0:T(8,128)(2,1)} broadcast(%p)",
        "}",
        "%body (t: (bf16[100,200])) -> (bf16[100,200]) {",
        "  %t = (bf16[100,200]{1,0:T(8,128)(2,1)}) parameter(0)",
        "  %e = bf16[100,200]{1,0:T(8,128)(2,1)} get-tuple-element(%t), index=0",
        "  %n = bf16[100,200]{1,0:T(8,128)(2,1)} fusion(%e), kind=kLoop, calls=%fused",
        "  ROOT %r = (bf16[100,200]{1,0:T(8,128)(2,1)}) tuple(%n)",
        "}",
        "ENTRY %main (a: bf16[100,300], b: bf16[300,200]) -> bf16[100,200] {",
        "  %a = bf16[100,300]{1,0:T(8,128)(2,1)} parameter(0)",
        "  %b = bf16[300,200]{1,0:T(8,128)(2,1)} parameter(1)",
        "  %copy-start = (bf16[100,300]{1,0:T(8,128)(2,1)S(1)}, bf16[100,300]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) "
        "copy-start(%a), cross_program_prefetch_index=0",
        "  %copy-done = bf16[100,300]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)",
        "  %f = bf16[100,200]{1,0:T(8,128)(2,1)} fusion(%copy-done, %b), kind=kOutput, calls=%fused",
        "  %w = (bf16[100,200]{1,0:T(8,128)(2,1)}) tuple(%f)",
        "  %loop = (bf16[100,200]{1,0:T(8,128)(2,1)}) while(%w), condition=%cond, body=%body",
        "  ROOT %out = bf16[100,200]{1,0:T(8,128)(2,1)} get-tuple-element(%loop), index=0",
        "}"])
    a, b, out = 104 * 384 * 2, 304 * 256 * 2, 104 * 256 * 2
    assert preflight.hbm_traffic(hlo) == a + b + out + 2 * out   # the body's fusion reads and writes one out
    assert preflight.hbm_traffic(hlo.replace("{1,0:T(8,128)(2,1)} parameter(1)", "{1,0:T(8,128)(2,1)S(1)} "
                                             "parameter(1)").replace("fusion(%copy-done, %b)", "fusion(%copy-done)")) \
        == a + 3 * out


def test_hbm_traffic_is_summed_by_source_and_phase():
    """Hand-counted: a backward fusion and the prefetch (no ``op_name``: under its operand's source) that brings
    its result on chip for a forward one; the optimizer's update and a copy of it (under the update's source);
    the sources named as :func:`cycles_by_source` names them."""
    meta = 'metadata={{op_name="jit(train_step)/shard_map/{}"}}'
    hlo = "\n".join([
        "ENTRY %main (a: bf16[100,300], b: bf16[300,200]) -> bf16[100,200] {",
        "  %a = bf16[128,256]{1,0:T(8,128)(2,1)} parameter(0)",
        "  %g = bf16[128,256]{1,0:T(8,128)(2,1)} fusion(%a), kind=kLoop, calls=%c, "
        + meta.format("transpose(jvp(DiT))/block_11/mlp_in/mul.3"),
        "  %copy-start = (bf16[128,256]{1,0:T(8,128)(2,1)S(1)}, bf16[128,256]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) "
        "copy-start(%g)",
        "  %copy-done = bf16[128,256]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)",
        "  %f = bf16[128,256]{1,0:T(8,128)(2,1)} fusion(%copy-done), kind=kOutput, calls=%c, "
        + meta.format("jvp(DiT)/block_2/q/dot_general"),
        "  %h = bf16[128,256]{1,0:T(8,128)(2,1)} fusion(%f, %a), kind=kLoop, calls=%c, "
        + meta.format("jit(_where)/select_n"),
        "  ROOT %out = bf16[128,256]{1,0:T(8,128)(2,1)} copy(%h)",
        "}"])
    array = 128 * 256 * 2 / preflight.GIB
    by_source = preflight.hbm_traffic_by_source(hlo)
    assert by_source == pytest.approx({"jit(_where)/select_n": 5 * array, "jvp(DiT)/block_*/q/dot_general": array,
                                       "transpose(jvp(DiT))/block_*/mlp_in/mul": 3 * array})
    assert list(by_source)[-1] == "jvp(DiT)/block_*/q/dot_general"   # largest first
    assert sum(by_source.values()) * preflight.GIB == pytest.approx(preflight.hbm_traffic(hlo))
    assert preflight.by_phase(by_source) == pytest.approx({"forward": array, "backward": 3 * array, "rest": 5 * array})


@pytest.mark.parametrize("rows", [16384, 4096])
def test_a_compiled_products_hbm_traffic_is_its_operands_and_result(rows):
    """``x·w`` compiled for one v5p chip moves ``x``, ``w`` and the product through HBM once each (the
    naive count); XLA's bytes accessed also counts the prefetch of ``x`` into on-chip memory and the
    product's reads from there."""
    devices = preflight.topology_devices("v5p-8")
    mesh = Mesh(devices[:1], ("data",))
    one_chip = NamedSharding(mesh, P())
    x, w = jax.ShapeDtypeStruct((rows, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
    with jax.set_mesh(mesh):
        compiled = jax.jit(jnp.dot, in_shardings=one_chip, out_shardings=one_chip).lower(x, w).compile()
    naive = 2 * (rows * 1024 + 1024 * 512 + rows * 512)
    assert preflight.hbm_traffic(compiled.as_text()) == naive
    assert float(compiled.cost_analysis()["bytes accessed"]) > naive


def test_the_grouped_layer_adding_its_residual_moves_fewer_hbm_bytes():
    """Summed in the grouped layout, ``residual + gate ⊙ out`` fuses into the product (forward and backward):
    compiled for one v5p chip, the grouped KIND layer that adds it moves fewer bytes through HBM than the same
    layer with the sum after it, which the reshape back to ``(B, T, d)`` keeps out of the product's fusion."""
    from kindjax.papers.kind.layer import KINDLinear

    devices = preflight.topology_devices("v5p-8")
    mesh = Mesh(devices[:1], ("data",))
    one_chip = NamedSharding(mesh, P())
    layer = KINDLinear(features=768, n_classes=10, n_tailor=2, n_learngene=96, formulation="grouped",
                       dtype=jnp.bfloat16)
    shape = jax.ShapeDtypeStruct
    x, y = shape((32, 256, 768), jnp.bfloat16), shape((32,), jnp.int32)
    residual, cotangent = shape((32, 256, 768), jnp.bfloat16), shape((32, 256, 768), jnp.bfloat16)
    gate = shape((32, 768), jnp.bfloat16)
    params = jax.eval_shape(layer.init, jax.random.key(0), x, y)

    def traffic(inside: bool) -> int:
        def step(p, xx, yy, r, g, ct):
            def forward(p, xx, r, g):
                if inside:
                    return layer.apply(p, xx, yy, residual=r, gate=g)
                return r + g[:, None] * layer.apply(p, xx, yy)
            out, pullback = jax.vjp(forward, p, xx, r, g)
            return out, pullback(ct)
        with jax.set_mesh(mesh):
            compiled = jax.jit(step, in_shardings=one_chip, out_shardings=one_chip).lower(
                params, x, y, residual, gate, cotangent).compile()
        return preflight.hbm_traffic(compiled.as_text())

    inside, outside = traffic(True), traffic(False)
    assert inside < 0.85 * outside, (inside, outside)   # 122 against 172 MiB with libtpu 0.0.42.1


def test_the_auto_formulation_is_the_grouped_one_for_a_tpu_and_the_gated_one_on_the_cpu():
    """``formulation="auto"`` (the ImageNet KIND configs') lowers to exactly the program of ``grouped`` for a v5p
    chip and of ``gated`` on this CPU host, and to neither's on the other platform."""
    from kindjax.papers.kind.layer import KINDLinear

    mesh = Mesh(preflight.topology_devices("v5p-8")[:1], ("data",))
    x, y = jax.ShapeDtypeStruct((32, 256, 768), jnp.bfloat16), jax.ShapeDtypeStruct((32,), jnp.int32)

    def program(formulation: str, tpu: bool) -> str:
        layer = KINDLinear(features=768, n_classes=10, n_tailor=2, n_learngene=96, formulation=formulation,
                           dtype=jnp.bfloat16)
        params = jax.eval_shape(layer.init, jax.random.key(0), x, y)
        if not tpu:
            return jax.jit(layer.apply).lower(params, x, y).as_text()
        one_chip = NamedSharding(mesh, P())
        with jax.set_mesh(mesh):
            return jax.jit(layer.apply, in_shardings=one_chip, out_shardings=one_chip).lower(params, x, y).as_text()

    for tpu, chosen, other in ((True, "grouped", "gated"), (False, "gated", "grouped")):
        auto = program("auto", tpu)
        assert auto == program(chosen, tpu) and auto != program(other, tpu), tpu


def test_h100_topology_compiles_with_cudnn_without_a_gpu():
    """Deviceless GPU compilation: JAX's CUDA plugin makes compile-only H100s from a target config.
    The plugin comes with the '.[cuda]' / '.[cuda13]' extras, not the test extras: skipped without it."""
    import importlib.util

    if not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
        pytest.skip("JAX's CUDA plugin is not installed (pip install -e '.[cuda]' or '.[cuda13]')")
    config = tiny(attention="auto")
    result = preflight.preflight(config, "h100-8")
    assert result["compiled"] and result["fits"] and result["chips"] == 8, result["error"]
    assert result["device_kind"] == "NVIDIA H100 80GB HBM3" and result["attention"] == "cudnn"
    assert result["memory_gib_per_chip"]["argument"] > 0 and result["gflop_per_image"] is None
    check_gradients_reduce_in_f32(result, config)
