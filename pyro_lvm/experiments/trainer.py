"""The training loop shared by the CLI, the examples and user code.

The loop knows nothing of models: it feeds minibatches to ``experiment.inference.step``
and keeps the bookkeeping a research run needs: dynamic binarization, per-step logs,
divergence detection, atomic checkpoints after every epoch (and on interruption) holding
model, optimizer, sampler and random-generator states, so ``resume`` continues exactly as
an uninterrupted run would, mid-epoch included.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pyro_lvm.collective import (
    Collective,
    data_parallel,
    rank_seed,
    reduce_sum,
    shard_bounds,
)
from pyro_lvm.data.bundle import DataBundle, binarize
from pyro_lvm.experiments.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from pyro_lvm.experiments.health import check_epoch
from pyro_lvm.experiments.params import load_param_store_state, param_store_state
from pyro_lvm.experiments.recipes.base import Experiment
from pyro_lvm.infer.diagnostics import DivergenceError

__all__ = ["Trainer", "TrainerState"]


@dataclass
class TrainerState:
    """Where training is: epoch, position inside it, logs."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    epoch_loss_sum: float = 0.0
    epoch_count: int = 0
    shuffle_state: torch.Tensor | None = None
    #: one record per finished epoch: epoch, train_loss (per datapoint), metrics
    history: list[dict] = field(default_factory=list)
    #: one record per step: step, loss per datapoint, and the inference metrics
    steps: list[dict] = field(default_factory=list)
    #: loss per datapoint of the first step (the untrained model): the health yardstick
    first_loss: float | None = None
    #: health findings (:mod:`pyro_lvm.experiments.health`), one per kind: ``{"kind", "message"}``
    warnings: list[dict] = field(default_factory=list)
    #: the best monitored loss so far (``val_loss``, else ``train_loss``) and its epoch
    best_loss: float | None = None
    best_epoch: int = 0
    #: set when early stopping ended training
    stopped_early: bool = False


