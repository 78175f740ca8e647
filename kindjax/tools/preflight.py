"""Pre-flight: the real train step compiled for a TPU slice on any host, before the job is launched.

    python -m kindjax.tools.preflight --config configs/dit_xl.py --topology v5p-8 [--batch 256] [--config.KEY=VALUE ...]
    python -m kindjax.tools.preflight --config configs/kind_dit_l.py --compare_dense [--batch 256]
    python -m kindjax.tools.preflight --config configs/kind_dit_l.py --layers    (each matrix alone, beside dense)

libtpu's compile-only devices of ``--topology`` (a Cloud TPU accelerator type, :func:`parse_topology`;
``jax.experimental.topologies``)
stand in for the chips: :class:`kindjax.train.trainer.Trainer` builds its own mesh, shardings, donation
and step on them, the step is lowered on the trainer's abstract state and batch
(:meth:`~kindjax.train.trainer.Trainer.abstract_batch`) and compiled by the real XLA:TPU compiler, on
the CPU of this host.  Nothing runs.  From the compiled program, per chip: XLA's memory analysis
(``peak = argument + output − alias + temp + generated code``) against the chip's HBM; the FLOPs of XLA's
cost analysis (of the unrolled twin's compile when ``model.scan_blocks``, whose loop body XLA counts once)
against the analytic count (3 × the forward FLOPs of the unrolled model,
:func:`kindjax.tools.bench_accelerator.forward_flops`); the roofline ``max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth)``, the bytes being those the program moves to and from HBM (:func:`hbm_traffic`, also by the JAX
operation and the step's phase they come from, :func:`hbm_traffic_by_source`, :func:`by_phase`; XLA's own
bytes accessed, every memory space, beside them; compute and HBM only: collectives are listed, not timed);
every collective by op and dtype; the attention kernel that lowered; and XLA:TPU's estimated cycles, in
all and by the JAX operation they come from (:func:`cycles_by_source`: where the step's time goes).  A step
that does not fit is compiled again with more remat, then with half the batch per chip, until one fits (``--advise``).

The last line printed is :func:`preflight`'s dict as one JSON object; the exit status is 0 when the
step compiled and fits (with ``--layers``: when every matrix compiled), else 1.  Deviceless GPU compilation:
docs/pods.md ("Pre-flight").
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections

from kindjax.tools.bench_accelerator import forward_flops, out_of_memory, peak_flops
from kindjax.config import REMAT_POLICIES, ConfigError, validate
from kindjax.models.dit import abstract_params
from kindjax.train.trainer import Trainer

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's HBM per chip (GiB) and HBM bandwidth (bytes/s), from Cloud TPU's system
    architecture pages; the peak FLOP/s is :data:`kindjax.tools.bench_accelerator.PEAK_BF16_FLOPS`'s."""

    hbm_gib: float
    hbm_bytes_per_s: float


#: The share of a GPU's memory JAX may allocate (``XLA_PYTHON_CLIENT_MEM_FRACTION``, as launch/gpu_slurm.sh sets it).
GPU_MEMORY_FRACTION = 0.90
#: NVIDIA H100 SXM 80 GB (Hopper, compute capability 9.0) as XLA's GPU compiler reads a device: the
#: fields of ``stream_executor.GpuDeviceInfoProto`` (NVIDIA's H100 datasheet and CUDA device properties).
H100_SXM = {"threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": 228 * 1024, "threads_per_core_limit": 2048, "core_count": 132,
            "fpus_per_core": 128, "block_dim_limit_x": 2 ** 31 - 1, "block_dim_limit_y": 65535,
            "block_dim_limit_z": 65535, "memory_bandwidth": 3_352_320_000_000, "l2_cache_size": 50 * 2 ** 20,
            "clock_rate_ghz": 1.98, "device_memory_size": 81559 * 2 ** 20, "shared_memory_per_block_optin": 227 * 1024,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536}
#: ``--topology`` GPU prefix → (the device's name, its fields, compute capability).
GPU_TARGETS = {"h100": ("NVIDIA H100 80GB HBM3", H100_SXM, (9, 0))}

