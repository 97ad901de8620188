r"""Multi-process training through Lightning Fabric (``pip install "pyro-lvm[distributed]"``).

Fabric supplies what an engine must: launching one process per device (and per node),
placing each on its device, and the collectives of the process group (gloo on CPU, NCCL
on GPU). pyro_lvm keeps its own training loop (:class:`~pyro_lvm.experiments.trainer.Trainer`,
exact resume included): the loop calls the inference drivers with this rank's share of
every batch inside :func:`~pyro_lvm.collective.data_parallel`, and the drivers
sum gradients and potentials with :meth:`FabricCollective.all_reduce` (a sum on Fabric's
process group). Wrapping the networks in
``DistributedDataParallel`` would not work: the models are called through
``model``/``guide``, never through ``DDP.forward``, so its gradient hooks never fire in sync.

Only global rank 0 writes the run folder; every rank holds the same state after every
step (see ``docs/distributed.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FabricCollective",
    "agree_or_raise",
    "check_data_parallel",
    "is_global_zero",
    "launch",
    "world_size_of",
]

#: the collective this process was launched into (``None``: a single process)
_LAUNCHED: list[FabricCollective] = []


class FabricCollective:
    """The :class:`~pyro_lvm.collective.Collective` of a launched Fabric."""

    def __init__(self, fabric: Any):
        self.fabric = fabric
        self.rank: int = fabric.global_rank
        self.world_size: int = fabric.world_size

    @property
    def device(self) -> torch.device:
        """This rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
        return self.fabric.device

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Elementwise sum over ranks (``tensor`` may be overwritten).

        The sum runs on the process group Fabric set up, as ``Fabric.all_reduce(...,
        reduce_op="sum")`` does but without the barrier Lightning puts before every
        reduction: the all-reduce itself synchronises, and the barrier added ~60% to a
        2-process CPU step of the digits VAE (measured: 55-62 against 31-42 ms).
        """
        device = tensor.device
        out = tensor.to(self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out.to(device)


def world_size_of(config) -> int:
    """Processes a config asks for: ``devices * num_nodes``."""
    return int(config.devices) * int(config.num_nodes)


def launch(config) -> FabricCollective | None:
    """Start the processes ``config`` asks for and join this one to them.

    ``None`` for a single process (no Lightning needed). Under the ``ddp`` strategy the
    first process re-runs its own command line once per further local device
    (Fabric's subprocess launcher); under SLURM (``srun``) or ``torchrun`` the processes
    exist already and Fabric reads their ranks from the environment.
    """
    if world_size_of(config) == 1:
        return None
    if _LAUNCHED:
        return _LAUNCHED[-1]
    try:
        from lightning.fabric import Fabric
    except ImportError:
        raise ValueError(
            "--devices/--num-nodes need Lightning: pip install 'pyro-lvm[distributed]'"
        ) from None
    accelerator = "gpu" if str(config.device).startswith("cuda") else "cpu"
    fabric = Fabric(
        accelerator=accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
    )
    fabric.launch()
    collective = FabricCollective(fabric)
    _LAUNCHED.append(collective)
    return collective


def is_global_zero() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes and prints."""
    return not _LAUNCHED or _LAUNCHED[-1].rank == 0


def agree_or_raise(
    collective: FabricCollective | None, check: Callable[[], Any], lead_only: bool = False
) -> None:
    """Run ``check()`` on every rank (on rank 0 only with ``lead_only``) and let all ranks
    agree on its outcome: when it raises anywhere, every rank raises (the failing rank its
    own one-line error), so no rank is left waiting in a collective."""
    if collective is None:
        check()
        return
    error: Exception | None = None
    try:
        if not lead_only or collective.rank == 0:
            check()
    except Exception as err:  # re-raised below, after the vote
        error = err
    flag = torch.tensor([float(error is not None)], device=collective.device)
    failed = float(collective.all_reduce(flag).sum()) > 0
    if error is not None:
        raise error
    if failed:
        raise ValueError("another process refused the run (rank 0 printed why)")


def check_data_parallel(experiment, config) -> None:
    """One-line errors for a data-parallel run its inference or its settings cannot do."""
    world = world_size_of(config)
    if getattr(experiment.inference, "data_parallel_rng", None) is None:
        raise ValueError(
            f"{config.model} does not support --devices/--num-nodes (its inference does not "
            "all-reduce gradients); train it in one process"
        )
    kernel = getattr(experiment.inference, "kernel", None)
    if kernel is not None and getattr(kernel, "reduce_fn", None) is None:
        raise ValueError(
            "the Langevin kernel has no reduce_fn, so each process would sample its own "
            "shard's posterior; build it with reduce_fn=pyro_lvm.collective."
            "reduce_potential (LAE does by default)"
        )
    if config.batch_size < world:
        raise ValueError(
            f"--batch-size {config.batch_size} is smaller than the {world} processes; each "
            "process needs at least one row: pass --batch-size >= devices * num-nodes"
        )
    if getattr(config, "precondition", None) is not None:
        raise ValueError(
            "--precondition moves one chain coordinate per datapoint of the batch, which "
            "cannot be split across processes; drop --precondition or --devices"
        )
