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

import atexit
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_lvm.data.bundle import binarize

__all__ = [
    "FabricCollective",
    "RefusedElsewhere",
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
    if config.num_nodes > 1 and not _cluster_launched():
        # Fabric would start this node's processes and wait for the others forever
        raise ValueError(
            f"--num-nodes {config.num_nodes}: no launcher started the other nodes' processes "
            "(no SLURM srun, torchrun, LSF or MPI environment, nor NODE_RANK and MASTER_ADDR); "
            "start this command on every node with srun or torchrun (docs/distributed.md)"
        )
    accelerator = "gpu" if str(config.device).startswith("cuda") else "cpu"
    fabric = Fabric(
        accelerator=accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
    )
    fabric.launch()
    # the process group is torn down before the interpreter's own teardown: left to it,
    # gloo's threads can abort the process at exit ("terminate called without an active
    # exception") after every step succeeded
    atexit.register(_destroy_process_group)
    collective = FabricCollective(fabric)
    _LAUNCHED.append(collective)
    return collective


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _cluster_launched() -> bool:
    """Whether a multi-node launcher set this process up (Lightning's own detection)."""
    import os

    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    detected = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment, MPIEnvironment)
    manual = "NODE_RANK" in os.environ and "MASTER_ADDR" in os.environ
    return manual or any(env.detect() for env in detected)


def is_global_zero() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes and prints."""
    return not _LAUNCHED or _LAUNCHED[-1].rank == 0


class RefusedElsewhere(ValueError):
    """Another rank refused the run and reported why; this rank exits without a word."""

    quiet = True


def agree_or_raise(
    collective: FabricCollective | None, check: Callable[[], Any], lead_only: bool = False
) -> None:
    """Run ``check()`` on every rank (on rank 0 only with ``lead_only``) and let all ranks
    agree on its outcome: when it raises anywhere, every rank raises, so no rank is left
    waiting in a collective. The lowest failing rank raises its own one-line error, the
    others a quiet :class:`RefusedElsewhere`, so the user reads the reason once."""
    if collective is None:
        check()
        return
    error: Exception | None = None
    try:
        if not lead_only or collective.rank == 0:
            check()
    except Exception as err:  # re-raised below, after the vote
        error = err
    flags = torch.zeros(collective.world_size, device=collective.device)
    flags[collective.rank] = float(error is not None)
    failed = collective.all_reduce(flags).nonzero().flatten().tolist()
    if not failed:
        return
    if failed[0] == collective.rank:
        raise error
    raise RefusedElsewhere(f"process {failed[0]} refused the run (it printed why)")


def check_data_parallel(experiment, config, data) -> None:
    """One-line errors for a data-parallel run that its inference, its model or its
    settings cannot do exactly (``data``: the training split, after any holdout)."""
    world = world_size_of(config)
    inference = experiment.inference
    if getattr(inference, "data_parallel_rng", None) is None:
        reason = getattr(
            inference,
            "data_parallel_refusal",
            "its inference does not sum gradients over processes",
        )
        raise ValueError(
            f"{config.model} does not support --devices/--num-nodes ({reason}); train it in "
            "one process"
        )
    kernel = getattr(inference, "kernel", None)
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
    _check_last_batch(data.num_train, config.batch_size, world)
    if getattr(config, "precondition", None) is not None:
        raise ValueError(
            "--precondition moves one chain coordinate per datapoint of the batch, which "
            "cannot be split across processes; drop --precondition or --devices"
        )
    head = data.train_x[:3]
    if data.binary_probs:
        head = binarize(head, seed=0)
    shared = _sites_not_per_row(experiment, head.to(config.device)) if len(head) == 3 else []
    if shared:
        raise ValueError(
            f"the model's latent site {shared[0]!r} is not per datapoint (its value does not "
            f"grow with the rows of x): each of the {world} processes would count its terms "
            "once, not once in all; train it in one process, or make every latent local "
            "to the data plate"
        )


def _check_last_batch(rows: int, batch_size: int, world: int) -> None:
    """Every rank needs a row of every batch: refuse a last batch smaller than ``world``."""
    last = rows % batch_size
    if last == 0 or last >= world:
        return

    def fits(b: int) -> bool:
        return b >= world and (rows % b == 0 or rows % b >= world)

    below = next((b for b in range(batch_size - 1, world - 1, -1) if fits(b)), None)
    above = next(b for b in range(batch_size + 1, rows + 1) if fits(b))
    options = " or ".join(str(b) for b in (below, above) if b is not None)
    raise ValueError(
        f"the last batch of each epoch has {last} row{'s' * (last > 1)} ({rows} training "
        f"rows in batches of {batch_size}), fewer than the {world} processes; pass "
        f"--batch-size {options} (or change --validation)"
    )


def _sites_not_per_row(experiment, x: Tensor) -> list[str]:
    """The latent sites (model and guide) whose value has the same shape for 2 and 3 rows
    of ``x``: global latents, whose prior and guide terms every rank would add once.

    The probe runs the guide and the model on the rows without changing anything: module
    state, Pyro's param store and the random generators are restored afterwards.
    """
    import pyro
    from pyro import poutine
    from pyro.poutine.util import site_is_subsample

    from pyro_lvm.experiments.checkpoint import preserved_rng

    modules = experiment.modules
    saved = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    store = pyro.get_param_store()
    shapes = []
    try:
        with preserved_rng(), torch.no_grad(), store.scope(store.get_state()):
            for n in (2, 3):
                rows = x[:n]
                guide = poutine.trace(experiment.guide).get_trace(rows)
                model = poutine.trace(poutine.replay(experiment.lvm.model, trace=guide)).get_trace(
                    rows
                )
                shapes.append(
                    {
                        name: tuple(site["value"].shape)
                        for trace in (guide, model)
                        for name, site in trace.nodes.items()
                        if site["type"] == "sample"
                        and not site["is_observed"]
                        and not site_is_subsample(site)
                    }
                )
    finally:
        modules.load_state_dict(saved)
    return sorted(name for name, shape in shapes[0].items() if shapes[1].get(name) == shape)