#: By ``jax.Device.device_kind`` of the compile-only devices.
CHIPS = {"TPU v4": Chip(32, 1.2e12), "TPU v5 lite": Chip(16, 8.19e11), "TPU v5": Chip(95, 2.765e12),
         "TPU v6 lite": Chip(32, 1.64e12),
         "NVIDIA H100 80GB HBM3": Chip(H100_SXM["device_memory_size"] * GPU_MEMORY_FRACTION / GIB,
                                       H100_SXM["memory_bandwidth"])}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice (or several, joined by DCN) as libtpu names it for ``get_topology_desc``."""

    name: str                   # libtpu's "<generation>:<chip grid>", e.g. "v5:2x2x1"
    chip_config: str            # "megacore" (v4, v5p: one device per chip) or "default"
    host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool] = (False, False, False)
    slices: int = 1


#: Cloud TPU accelerator type prefix → (libtpu's generation, chip config, TensorCores per chip, grid
#: rank): v4 and v5p count TensorCores in their names (two per chip, one megacore device) on a 3-D
#: torus; v5e ("v5litepod-N" on GCE) and v6e count chips on a 2-D grid.
GENERATIONS = {"v4": ("v4", "megacore", 2, 3), "v5p": ("v5", "megacore", 2, 3), "v5e": ("v5e", "default", 1, 2),
               "v5litepod": ("v5e", "default", 1, 2), "v6e": ("v6e", "default", 1, 2)}
#: Chips → chip grid of a slice (Cloud TPU's shapes: 3-D for v4/v5p, 2-D for v5e/v6e).
GRIDS = {3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)},
         2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}}
#: The ``--topology`` names the docs use (any Cloud TPU accelerator type parses, :func:`parse_topology`).
TOPOLOGY_NAMES = ("v4-8", "v5e-8", "v5p-8", "v5p-64", "v6e-8", "2xv5p-8")


def parse_topology(name: str) -> Topology:
    """A Cloud TPU accelerator type (``v4-8``, ``v5p-64``, ``v5litepod-8`` or ``v5e-8``, ``v6e-8``, …),
    optionally ``Kx`` for K slices joined by the data-centre network (``2xv5p-8``; set
    ``mesh.dcn_data=K``), as libtpu's topology: the chip grid, and wraparound links on a 3-D slice
    whose every side is at least 4 (a full torus)."""
    match = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name)
    generation = GENERATIONS.get(match[2]) if match else None
    if generation is None:
        raise ValueError(f"--topology {name!r}: give a Cloud TPU accelerator type such as {', '.join(TOPOLOGY_NAMES)} "
                         f"(generations {sorted(GENERATIONS)}; 'Kx' in front for K slices)")
    libtpu_name, chip_config, cores, rank = generation
    chips, rest = divmod(int(match[3]), cores)
    if rest or chips not in GRIDS[rank]:
        raise ValueError(f"--topology {name!r}: no {match[2]} slice has {match[3]} "
                         f"{'TensorCores' if cores == 2 else 'chips'}; sizes: "
                         f"{sorted(c * cores for c in GRIDS[rank])}")
    grid = GRIDS[rank][chips]
    wrap = (rank == 3 and min(grid) >= 4,) * 3
    host = (2, 4, 1) if rank == 2 and chips == 8 else (1, 1, 1) if chips == 1 else (2, 2, 1)
    return Topology(f"{libtpu_name}:{'x'.join(map(str, grid))}", chip_config, host, wrap, int(match[1] or 1))


#: ``model.remat`` → the settings that keep less for the backward pass, least recompute first.
LESS_KEPT = {"none": ("dots_saveable", "block"), "dots_saveable": ("block",), "block": ()}
assert set(LESS_KEPT) == set(REMAT_POLICIES)

#: Bytes per element of the HLO element types a collective may carry.
ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
                 "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                  "collective-permute")
# "%name = TYPE op(" for a collective; an asynchronous one is counted at its "-done" (its result is
# the collective's), not at its "-start" (whose result also holds the operands).
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVE_OPS)
                         + r")(?P<phase>-start|-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def gpu_target_config(name: str, info: dict[str, Any], capability: tuple[int, int]) -> str:
    """The text ``GpuTargetConfigProto`` that lets XLA compile for a GPU it does not see."""
    fields = "".join(f"  {key}: {value}\n" for key, value in info.items())
    return (f"gpu_device_info {{\n{fields}  cuda_compute_capability {{ major: {capability[0]} minor: {capability[1]} }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 patch: 0 }}\ndevice_description_str: "{name}"\n')


def gpu_devices(kind: str, count: int) -> list[jax.Device]:
    """``count`` compile-only GPUs (8 per host) of ``GPU_TARGETS[kind]``, through the CUDA PJRT plugin's
    ``target_config`` (kindjax's ``.[cuda]`` or ``.[cuda13]`` extra installed; no GPU nor driver needed)."""
    from jax.experimental import topologies

    name, info, capability = GPU_TARGETS[kind]
    if count % 8 and count > 8 or count < 1:
        raise ValueError(f"--topology {kind}-{count}: give 1 to 8 GPUs, or hosts of 8 ({kind}-16, {kind}-32, ...)")
    hosts, per_host = (count // 8, 8) if count >= 8 else (1, count)
    try:
        return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(name, info, capability),
                                                 topology=f"1x{hosts}x{per_host}").devices)
    except (NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"compiling for {kind} GPUs needs JAX's CUDA plugin on this host: pip install -e '.[cuda]' "
                          f"(or '.[cuda13]'); no GPU is needed ({_one_line(e)})") from None


