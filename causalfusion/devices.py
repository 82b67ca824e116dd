"""Where the work runs: the device and precision checks every command makes, and the process
group ``torchrun`` sets up. Data, training and sampling all import it; it imports only torch."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist


def check_device(device: str) -> torch.device:
    """A device this machine has: 'cpu', 'cuda' or 'cuda:N' (one clear line otherwise)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (this torch build or no GPU)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def check_precision(precision: str, device: str) -> None:
    if precision == "fp16":  # would need loss scaling, and on CPU it is ~400x slower than fp32
        raise ValueError("fp16 is not supported; use --precision bf16 (same speed on GPUs, no loss scaling) or fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16")
    check_device(device)


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "cpu", force: bool = False) -> DistEnv:
    """Join the process group ``torchrun`` set up (NCCL for CUDA, gloo for CPU).

    Outside torchrun this is world size 1 without a process group, unless ``force`` (FSDP2 needs a
    group even for one process): then a one-process gloo group on a temporary file store.
    """
    cuda = check_device(device).type == "cuda"
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if launched_by_torchrun():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        return DistEnv(dist.get_rank(), dist.get_world_size(), local)
    if force:
        store = dist.FileStore(tempfile.mktemp(prefix="causalfusion_pg_"), 1)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1)
    return DistEnv()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finalize_distributed() -> None:
    """Leave the process group (call once at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
