"""Multi-process training under ``torchrun``: the process group, this process's rank,
and the few collectives the trainer needs. One process without torchrun is a world of
size 1 and every collective is a no-op."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from aecore.errors import ConfigError


def _destroy_group_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_group_serves(device: torch.device) -> None:
    """The process group in place has a backend for ``device`` (one made for a CUDA fit,
    NCCL, has none for CPU tensors: the fit failed deep inside torch)."""
    backend = str(dist.get_backend())
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        served = {part.split(":")[0] for part in backend.split(",")}
    else:
        served = {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}}.get(backend, {device.type})
    if device.type not in served:
        raise ConfigError(
            f"this process's process group ({backend}) has no backend for {device.type} "
            f"tensors, and it cannot be made again under torchrun: fit on "
            f"{' or '.join(sorted(served))}, or create the group yourself before the first "
            f"fit with a backend for each device, e.g. "
            f"torch.distributed.init_process_group('cpu:gloo,cuda:nccl')"
        )


class DistContext:
    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Join the process group torchrun describes in the environment (gloo on CPU,
        NCCL on CUDA), or use one already initialised. A group made here outlives the
        fit, for the process's later fits (creating it again after destroying it fails
        or hangs: torchrun's rendezvous is closed by then), and is destroyed at exit."""
        if not dist.is_available():
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dist.is_initialized():
            _check_group_serves(device)
            return cls(dist.get_rank(), dist.get_world_size(), local_rank)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_group_at_exit)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    def device_for(self, device: torch.device) -> torch.device:
        """This process's device: under torchrun each process takes its local GPU."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Element-wise OR across processes (so every rank takes the same branch)."""
        if not self.active:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather(self, t: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor (e.g. RNG states), on the CPU."""
        if not self.active:
            return [t]
        local = t.to(device=device, dtype=torch.int64)  # every backend reduces int64
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local)
        return [o.to(device="cpu", dtype=t.dtype) for o in out]

    def from_main(self, value):
        """Rank 0's ``value`` (any picklable object) in every process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_weights(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers copied into every process's ``module``."""
        if self.active:
            for t in module.state_dict().values():
                sent = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo has no bool
                dist.broadcast(sent, src=0)
                if sent is not t:
                    t.copy_(sent.bool())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


class _LossModule(torch.nn.Module):
    """DDP hooks into ``forward``: this makes ``model.loss`` the forward it wraps."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(x)


def distributed_loss(model, device: torch.device):
    """``model.loss`` wrapped in DistributedDataParallel (gradients averaged over the
    processes during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        _LossModule(model), device_ids=[device.index] if device.type == "cuda" else None
    )


def check_same_data(dist_ctx: DistContext, summary: dict, device: torch.device) -> None:
    """Refuse a run whose processes were given different training rows: each process
    must pass the whole data set (aecore splits every batch across them). With shards,
    each process trained on part of its own and the copies of the model drifted apart."""
    if not dist_ctx.active:
        return
    mine = [float("nan") if summary.get(k) is None else float(summary[k])
            for k in ("rows", "sum", "sample")]  # fmt: skip
    t = torch.tensor(mine, dtype=torch.float64, device=device)
    every = [torch.empty_like(t) for _ in range(dist_ctx.world)]
    dist.all_gather(every, t)
    rows = [e.cpu() for e in every]
    if all(torch.equal(r.nan_to_num(-1.0), rows[0].nan_to_num(-1.0)) for r in rows):
        return
    # every process refuses alike; none closes the group while another still reads
    dist.barrier()
    seen = "; ".join(
        f"process {i}: {int(r[0])} rows" + ("" if r[1].isnan() else f", sum {float(r[1]):.6g}")
        for i, r in enumerate(rows)
    )
    raise ConfigError(
        f"the processes were given different training data ({seen}): under torchrun every "
        f"process passes the whole data set, and aecore splits each batch across them"
    )


def check_distributed(model, train, config, world: int) -> None:
    """Refuse a multi-process run that cannot work, before any process starts it."""
    name = type(model).__name__
    batch_size = config.batch_size
    if not model.uses_optimizer:
        raise ConfigError(
            f"{name} updates its own parameters (train_step) and does not support "
            f"multi-process training; run it in one process (without torchrun)"
        )
    if train.loader is not None:
        raise ConfigError(
            "under torchrun pass an array, tensor or Dataset rather than a DataLoader: "
            "aecore shards each global batch across the processes itself"
        )
    if batch_size < world:
        raise ConfigError(
            f"batch_size ({batch_size}) must be at least the number of processes ({world})"
        )
    last = train.n % batch_size
    if 0 < last < world:
        raise ConfigError(
            f"the last batch of {train.n} rows at batch_size {batch_size} has {last} "
            f"row(s), fewer than the {world} processes (one would get none): "
            f"choose a batch_size that leaves 0 or at least {world} rows over"
        )
    if config.optimizer == "lbfgs":
        raise ConfigError(
            "optimizer='lbfgs' line-searches on each process's own loss, so processes "
            "would disagree; use it in one process"
        )