def topology_devices(name: str) -> list[jax.Device]:
    """The compile-only devices of the slice ``name`` (:func:`parse_topology`; libtpu on this host, no
    TPU needed), or of ``h100-N`` (:func:`gpu_devices`)."""
    gpu = re.fullmatch(r"([a-z]\d+)-(\d+)", name)
    if gpu and gpu[1] in GPU_TARGETS:
        return gpu_devices(gpu[1], int(gpu[2]))
    t = parse_topology(name)
    # Compile-only devices open no chip: let this process load libtpu beside another that holds it (a
    # job on this TPU VM, another pre-flight), instead of failing on libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(
            topology_name=t.name, platform="tpu", chip_config_name=t.chip_config, chips_per_host_bounds=t.host_bounds,
            wrap=t.wrap, num_slices=t.slices).devices)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise ConfigError("the pre-flight compiles with libtpu: pip install 'libtpu==0.0.42.*' (or kindjax's "
                              "'.[tpu]' / '.[test]' extras)") from None
        raise


def collectives(hlo: str) -> dict[str, dict[str, dict[str, int]]]:
    """``{op: {dtype: {"count", "bytes"}}}`` of every collective of the compiled ``hlo`` text; bytes are
    each result's per chip (a tuple result counts each of its arrays under its own dtype).  A
    collective inside a ``while`` body (``model.scan_blocks``) is counted once, as XLA's cost analysis
    counts the body."""
    found: dict[str, dict[str, dict[str, int]]] = {}
    for line in hlo.splitlines():
        match = _COLLECTIVE.match(line)
        if match is None or match["phase"] == "-start":
            continue
        for dtype, dims in _ARRAY.findall(match["type"]):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            entry = found.setdefault(match["op"], {}).setdefault(dtype, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += size * ELEMENT_BYTES.get(dtype, 4)
    return found


# One instruction of a compiled HLO text: "%name = TYPE opcode(%operand, ...)".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>\S+)\s*=\s*(?P<type>.*?)\s(?P<op>[a-z][a-z0-9-]*)"
                          r"\((?P<operands>[^)]*)\)")
# An array with its layout, e.g. bf16[64,256,1024]{2,1,0:T(8,128)(2,1)S(1)}: minor-to-major dims, tiles, memory space.
_LAID_OUT = re.compile(_ARRAY.pattern + r"(?:\{([^}]*)\})?")
# Instructions that move no data themselves: names, views, and the halves of asynchronous pairs that
# complete a transfer counted at their "-start".
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id"}
# Computations a control instruction runs as a program (not fused): while bodies, branches, called computations.
_RUNS = re.compile(r"\b(?:body|condition|true_computation|false_computation|to_apply)=%([\w.-]+)"
                   r"|branch_computations=\{([^}]*)\}")


