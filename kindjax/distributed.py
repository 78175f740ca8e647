"""Multi-process start-up shared by the command-line entry points (train, encode, evaluate), and
the warning for an accelerator that JAX does not use.

Whether and how to call ``jax.distributed.initialize`` is :func:`init_arguments`, a pure function
of the environment variables and of the accelerators the machine has (:class:`Accelerators`):

- ``JAX_COORDINATOR_ADDRESS`` set: that coordinator; the process count and id from
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (kindjax's names), or from SLURM / Open MPI.
- a Cloud TPU VM: JAX finds the pod itself: ``gketpu`` where GKE sets ``TPU_WORKER_HOSTNAMES`` (or
  ``TPU_PROCESS_ADDRESSES``), ``gcetpu`` (the VM's metadata server) elsewhere. Called on a one-host
  TPU VM too (it then forms a one-process job); ``TPU_SKIP_MDS_QUERY`` set (JAX's own "no metadata
  server here", e.g. a TPU outside GCE) means one process.
- SLURM (``srun`` with more than one task): coordinator, count and id from SLURM; the GPUs of a node
  are split among its tasks: ``launch/gpu_slurm.sh`` starts one task per GPU
  (``--ntasks-per-node=8 --gpus-per-node=8``: task ``SLURM_LOCALID`` takes GPU ``SLURM_LOCALID``);
  one task per node takes all its GPUs (JAX alone would give it only GPU ``SLURM_LOCALID``, the
  fault this module fixes); ``--gpus-per-task`` (SLURM binds the GPUs) takes every GPU it sees.
- Open MPI (``mpirun``): as SLURM, with ``OMPI_COMM_WORLD_LOCAL_RANK`` / ``_LOCAL_SIZE``.
- otherwise one process: no call.

On a Google Compute Engine VM (TPU or GPU), :func:`watch_gce_events` turns a host-maintenance event
that will stop the VM, or a preemption notice, from the metadata server into SIGTERM for this
process, so training saves and exits as on any SIGTERM (the same step on every process).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import signal
import sys
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping

#: PCI vendor id of Google (TPU chips), as ``/sys/bus/pci/devices/*/vendor`` spells it.
GOOGLE_PCI_VENDOR = "0x1ae0"

INSTALL = {"gpu": "pip install -e '.[cuda]'", "tpu": "pip install -e '.[tpu]'"}


@dataclasses.dataclass(frozen=True)
class Accelerators:
    """What the operating system shows, whatever jaxlib is installed."""

    gpus: int = 0   # NVIDIA GPUs (/dev/nvidiaN)
    tpus: int = 0   # TPU chips (/dev/accelN, or Google PCI devices behind VFIO)


def visible_accelerators(root: str = "/") -> Accelerators:
    """Counts the NVIDIA GPUs and TPU chips under ``root`` (``/``; a test gives a fake tree)."""
    gpus = [p for p in glob.glob(os.path.join(root, "dev", "nvidia*")) if re.fullmatch(r"nvidia\d+", os.path.basename(p))]
    accel = [p for p in glob.glob(os.path.join(root, "dev", "accel*")) if re.fullmatch(r"accel\d+", os.path.basename(p))]
    google = 0
    for vendor in glob.glob(os.path.join(root, "sys", "bus", "pci", "devices", "*", "vendor")):
        with open(vendor) as f:
            google += f.read().strip() == GOOGLE_PCI_VENDOR
    return Accelerators(gpus=len(gpus), tpus=max(len(accel), google))


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    return int(value) if value.strip() else default


def slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this SLURM step on this node: ``SLURM_STEP_TASKS_PER_NODE`` (or the job's
    ``SLURM_TASKS_PER_NODE``), e.g. ``8(x2),4``, at index ``SLURM_NODEID``."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return _int(env, "SLURM_NTASKS_PER_NODE", 1)
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot read SLURM's tasks per node {spec!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[min(_int(env, "SLURM_NODEID", 0), len(counts) - 1)]


def local_gpu_ids(visible: int, tasks_on_node: int, local_rank: int, bound: bool) -> list[int] | None:
    """The GPUs (indices among the ``visible`` ones) of task ``local_rank`` of ``tasks_on_node``:
    all of them when the launcher bound GPUs to the task (``bound``) or the task is alone on its
    node, else an equal share; None when no GPU is visible (JAX's CPU or TPU defaults apply)."""
    if visible == 0:
        return None
    if bound or tasks_on_node == 1:
        return list(range(visible))
    if visible % tasks_on_node:
        raise ValueError(f"{tasks_on_node} tasks on a node cannot share its {visible} GPUs equally; start one "
                         f"task per GPU (srun --ntasks-per-node={visible}) or one per node")
    share = visible // tasks_on_node
    return list(range(local_rank * share, (local_rank + 1) * share))


def visible_gpus(env: Mapping[str, str], accelerators: Accelerators) -> int:
    """GPUs this process's CUDA sees: ``CUDA_VISIBLE_DEVICES`` when set, else the machine's."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return accelerators.gpus
    return len([d for d in listed.split(",") if d.strip()])


def init_arguments(env: Mapping[str, str], accelerators: Accelerators) -> dict[str, Any] | None:
    """Keyword arguments of ``jax.distributed.initialize`` for this process, or None for a
    one-process job (the decisions are listed in the module docstring)."""
    slurm = (all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
             and _int(env, "SLURM_NTASKS", 1) > 1)
    mpi = _int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1
    if env.get("JAX_COORDINATOR_ADDRESS"):
        args: dict[str, Any] = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
        if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
            if not ("JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env):
                raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, under SLURM or "
                                 "Open MPI) beside JAX_COORDINATOR_ADDRESS")
            args.update(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
            return args
        if not (slurm or mpi):
            raise ValueError("JAX_COORDINATOR_ADDRESS is set, but not JAX_NUM_PROCESSES and JAX_PROCESS_ID: set "
                             "them on every process (or unset JAX_COORDINATOR_ADDRESS for a one-process run)")
    else:
        args = {}
    if accelerators.tpus and not (slurm or mpi) and "TPU_SKIP_MDS_QUERY" not in env:
        gke = "TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env
        return {**args, "cluster_detection_method": "gketpu" if gke else "gcetpu"}
    if slurm:
        ids = local_gpu_ids(visible_gpus(env, accelerators), slurm_tasks_on_node(env), int(env["SLURM_LOCALID"]),
                            bound="SLURM_GPUS_PER_TASK" in env)
        return {**args, "cluster_detection_method": "slurm", "local_device_ids": ids}
    if mpi:
        ids = local_gpu_ids(visible_gpus(env, accelerators), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1),
                            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), bound=False)
        return {**args, "cluster_detection_method": "ompi", "local_device_ids": ids}
    return None


def initialize() -> None:
    """``jax.distributed.initialize(**init_arguments(...))`` when this process is one of several
    (or on a TPU VM); nothing otherwise."""
    args = init_arguments(os.environ, visible_accelerators())
    if args is not None:
        import jax

        jax.distributed.initialize(**args)


def cpu_fallback_warning(platform: str, accelerators: Accelerators, env: Mapping[str, str]) -> str | None:
    """The warning for JAX running on ``platform`` "cpu" while the machine has GPUs or TPUs, naming
    the install that fixes it; None when JAX uses the accelerator or ``JAX_PLATFORMS`` asks for the
    CPU on purpose."""
    if platform != "cpu" or env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    kind = "tpu" if accelerators.tpus else "gpu" if accelerators.gpus else None
    if kind is None:
        return None
    count = accelerators.tpus if kind == "tpu" else accelerators.gpus
    what = f"{count} TPU chip(s)" if kind == "tpu" else f"{count} NVIDIA GPU(s)"
    return (f"WARNING: kindjax: this machine has {what}, but JAX runs on the CPU (the installed jaxlib has no "
            f"{kind.upper()} support); install it with: {INSTALL[kind]}")


def warn_if_cpu_fallback() -> str | None:
    """Prints :func:`cpu_fallback_warning` for this machine to stderr (and returns it)."""
    import jax

    message = cpu_fallback_warning(jax.default_backend(), visible_accelerators(), os.environ)
    if message:
        print(message, file=sys.stderr, flush=True)
    return message


#: The metadata values that mean "this VM stops soon" (``instance/<key>``); live migration
#: (``MIGRATE_ON_HOST_MAINTENANCE``) keeps the VM and its processes running.
GCE_STOPS = {"maintenance-event": ("TERMINATE_ON_HOST_MAINTENANCE",), "preempted": ("TRUE",)}


def on_gce(env: Mapping[str, str] = os.environ, root: str = "/") -> str | None:
    """The metadata server of this Google Compute Engine VM (``host[:port]``), or None off GCE: the
    VM's DMI product name says "Google Compute Engine"; ``GCE_METADATA_HOST`` (google-auth's variable)
    names another server, or the one to use anywhere."""
    if env.get("GCE_METADATA_HOST"):
        return env["GCE_METADATA_HOST"]
    try:
        with open(os.path.join(root, "sys", "class", "dmi", "id", "product_name")) as f:
            return "metadata.google.internal" if f.read().strip() == "Google Compute Engine" else None
    except OSError:
        return None


def _watch(host: str, key: str, notify: Callable[[str], None], stop: threading.Event, poll_s: float) -> None:
    """Long-polls ``instance/<key>`` (``wait_for_change`` with the last ETag) until it holds one of
    :data:`GCE_STOPS` or ``stop`` is set; an unreachable server is asked again after ``poll_s``."""
    etag = "0"
    while not stop.is_set():
        url = (f"http://{host}/computeMetadata/v1/instance/{key}?wait_for_change=true&last_etag={etag}"
               f"&timeout_sec={max(1, int(poll_s))}")
        try:
            request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
            with urllib.request.urlopen(request, timeout=poll_s + 5) as response:
                value, etag = response.read().decode().strip(), response.headers.get("ETag", etag)
        except (OSError, urllib.error.URLError, ValueError):
            stop.wait(poll_s)
            continue
        if value in GCE_STOPS[key] and not stop.is_set():
            notify(f"GCE {key}: {value}")
            return


def watch_gce_events(notify: Callable[[str], None] | None = None, poll_s: float = 60.0,
                     env: Mapping[str, str] = os.environ, root: str = "/") -> threading.Event | None:
    """On a GCE VM (:func:`on_gce`), daemon threads that watch ``instance/maintenance-event`` and
    ``instance/preempted``; when one says the VM stops (:data:`GCE_STOPS`), ``notify(what)`` (default:
    print one line and send this process SIGTERM, which the trainer, or JAX's preemption service in
    a job of several processes, turns into a checkpoint of the same step everywhere).  Returns the
    event that ends the watch (None off GCE)."""
    host = on_gce(env, root)
    if host is None:
        return None

    def sigterm(what: str) -> None:
        print(f"{what}: this VM stops soon; stopping as on SIGTERM.", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    stop = threading.Event()
    for key in GCE_STOPS:
        threading.Thread(target=_watch, args=(host, key, notify or sigterm, stop, poll_s), daemon=True,
                         name=f"kindjax-gce-{key}").start()
    return stop