class Trainer:
    """Minibatch training of an :class:`~pyro_lvm.experiments.recipes.base.Experiment`.

    Parameters
    ----------
    experiment : Experiment
        Model, inference driver and modules to checkpoint.
    data : DataBundle
        Data already mapped for the likelihood (:meth:`DataBundle.for_likelihood`).
    batch_size : int
        Minibatch size (the last batch of an epoch may be smaller).
    out_dir : path, optional
        Where ``checkpoint.pt`` goes; no checkpoints when ``None``.
    seed : int
        Seeds the shuffling generator.
    device : str
        Where batches are moved.
    log_metrics_every : int
        Record ``inference.metrics()`` every this many steps.
    validation_x : Tensor, optional
        Held-out data (already binarized for Bernoulli likelihoods): after every epoch the
        loss per datapoint ``inference.evaluate_loss`` on it is recorded as ``val_loss``.
    early_stopping : int
        Stop when the monitored loss (``val_loss``, else ``train_loss``) has not improved
        for this many epochs (0: never).
    schedulers : list of torch LR schedulers
        Stepped once per epoch; their state is checkpointed.
    collective : Collective, optional
        Data parallel over these ranks (see :mod:`pyro_lvm.collective`; the CLI
        passes Lightning Fabric's). ``batch_size`` is then the *global* batch: every rank
        draws the same permutation and the same dynamic binarization of the union batch
        and keeps its contiguous share of the rows, so the run takes the single-process
        steps of the union batches. Inference whose random draws are per datapoint (SVI's
        guide noise) draws them on each rank from its own stream
        (:func:`~pyro_lvm.collective.rank_seed` of seed, step and rank, so resume
        stays exact); inference with ``data_parallel_rng = "shared"`` (LAE: chain-shaped
        proposal noise and MH uniforms) draws from the global generator, in the same state
        on every rank. Only rank 0 writes checkpoints.
    """

    def __init__(
        self,
        experiment: Experiment,
        data: DataBundle | None,
        batch_size: int,
        out_dir: str | Path | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        log_metrics_every: int = 1,
        validation_x: torch.Tensor | None = None,
        early_stopping: int = 0,
        schedulers: list | None = None,
        collective: Collective | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if data is not None:  # None: a trainer that only restores (pyro_lvm.load_run)
            self._check_data(experiment, data, batch_size)
        if early_stopping < 0:
            raise ValueError(f"--early-stopping must be >= 0 epochs, got {early_stopping}")
        self.validation_x = validation_x
        self.early_stopping = early_stopping
        self.schedulers = list(schedulers or [])
        self.experiment, self.data, self.batch_size = experiment, data, batch_size
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = torch.device(device)
        if collective is not None and collective.world_size <= 1:
            collective = None
        self.collective = collective
        #: whether this process writes checkpoints (rank 0 only)
        self.is_writer = self.collective is None or self.collective.rank == 0
        self.seed = seed
        self.log_metrics_every = log_metrics_every
        self.shuffle = torch.Generator().manual_seed(seed)
        self.state = TrainerState()
        #: set (e.g. from a SIGINT handler) to stop cleanly after the current step
        self.stop_requested = False
        #: plain data saved with every checkpoint (the CLI records the run's config here)
        self.metadata: dict = {}

    @staticmethod
    def _check_data(experiment: Experiment, data: DataBundle, batch_size: int) -> None:
        if batch_size > data.num_train:
            raise ValueError(
                f"batch size {batch_size} is larger than the {data.num_train} training "
                "examples; pass a smaller --batch-size"
            )
        head = data.train_x[:batch_size]
        check_data = getattr(experiment.lvm, "check_data", None)  # optional in the protocol
        if check_data is not None:
            check_data(binarize(head, seed=0) if data.binary_probs else head)

    # -- checkpoints ----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    def save(self, name: str = CHECKPOINT_NAME) -> None:
        """Write the checkpoint atomically, keeping the previous one (no-op without
        ``out_dir``); ``name=BEST_NAME`` writes the best-so-far copy instead.

        Raises :class:`~pyro_lvm.infer.diagnostics.DivergenceError` instead of saving
        non-finite parameters, so the file on disk stays the last good state.
        """
        if self.checkpoint_path is None:
            return
        modules = self.experiment.modules.state_dict()
        params = param_store_state(self.experiment.modules)
        tensors = {**modules, **{name: entry["value"] for name, entry in params.items()}}
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise DivergenceError(
                f"parameter {bad[0]!r} became non-finite by step {self.state.step}: training "
                "diverged; lower the learning rate (--lr)"
            )
        if not self.is_writer:  # data parallel: every rank holds the same state
            return
        atomic_save(
            {
                "modules": modules,
                "params": params,
                "inference": self.experiment.inference.state_dict(),
                "trainer": asdict(self.state),
                "shuffle": self.shuffle.get_state(),
                "rng": rng_state(),
                "schedulers": [sched.state_dict() for sched in self.schedulers],
                "metadata": self.metadata,
            },
            self.out_dir / name,
            keep_previous=name == CHECKPOINT_NAME,
        )

    def restore(self, path: str | Path, set_rng: bool = True) -> dict:
        """Load a checkpoint; the next :meth:`fit` continues exactly where it stopped.

        Restores the modules, the Pyro params outside them (into Pyro's param store:
        :mod:`~pyro_lvm.experiments.params`), the inference state, the loop's position
        and, with ``set_rng``, the global random generators (else they are kept in
        :attr:`saved_rng`). Returns the checkpoint's ``metadata``. A checkpoint whose
        tensors do not fit the experiment (another architecture) is a one-line
        :class:`~pyro_lvm.experiments.checkpoint.CheckpointError`.
        """
        ckpt = load_checkpoint(path, map_location=self.device)
        try:
            self.experiment.modules.load_state_dict(ckpt["modules"])
            load_param_store_state(ckpt.get("params", {}), self.device)
            self.experiment.inference.load_state_dict(ckpt["inference"])
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()
            detail = next(
                (ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else ""
            )
            raise CheckpointError(
                f"{path} does not fit this model ({detail}): the config was edited or "
                "belongs to another run; restore config.json or start a new run"
            ) from None
        for sched, state in zip(self.schedulers, ckpt.get("schedulers", [])):
            sched.load_state_dict(state)
        self.state = TrainerState(**ckpt["trainer"])
        self.shuffle.set_state(ckpt["shuffle"])
        #: the global generators' states saved with the restored checkpoint
        self.saved_rng = ckpt["rng"]
        if set_rng:
            set_rng_state(ckpt["rng"])
        return ckpt.get("metadata", {})

    def _check_health(self, record: dict) -> None:
        seen = {w["kind"] for w in self.state.warnings}
        steps = (r["step_size"] for r in self.state.steps if "step_size" in r)
        moves = (r["move"] for r in self.state.steps if "move" in r)
        firsts = next(steps, None), next(moves, None)
        for issue in check_epoch(record, self.state.first_loss, *firsts):
            if issue.kind not in seen:
                seen.add(issue.kind)
                self.state.warnings.append(issue._asdict())
                warnings.warn(issue.message, RuntimeWarning, stacklevel=3)

    # -- the loop ---------------------------------------------------------------------
    def _batches(self) -> list[torch.Tensor]:
        gen = torch.Generator().set_state(self.state.shuffle_state)
        return list(torch.randperm(self.data.num_train, generator=gen).split(self.batch_size))

    def _step(self, idx: torch.Tensor) -> float:
        x = self.data.train_x[idx].to(self.device)
        if self.data.binary_probs:
            x = binarize(x)  # the union batch: the global generator stays in step on all ranks
        inference = self.experiment.inference
        with self._shard(len(idx)) as local:
            x, idx = x[local], idx[local]
            if self.experiment.pass_index:
                return inference.step(x, idx.to(self.device))
            return inference.step(x)

    @contextlib.contextmanager
    def _shard(self, rows: int):
        """Data parallel: yields the slice of this rank's rows of a batch of ``rows``,
        inside the collective and (unless the inference shares its draws) this rank's own
        random stream; a single process gets every row."""
        if self.collective is None:
            yield slice(None)
            return
        local = slice(*shard_bounds(rows, self.collective.rank, self.collective.world_size))
        if getattr(self.experiment.inference, "data_parallel_rng", "per_rank") == "shared":
            with data_parallel(self.collective):
                yield local
        else:
            with self.rank_stream(tag=self.state.step):
                yield local

    def fit(
        self,
        epochs: int,
        on_step: Callable[[TrainerState, float], None] | None = None,
        on_epoch: Callable[[TrainerState, dict], None] | None = None,
    ) -> TrainerState:
        """Train until ``epochs`` epochs are done (counting epochs already done).

        ``on_step(state, loss_per_datapoint)`` and ``on_epoch(state, record)`` are hooks
        for progress bars and loggers. Raises
        :class:`~pyro_lvm.infer.diagnostics.DivergenceError` on a non-finite loss without
        overwriting the last checkpoint; on ``KeyboardInterrupt`` saves a checkpoint of
        the exact position, then re-raises. Setting :attr:`stop_requested` stops after
        the current step, so the saved position is exact.
        """
        st = self.state
        mid_step = False
        try:
            while st.epoch < epochs and not st.stopped_early:
                if st.batch == 0:
                    st.shuffle_state = self.shuffle.get_state()
                    torch.randperm(self.data.num_train, generator=self.shuffle)
                    st.epoch_loss_sum, st.epoch_count = 0.0, 0
                batches = self._batches()
                while st.batch < len(batches):
                    idx = batches[st.batch]
                    t0 = time.perf_counter()
                    mid_step = True
                    loss = self._step(idx)
                    mid_step = False
                    st.train_seconds += time.perf_counter() - t0
                    st.batch += 1
                    st.step += 1
                    st.epoch_loss_sum += loss
                    st.epoch_count += len(idx)
                    if st.first_loss is None:
                        st.first_loss = loss / len(idx)
                    record = {"step": st.step, "loss": loss / len(idx)}
                    if st.step % self.log_metrics_every == 0:
                        record.update(self.experiment.inference.metrics())
                    st.steps.append(record)
                    if on_step is not None:
                        on_step(st, loss / len(idx))
                    if self.stop_requested:
                        raise KeyboardInterrupt
                epoch_record = {
                    "epoch": st.epoch + 1,
                    "train_loss": st.epoch_loss_sum / max(st.epoch_count, 1),
                    **self.experiment.inference.metrics(),
                }
                if self.validation_x is not None:
                    epoch_record["val_loss"] = self.validation_loss()
                st.history.append(epoch_record)
                self._check_health(epoch_record)
                for sched in self.schedulers:
                    sched.step()
                st.epoch += 1
                st.batch = 0
                improved = self._track_best(epoch_record)
                self.save()
                if improved:
                    self.save(BEST_NAME)
                if on_epoch is not None:
                    on_epoch(st, epoch_record)
                if self.early_stopping and st.epoch - st.best_epoch >= self.early_stopping:
                    st.stopped_early = True
                    break
        except KeyboardInterrupt:
            if not mid_step:  # a half-done step has no exact position: keep the last one
                self.save()
            raise
        return st

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Loss per datapoint of ``inference.evaluate_loss`` on the validation data."""
        total = 0.0
        inference = self.experiment.inference
        with self.rank_stream(tag=-1 - self.state.epoch):
            for x in self._validation_batches():
                x = x.to(self.device)
                if self.experiment.pass_index:
                    # per-datapoint state (baselines) belongs to training rows only
                    total += inference.evaluate_loss(x, None)
                else:
                    total += inference.evaluate_loss(x)
            # data parallel: every rank summed its share of the rows
            total = float(reduce_sum(torch.tensor(total, dtype=torch.float64)))
        return total / self.validation_x.shape[0]

    @contextlib.contextmanager
    def rank_stream(self, tag: int):
        """Data parallel: run the block inside the collective with this rank's own random
        stream (the global one stays in step across ranks); nothing in a single process."""
        if self.collective is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with data_parallel(self.collective), torch.random.fork_rng(devices=devices):
            torch.manual_seed(rank_seed(self.seed, tag, self.collective.rank))
            yield

    def _validation_batches(self) -> list[torch.Tensor]:
        """The validation rows in batches; data parallel, this rank's contiguous share in
        as many batches as every other rank's (the losses are sums, so any split works)."""
        if self.collective is None:
            return list(self.validation_x.split(self.batch_size))
        rank, world = self.collective.rank, self.collective.world_size
        n = self.validation_x.shape[0]
        share = self.validation_x[slice(*shard_bounds(n, rank, world))]
        num_batches = -(-shard_bounds(n, 0, world)[1] // self.batch_size)
        return [b for b in share.tensor_split(num_batches) if b.shape[0]]

    def _track_best(self, record: dict) -> bool:
        loss = record.get("val_loss", record["train_loss"])
        st = self.state
        if not math.isfinite(loss) or (st.best_loss is not None and loss >= st.best_loss):
            return False
        st.best_loss, st.best_epoch = loss, st.epoch
        return True

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.state.train_seconds / max(self.state.step, 1)