def _buffers(hlo_type: str) -> list[tuple[str, int, int]]:
    """``(array text, bytes, memory space)`` of each array of an HLO type: its dims padded to the
    layout's first tile (``T(8,128)``: the minor dim to a multiple of 128, the next to one of 8), and
    ``S(n)``'s ``n`` (0, HBM, when absent)."""
    found = []
    for match in _LAID_OUT.finditer(hlo_type):
        dtype, layout = match.group(1), match.group(3) or ""
        dims = [int(d) for d in filter(None, match.group(2).split(","))]
        order, _, rest = layout.partition(":")
        tile = re.match(r"T\(([\d,]+)\)", rest)
        space = re.search(r"S\((\d+)\)", rest)
        if dims and tile and order:
            minor_first = [int(d) for d in order.split(",")]
            for axis, size in zip(minor_first, reversed([int(t) for t in tile.group(1).split(",")])):
                dims[axis] = -(-dims[axis] // size) * size
        found.append((match.group(0), math.prod(dims) * ELEMENT_BYTES.get(dtype, 4),
                      int(space.group(1)) if space else 0))
    return found


def hbm_traffic(hlo: str) -> int:
    """Bytes read from and written to HBM (memory space 0) by the compiled ``hlo`` text's program, per chip:
    each instruction of the entry computation (and of a while body, a branch or a called computation, once)
    reads each of its operands and writes each of its results whole, tile padding included; what is in
    another memory space (``S(1)``: where XLA:TPU's memory-space assignment prefetches, the space a fusion's
    scoped VMEM is in) costs no HBM traffic there; a transfer (``copy-start``, any ``*-start``) counts once,
    for what it reads and the new arrays it writes, not at its ``*-done``.  XLA's own "bytes accessed" counts
    every memory space and both halves of a transfer."""
    return sum(size for _, size in _hbm_instructions(hlo))


def hbm_traffic_by_source(hlo: str) -> dict[str, float]:
    """:func:`hbm_traffic` in GiB, summed by the JAX operation each instruction comes from (:func:`_source` of
    its ``op_name``; an instruction XLA added without one, a prefetch or a copy, under its first operand's
    source, else its opcode), largest first; the values add up to :func:`hbm_traffic`."""
    found: dict[str, int] = {}
    for source, size in _hbm_instructions(hlo):
        found[source] = found.get(source, 0) + size
    return {k: v / GIB for k, v in sorted(found.items(), key=lambda kv: -kv[1]) if v}


#: The parts of a train step :func:`by_phase` splits a by-source figure into.
PHASES = ("forward", "backward", "rest")


def by_phase(by_source: dict[str, float]) -> dict[str, float]:
    """A by-source figure (:func:`hbm_traffic_by_source`, :func:`cycles_by_source`) summed over the step's
    :data:`PHASES`: the model's ``forward`` (sources under ``jvp(…)``), its ``backward`` (``transpose(jvp(…))``)
    and the ``rest``: the gradients' reduction, the optimizer and EMA update, the non-finite guard, and what
    has no source in the model (XLA's additions; the splash attention's kernels, named after the step)."""
    found = dict.fromkeys(PHASES, 0.0)
    for source, value in by_source.items():
        found["backward" if "transpose(jvp(" in source else "forward" if "jvp(" in source else "rest"] += value
    return found


def _source(op_name: str) -> str:
    """An ``op_name`` (JAX's name stack) as a source: the module path and primitive, ``jit(…)/`` and
    ``shard_map/`` dropped, block indices folded into ``*``, XLA's numbering of names dropped."""
    parts = [p for p in op_name.split("/")[1:] if p != "shard_map"]
    source = re.sub(r"\.\d+(?=/|;|$)", "", "/".join(parts))        # XLA's numbered names: convert.17
    return re.sub(r"\bblock_\d+\b", "block_*", source) or "(top level)"


def _hbm_instructions(hlo: str) -> Iterator[tuple[str, int]]:
    """``(source, HBM bytes)`` of each instruction that moves data, by :func:`hbm_traffic`'s rule."""
    computations: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY\s+)?%([\w.-]+)\s.*\{\s*$", line)
        if header:
            name = header.group(2)
            computations[name] = []
            entry = name if header.group(1) else entry
        elif name is not None:
            computations[name].append(line)
    pending, seen = [entry], set()
    while pending:
        computation = pending.pop()
        if computation is None or computation in seen:
            continue
        seen.add(computation)
        arrays: dict[str, list[tuple[str, int, int]]] = {}
        sources: dict[str, str] = {}
        for line in computations.get(computation, []):
            match = _INSTRUCTION.match(line)
            if match is None:
                continue
            arrays[match["name"]] = results = _buffers(match["type"])
            names = re.findall(r"%([\w.-]+)", match["operands"])
            op_name = re.search(r'op_name="([^"]*)"', line)
            sources[match["name"]] = source = (_source(op_name.group(1)) if op_name else
                                               sources.get(names[0], match["op"]) if names else match["op"])
            op = match["op"]
            if op in ("while", "conditional", "call"):
                for single, several in _RUNS.findall(line):
                    pending.extend([single] if single else re.findall(r"%([\w.-]+)", several))
            if op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            operands = [a for o in names for a in arrays.get(o, [])]
            if op.endswith("-start"):      # its result repeats its operands beside the arrays it writes
                echoed, written = [a[0] for a in operands], []
                for array in results:
                    if array[0] in echoed:
                        echoed.remove(array[0])
                    else:
                        written.append(array)
                results = written
            yield source, sum(size for _, size, space in operands + results if space == 0)


def estimated_mcycles(hlo: str) -> float | None:
    """The sum of XLA:TPU's ``estimated_cycles`` over the compiled ``hlo`` text's instructions, in millions
    (None where the backend writes none: CPU, GPU).  A ``while`` body (``model.scan_blocks``) counts once."""
    return _total_mcycles(cycles_by_source(hlo))


def _total_mcycles(by_source: dict[str, float]) -> float | None:
    """The sum of :func:`cycles_by_source`'s values, in millions to 3 decimals (None when it is empty)."""
    return round(sum(by_source.values()), 3) if by_source else None


def cycles_by_source(hlo: str) -> dict[str, float]:
    """XLA:TPU's ``estimated_cycles`` of the compiled ``hlo`` text's instructions summed by the JAX operation
    each comes from, in millions, largest first: the :func:`_source` of the instruction's ``op_name`` (e.g.
    ``transpose(jvp(DiT))/block_*/mlp_in/dot_general`` for the backward of every block's first MLP matrix),
    or its opcode where it has none (the copies, prefetches and kernels XLA adds).  A fusion counts under its
    root's source.  The values add up to :func:`estimated_mcycles`; empty where the backend writes no cycles."""
    found: dict[str, int] = {}
    for line in hlo.splitlines():
        cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
        if cycles is None:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        if name is None:
            opcode = re.search(r"\s([a-z][a-z0-9-]*)\(", line.partition(" = ")[2])
            source = opcode.group(1) if opcode else "?"
        else:
            source = _source(name.group(1))
        found[source] = found.get(source, 0) + int(cycles.group(1))
    return {k: v / 1e6 for k, v in sorted(found.items(), key=lambda kv: -kv[1])}


def attention_lowered(hlo: str) -> str:
    """``splash`` (a Mosaic custom call of the splash kernel), ``cudnn`` (cuDNN's fused attention) or
    ``xla``: the attention the compiled ``hlo`` text computes."""
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line and re.match(r"^\s*(?:ROOT\s+)?%splash", line):
            return "splash"
        if "__cudnn$fmha" in line:
            return "cudnn"
    return "xla"


class ShapesOnly:
    """The training source of a pre-flight: its classes, and no data (the step is only compiled)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the pre-flight reads no data (TrainingSource.{name} was called)")


def compile_step(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> tuple[Any, Trainer, float]:
    """``(compiled step, trainer, seconds to lower and compile)``: the trainer's own jitted step on
    ``devices``, lowered on its abstract state and batch."""
    if config.train.distill.teacher:
        raise ConfigError("the pre-flight does not compile a distillation step (train.distill.teacher reads a "
                          "checkpoint); clear train.distill.teacher to check the student's step")
    trainer = Trainer(config, "", devices=devices, dataset=ShapesOnly(config.model.num_classes))
    start = time.perf_counter()
    compiled = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch(), None).compile()
    return compiled, trainer, time.perf_counter() - start


def roofline_s(flops: float, hbm_bytes: float, peak: float, chip: Chip) -> float:
    """``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)``: one chip's compute-or-memory bound, in seconds."""
    return max(flops / peak, hbm_bytes / chip.hbm_bytes_per_s)


