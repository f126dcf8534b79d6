"""Process-group setup and the few collectives the trainer needs.

One process or many, the run always has a process group (DeepSpeed needs one): a lone process
gets a single-rank group on an in-memory store (no port to race for). Launch many with `torchrun`, `deepspeed` or a
hostfile; their environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is used as is. Under `srun` the
tasks' SLURM variables are mapped to those first (runtime/slurm.py).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError
from . import slurm
from .slurm import adopt_slurm_ranks


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str | None = None) -> Dist:
    """Joins (or creates) the process group: NCCL on GPUs, gloo on CPU (or the given backend)."""
    # srun tasks: RANK/WORLD_SIZE/... from SLURM_PROCID/SLURM_NTASKS/... (no-op otherwise; the CLI did it already)
    from_slurm = bool(adopt_slurm_ranks()) or slurm.under_srun({k: v for k, v in os.environ.items() if k != "RANK"})
    # one process (no launcher, or a launcher of one): a 1-rank group whatever the environment holds,
    # also when it inherited RANK from a parent that ran one itself
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process LOCAL_RANK={local_rank} has no GPU: this node shows "
                            f"{torch.cuda.device_count()} CUDA device(s); launch at most that many processes per "
                            "node (--nproc_per_node / --num_gpus), or set CUDA_VISIBLE_DEVICES= to run on CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = backend or "nccl"
    else:
        device = torch.device("cpu")
        backend = backend or "gloo"
    if not dist.is_initialized():  # DeepSpeed adopts this group; evaluation needs no DeepSpeed at all
        device_id = device if backend == "nccl" else None
        if alone:  # an in-memory store: no port to pick, so no race with other jobs for one
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
        else:  # a bounded wait: a rank that died or hangs ends the job in minutes, not gloo's default 30
            timeout = collective_timeout_s()
            try:
                dist.init_process_group(backend=backend, device_id=device_id,
                                        timeout=datetime.timedelta(seconds=timeout))
            except dist.DistStoreError as e:
                hint = ("a command run directly in a batch script is one task: put srun before it, or set "
                        f"{slurm.MODE_ENV}=off" if from_slurm else "start every rank with the same MASTER_ADDR/PORT")
                raise UserError(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: the other ranks did "
                                f"not join within {timeout:g} s ({str(e).splitlines()[0]}); {hint}") from None
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


TIMEOUT_ENV = "BLIP3O_FAST_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600  # longer than any checkpoint save or evaluation one rank may do while the others wait


def collective_timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def is_peer_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when another rank is gone or does not answer in time."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out", "Broken pipe",
        "NCCL communicator was aborted", "Socket Timeout"))


def shutdown() -> None:
    """Leaves the process group, if one was joined. Without it gloo's threads outlive Python's finalisation, and a
    rank that exits as its peer does can die of `terminate called without an active exception` (SIGABRT)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when flag is true on any rank (so all ranks take the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(obj):
    """Rank 0's value of a small picklable object, on every rank (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each scalar (one all-reduce for all of them)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, rank, micro-batch): stable across runs and
    machines, unlike Python's hash()."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(device: torch.device, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derived_seed(*parts))
    return g
