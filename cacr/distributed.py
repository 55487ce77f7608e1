"""Every rank helper of the project, and the all-gathers that losses and metrics use.

- Which process is this: :func:`primary_process` (from the launch environment alone, before
  any process group: the process that claims the run directory), :func:`is_main_process`
  (rank 0 of the process group, else of the environment: the process that writes files),
  :func:`distributed_env` (``(rank, world size, local rank)`` from torchrun's or Lightning's
  variables), :func:`rank_and_world_size` (in the process group), :func:`trainer_global_rank`
  (known as soon as a Lightning trainer exists, before its process group).
- Joining: :func:`join_process_group` (an evaluation started by ``torchrun`` joins the group
  its environment describes; training ranks are joined by Lightning).
- How a training job runs: :func:`num_local_processes` (one per device),
  :func:`is_script_ddp` (one process per device started by a launcher),
  :func:`processes_created_externally` (a cluster or torchrun started every rank).
- Gathers: :func:`all_gather_with_grad` (the gradient flows back to every rank's input, as
  the in-batch alignment loss needs) and :func:`all_gather_no_grad` (equal shapes, no
  gradient). Exact sharding of evaluation rows is in :mod:`cacr.evaluation.distributed`.

Everything works without a process group (one process, world size 1). Lightning is imported
only inside the functions that take a trainer or its config, so evaluation can import this
module without it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from cacr.config import ConfigError

# Variables a launcher sets to a process's rank; any of them not 0 means "not the primary process".
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                   "PMI_RANK")
# Strategies that run one process per device started by a launcher (not spawn/fork).
SCRIPT_DDP_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


# --------------------------------------------------------------------------- which process is this


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size(group=None) -> Tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` with no process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def primary_process(environ: Mapping[str, str] = os.environ) -> bool:
    """False in DDP ranks other than 0 as the launch environment names them (``RANK``,
    ``LOCAL_RANK``, ``NODE_RANK``, ``SLURM_PROCID``, ... not 0); true with none set. Known
    before any process group: the primary process claims the run directory."""
    return all(environ.get(k, "0").strip() in ("", "0") for k in _RANK_VARIABLES)


def distributed_env(environ: Mapping[str, str] = os.environ) -> Optional[Tuple[int, int, int]]:
    """``(rank, world size, local rank)`` from torchrun's (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``) or Lightning's (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``)
    variables; ``None`` for one process."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = environ.get("LOCAL_RANK")
    if "RANK" in environ:
        rank = int(environ["RANK"])
    elif local is not None:
        node = int(environ.get("NODE_RANK", environ.get("GROUP_RANK", "0")))
        if node == 0:
            rank = int(local)
        elif "LOCAL_WORLD_SIZE" in environ:
            rank = node * int(environ["LOCAL_WORLD_SIZE"]) + int(local)
        else:
            raise ConfigError(f"WORLD_SIZE={world}, NODE_RANK={node}, LOCAL_RANK={local}: set RANK or "
                              f"LOCAL_WORLD_SIZE to give this process's global rank")
    else:
        raise ConfigError(f"WORLD_SIZE={world} but neither RANK nor LOCAL_RANK is set: launch with torchrun")
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside [0, WORLD_SIZE={world})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with torchrun")
    return rank, world, int(local) if local is not None else rank


def is_main_process() -> bool:
    """Rank 0 of the process group, or of the launch environment where none was joined
    (``scorer=file`` / ``scores=`` evaluations need no collective)."""
    if is_distributed():
        return dist.get_rank() == 0
    env = distributed_env()
    return env is None or env[0] == 0


def join_process_group(device_for_local_rank: Callable[[int], torch.device]) -> torch.device:
    """Join the process group the environment describes (:func:`distributed_env`; NCCL on
    GPUs, gloo on CPU) and return this process's device, ``device_for_local_rank(local
    rank)``; one process (no ``WORLD_SIZE`` > 1) joins nothing and gets local rank 0's device."""
    env = distributed_env()
    if env is None:
        return device_for_local_rank(0)
    rank, world, local = env
    device = device_for_local_rank(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return device


def trainer_global_rank(trainer) -> int:
    """A Lightning trainer's global rank, known as soon as the trainer exists (before the
    process group): ``node_rank * processes per node + local_rank``."""
    from pytorch_lightning.strategies import ParallelStrategy

    s = trainer.strategy
    if isinstance(s, ParallelStrategy) and s.cluster_environment is not None:
        return int(s.node_rank) * int(s.num_processes) + int(s.local_rank)
    return 0


# --------------------------------------------------------------------------- how a training job runs


def num_local_processes(trainer_cfg: Mapping[str, Any]) -> Optional[int]:
    """Processes per node that ``trainer_cfg`` asks for (one per device), or None for an
    accelerator other than cpu / gpu / cuda / auto (left to Lightning)."""
    from omegaconf import OmegaConf
    from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and CUDAAccelerator.is_available()):
        acc = CUDAAccelerator
    elif accelerator in ("cpu", "auto"):
        acc = CPUAccelerator
    else:
        return None
    devices = trainer_cfg.get("devices", "auto")
    if devices == "auto":
        devices = acc.auto_device_count()
    if OmegaConf.is_config(devices):
        devices = OmegaConf.to_container(devices)
    return len(acc.get_parallel_devices(acc.parse_devices(devices)))


def is_script_ddp(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether the job runs one process per device that a launcher starts: ``strategy`` ddp,
    or ``auto`` with several devices or nodes (where Lightning picks ddp)."""
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str):
        return False
    n = num_local_processes(trainer_cfg)
    if strategy == "auto":
        return n is not None and n * int(trainer_cfg.get("num_nodes", 1)) > 1
    return strategy in SCRIPT_DDP_STRATEGIES


def processes_created_externally() -> bool:
    """True where a cluster or ``torchrun`` started every rank (Lightning's detection order)."""
    if "LOCAL_RANK" in os.environ:
        return True
    from lightning_fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                      TorchElasticEnvironment)

    return any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment))


# --------------------------------------------------------------------------- gathers


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` (equal shapes) concatenated along dim 0 in rank order, ``(W * B, ...)``;
    the gradient of each block flows back to the rank it came from. ``x`` itself without a
    process group."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` (equal shapes) concatenated along dim 0 in rank order, without gradient."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x)
    return torch.cat(gathered)