def memory_gib(compiled: Any) -> dict[str, float]:
    """Per chip, GiB: ``argument``, ``output``, ``alias``, ``temp``, ``generated_code`` and ``peak``."""
    m = compiled.memory_analysis()
    sizes = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp", "generated_code")}
    sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + sizes["generated_code"]
    return {k: round(v / GIB, 3) for k, v in sizes.items()}


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def preflight(config: ml_collections.ConfigDict, topology: str, batch: int | None = None, advise: bool = True,
              log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The figures of ``config``'s train step compiled for ``topology`` at global batch ``batch``
    (default ``train.batch_size``), as the module docstring lists them; one call per config (a
    ``--compare_dense`` is two calls).  A step that does not compile gives ``compiled: False`` and the
    one-line ``error``; with ``advise``, one that does not fit (out of HBM at compile, or a peak above
    the HBM) is compiled again with more remat, then with half the batch per chip, until one fits:
    ``advice`` names the settings."""
    config = config.copy_and_resolve_references()
    if batch is not None:
        config.train.batch_size = batch
    devices = topology_devices(topology)
    chips, b = len(devices), config.train.batch_size
    chip = CHIPS[devices[0].device_kind]
    peak = peak_flops(devices[0])
    result: dict[str, Any] = {
        "compiled": False, "error": None, "topology": topology, "chips": chips, "device_kind": devices[0].device_kind,
        "batch": b, "per_chip_batch": b / chips, "model": {k: config.model[k] for k in
                                                         ("arch", "dtype", "attention", "remat", "scan_blocks")},
        "linear": config.model.linear.kind, "mesh": None, "attention": None, "memory_gib_per_chip": None,
        "hbm_gib_per_chip": _significant(chip.hbm_gib), "fits": False, "gflop_per_image": None, "analytic_gflop_per_image": None,
        "hbm_gib_per_step": None, "hbm_gib_by_phase": None, "hbm_gib_by_source": None,
        "xla_bytes_accessed_gib": None, "roofline_step_s": None,
        "roofline_images_per_s": None,
        "analytic_step_s": None, "roofline_over_analytic": None, "xla_optimal_step_s": None,
        "xla_estimated_mcycles": None, "xla_mcycles_by_source": None, "collectives": None, "compile_s": None,
        "flops_from": None, "advice": None}
    log(f"pre-flight: {config.model.arch or 'custom'} ({config.model.linear.kind}) batch {b} on {topology} "
        f"({chips} x {devices[0].device_kind}, {chip.hbm_gib:.4g} GiB each)")
    try:
        validate(config, chips)
        compiled, trainer, seconds = compile_step(config, devices)
    except Exception as e:  # noqa: BLE001 — a step that does not compile is the pre-flight's finding
        result["error"] = _one_line(e)
        log(f"  does not compile: {result['error']}")
        if advise and out_of_memory(e):
            result["advice"] = find_fit(config, devices, chip, log)
        return result
    hlo = compiled.as_text()
    result.update(compiled=True, compile_s=round(seconds, 1), mesh=dict(trainer.mesh.shape),
                  attention=attention_lowered(hlo), memory_gib_per_chip=memory_gib(compiled),
                  collectives=collectives(hlo), xla_mcycles_by_source=cycles_by_source(hlo))
    result["xla_estimated_mcycles"] = _total_mcycles(result["xla_mcycles_by_source"])
    result["fits"] = result["memory_gib_per_chip"]["peak"] <= chip.hbm_gib
    cost, counted, result["flops_from"] = compiled.cost_analysis(), hlo, "compiled step"
    if cost is None:
        result["flops_from"] = "none: XLA's compile-only GPU programs have no cost analysis"
    elif config.model.scan_blocks:   # XLA counts the while body once: the unrolled twin's compile counts all blocks
        twin = config.copy_and_resolve_references()
        twin.model.scan_blocks = False
        try:
            twin_compiled, _, twin_seconds = compile_step(twin, devices)
            cost, counted = twin_compiled.cost_analysis(), twin_compiled.as_text()
            result["flops_from"] = "compiled unrolled twin (model.scan_blocks=False)"
            result["compile_s"] = round(seconds + twin_seconds, 1)
        except Exception as e:  # noqa: BLE001 — the twin may not fit where the scan does
            result["flops_from"] = f"compiled step, scanned blocks counted once (the unrolled twin: {_one_line(e)})"
    analytic = 3 * forward_flops(trainer.model, abstract_params(trainer.model), b) / b
    analytic_step = analytic * b / (chips * peak)
    result.update(analytic_gflop_per_image=_significant(analytic / 1e9), analytic_step_s=_significant(analytic_step))
    mem = result["memory_gib_per_chip"]
    log(f"  compiled in {result['compile_s']} s on mesh {result['mesh']}; attention: {result['attention']}")
    log(f"  memory per chip: peak {mem['peak']} GiB of {chip.hbm_gib:.4g} (arguments {mem['argument']}, temporaries "
        f"{mem['temp']}, code {mem['generated_code']}): {'fits' if result['fits'] else 'DOES NOT FIT'}")
    if cost is not None:
        by_source = hbm_traffic_by_source(counted)
        flops_chip, bytes_chip = float(cost["flops"]), sum(by_source.values()) * GIB
        # XLA does not count the FLOPs of a Mosaic (splash) or cuDNN attention kernel: where one runs,
        # the compute bound takes the analytic count when it is the larger.
        compute = flops_chip if result["attention"] == "xla" else max(flops_chip, analytic * b / chips)
        roofline = roofline_s(compute, bytes_chip, peak, chip)
        result.update(gflop_per_image=_significant(flops_chip * chips / b / 1e9),
                      hbm_gib_per_step=_significant(bytes_chip / GIB), roofline_step_s=_significant(roofline),
                      hbm_gib_by_source=by_source,
                      hbm_gib_by_phase={k: _significant(v) for k, v in by_phase(by_source).items()},
                      xla_bytes_accessed_gib=_significant(float(cost["bytes accessed"]) / GIB),
                      roofline_images_per_s=_significant(b / roofline),
                      roofline_over_analytic=_significant(roofline / analytic_step),
                      xla_optimal_step_s=cost.get("optimal_seconds"))
        uncounted = "" if result["attention"] == "xla" else f", the {result['attention']} kernel's not counted by XLA"
        log(f"  {result['gflop_per_image']} GFLOP per image (analytic {result['analytic_gflop_per_image']}{uncounted}), "
            f"{result['hbm_gib_per_step']} GiB of HBM traffic per chip and step (XLA's bytes accessed, every memory "
            f"space: {result['xla_bytes_accessed_gib']} GiB); by phase: "
            + ", ".join(f"{k} {v}" for k, v in result["hbm_gib_by_phase"].items()))
        log(f"  roofline {result['roofline_step_s'] * 1e3:.1f} ms per step ({result['roofline_images_per_s']} img/s), "
            f"{result['roofline_over_analytic']:.3f} x the analytic-FLOPs bound")
    for op, by_dtype in sorted(result["collectives"].items()):
        log(f"  {op}: " + ", ".join(f"{v['count']} x {dtype} ({v['bytes'] / 2 ** 20:.1f} MiB)"
                                    for dtype, v in sorted(by_dtype.items())))
    if result["xla_mcycles_by_source"]:
        log(f"  XLA's estimated cycles: {result['xla_estimated_mcycles']} M; the largest sources (M):")
        for source, mcycles in list(result["xla_mcycles_by_source"].items())[:SOURCES_LOGGED]:
            log(f"    {mcycles:9.3f}  {source}")
    if advise and not result["fits"]:
        result["advice"] = find_fit(config, devices, chip, log)
    return result


def layer_costs(config: ml_collections.ConfigDict, topology: str, batch: int | None = None,
                log: Callable[[str], None] = lambda line: None) -> dict[str, dict[str, dict[str, float]]]:
    """``{"model"|"dense": {role: figures}}``: each main matrix of a block (:func:`matrix_shapes`) of
    ``config``'s linear variant and of its :func:`dense_twin`, forward and backward (the parameters' and
    the input's gradients) compiled alone for one chip of ``topology``, on that chip's share of the
    batch (random class ids) in ``model.dtype``: ``gflop``, ``mib`` (:func:`hbm_traffic`), ``xla_mib`` (XLA's
    bytes accessed), ``mcycles`` (:func:`estimated_mcycles`) and ``roofline_us``.  Where a step's cost goes,
    layer by layer."""
    from kindjax.layers import make_linear_factory, shared_params
    from kindjax.layers.svd import matrix_shapes

    config = config.copy_and_resolve_references()
    devices = topology_devices(topology)
    chip, peak = CHIPS[devices[0].device_kind], peak_flops(devices[0])
    rows = (batch or config.train.batch_size) // len(devices)
    m = config.model
    tokens, dtype = (m.image_size // m.patch_size) ** 2, jax.numpy.dtype(m.dtype)
    # A one-chip mesh: layers that choose a kernel by platform (kindjax.models.attention.platform_of) see the TPU.
    mesh = jax.sharding.Mesh(devices[:1], ("data",))
    one_chip = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    found: dict[str, dict[str, dict[str, float]]] = {}
    for name, c in (("model", config), ("dense", dense_twin(config))):
        factory = make_linear_factory(c.model)
        if shared_params(factory) is not None:
            raise ConfigError(f"--layers: model.linear.kind={c.model.linear.kind!r} shares parameters across "
                              f"layers; its layers are not compiled alone")
        found[name] = {}
        for role, (d_in, d_out) in matrix_shapes(c.model).items():
            layer = factory(role, d_out, role)
            x = jax.ShapeDtypeStruct((rows, tokens, d_in), dtype)
            y = jax.ShapeDtypeStruct((rows,), jax.numpy.int32)
            params = jax.eval_shape(layer.init, jax.random.key(0), x, y)

            def forward_backward(params, x, y, cotangent, layer=layer):
                out, pullback = jax.vjp(lambda p, xx: layer.apply(p, xx, y), params, x)
                return out, pullback(cotangent)

            with jax.set_mesh(mesh):
                compiled = jax.jit(forward_backward, in_shardings=one_chip, out_shardings=one_chip).lower(
                    params, x, y, jax.ShapeDtypeStruct((rows, tokens, d_out), dtype)).compile()
            cost, hlo = compiled.cost_analysis(), compiled.as_text()   # cost: None for XLA's compile-only GPU programs
            flops, nbytes = None if cost is None else float(cost["flops"]), hbm_traffic(hlo)
            found[name][role] = {
                "gflop": None if cost is None else _significant(flops / 1e9),
                "mib": _significant(nbytes / 2 ** 20),
                "xla_mib": None if cost is None else _significant(float(cost["bytes accessed"]) / 2 ** 20),
                "mcycles": estimated_mcycles(hlo),
                "roofline_us": None if cost is None else _significant(roofline_s(flops, nbytes, peak, chip) * 1e6)}
            log(f"  {name} {role} {d_in}x{d_out}: " + ", ".join(f"{k} {v}" for k, v in found[name][role].items()))
    return found


#: The figures ``--compare_dense`` divides, model by dense (each a key of :func:`preflight`'s dict).
COMPARED = {"roofline_step": "roofline_step_s", "hbm_bytes": "hbm_gib_per_step",
            "xla_bytes_accessed": "xla_bytes_accessed_gib", "flops": "gflop_per_image",
            "xla_estimated_cycles": "xla_estimated_mcycles", "peak_memory": ("memory_gib_per_chip", "peak")}


#: Sources of XLA's estimated cycles (:func:`cycles_by_source`) the log lists, and excesses over dense.
SOURCES_LOGGED = 12


def excess_over(model: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    """``model − dense`` per source of a by-source figure (estimated Mcycles, GiB of HBM traffic; a source
    absent on one side counts 0 there), the :data:`SOURCES_LOGGED` largest differences by size, largest first."""
    diff = {k: round(model.get(k, 0.0) - dense.get(k, 0.0), 3) for k in {*model, *dense}}
    return dict(sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:SOURCES_LOGGED])


def dense_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with plain dense linear layers: the same DiT, batch, mesh and settings otherwise."""
    twin = config.copy_and_resolve_references()
    twin.model.linear = ml_collections.ConfigDict({"kind": "dense"})
    return twin


def compare_dense(config: ml_collections.ConfigDict, topology: str, batch: int | None = None,
                  log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """:func:`preflight` of ``config`` and of its :func:`dense_twin`; the model's dict with ``dense`` (the
    twin's), ``<linear kind>_over_dense``: each :data:`COMPARED` figure of the model over the dense one's
    (None where either is missing), ``mcycles_over_dense_by_source``: where XLA's estimated cycles differ
    most (:func:`excess_over`; TPU only), and ``hbm_gib_over_dense_by_source``: where the HBM traffic does."""
    result = preflight(config, topology, batch, advise=False, log=log)
    log("the dense DiT of the same architecture and batch:")
    dense = preflight(dense_twin(config), topology, batch, advise=False, log=log)

    def figure(r: dict, key: str | tuple[str, str]) -> float | None:
        return r.get(key) if isinstance(key, str) else (r.get(key[0]) or {}).get(key[1])

    ratios = {}
    for name, key in COMPARED.items():
        a, b = figure(result, key), figure(dense, key)
        ratios[name] = _significant(a / b) if a is not None and b else None
    result.update(dense=dense, **{f"{config.model.linear.kind}_over_dense": ratios})
    log(f"{config.model.linear.kind} / dense: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    if result.get("xla_mcycles_by_source") and dense.get("xla_mcycles_by_source"):
        result["mcycles_over_dense_by_source"] = excess_over(result["xla_mcycles_by_source"],
                                                             dense["xla_mcycles_by_source"])
        log(f"XLA's estimated cycles, {config.model.linear.kind} − dense, by source (M):")
        for source, mcycles in result["mcycles_over_dense_by_source"].items():
            log(f"  {mcycles:+9.3f}  {source}")
    if result.get("hbm_gib_by_source") and dense.get("hbm_gib_by_source"):
        result["hbm_gib_over_dense_by_source"] = excess_over(result["hbm_gib_by_source"], dense["hbm_gib_by_source"])
        log(f"HBM traffic, {config.model.linear.kind} − dense, by phase (GiB): " + ", ".join(
            f"{k} {result['hbm_gib_by_phase'][k] - dense['hbm_gib_by_phase'][k]:+.4g}" for k in PHASES)
            + "; by source:")
        for source, gib in result["hbm_gib_over_dense_by_source"].items():
            log(f"  {gib:+9.3f}  {source}")
    return result


def find_fit(config: ml_collections.ConfigDict, devices: list[jax.Device], chip: Chip,
             log: Callable[[str], None]) -> dict[str, Any] | None:
    """The first setting that fits: each ``model.remat`` that keeps less than the config's (at its
    batch), else the config with half the batch per chip, halved again until one fits; None when
    even one image per chip does not."""
    def fits(candidate: ml_collections.ConfigDict) -> bool:
        try:
            compiled, _, _ = compile_step(candidate, devices)
        except Exception as e:  # noqa: BLE001
            if out_of_memory(e):
                return False
            raise
        return memory_gib(compiled)["peak"] <= chip.hbm_gib

    for remat in LESS_KEPT[config.model.remat]:
        candidate = config.copy_and_resolve_references()
        candidate.model.remat = remat
        log(f"  trying model.remat={remat} ...")
        if fits(candidate):
            return {"model.remat": remat}
    per_chip = config.train.batch_size // len(devices) // 2
    while per_chip >= 1:
        candidate = config.copy_and_resolve_references()
        candidate.train.batch_size = per_chip * len(devices)
        log(f"  trying {per_chip} per chip ...")
        if fits(candidate):
            return {"train.batch_size": candidate.train.batch_size, "per_chip_batch": per_chip}
        per_chip //= 2
    return None


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    fv = flags.FLAGS
    log = lambda line: print(line, flush=True)   # noqa: E731
    try:
        if fv.layers:
            result = {"compiled": True, "topology": fv.topology,   # matrices alone: no step to fit or not
                      "layers": layer_costs(fv.config, fv.topology, fv.batch, log)}
        elif fv.compare_dense and fv.config.model.linear.kind != "dense":
            result = compare_dense(fv.config, fv.topology, fv.batch, log)
            result["compiled"] = result["compiled"] and result["dense"]["compiled"]
        else:
            result = preflight(fv.config, fv.topology, fv.batch, fv.advise, log=log)
    except Exception as e:  # noqa: BLE001 — every failure still ends with the JSON line
        result = {"compiled": False, "error": _one_line(e), "topology": fv.topology, "fits": False}
    print(json.dumps(result), flush=True)
    if not result["compiled"] or result.get("fits") is False:
        raise SystemExit(1)


if __name__ == "__main__":
    if not os.environ.get("JAX_PLATFORMS"):   # compile-only TPU devices: leave a real accelerator to the job
        jax.config.update("jax_platforms", "cpu")
    from absl import flags

    from kindjax import cli

    cli.define_config("Config file (configs/*.py).")
    flags.DEFINE_string("topology", "v5p-8", "The TPU slice to compile for: a Cloud TPU accelerator type "
                                             f"({', '.join(TOPOLOGY_NAMES)}, ...; 'Kx' in front for K slices).")
    flags.DEFINE_integer("batch", None, "Global batch size (default: the config's train.batch_size).")
    flags.DEFINE_bool("advise", True, "When the step does not fit, compile again with more remat or a smaller "
                                      "batch to find a setting that fits.")
    flags.DEFINE_bool("compare_dense", False, "Also compile the dense DiT of the same architecture and batch and "
                                              "report <variant>_over_dense: the ratios of the roofline steps, HBM "
                                              "bytes, FLOPs and XLA's estimated cycles (no --advise).")
    flags.DEFINE_bool("layers", False, "Instead of the step: each main matrix of a block, forward and backward, "
                                       "compiled alone for one chip beside the dense DiT's (layer_costs).")
    flags.mark_flags_as_required(["config"])
    cli.run(main)
