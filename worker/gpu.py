"""What card (or CPU) this worker renders on: recorded in every job's metadata."""

from __future__ import annotations

import socket

import torch

from shared.metadata import WorkerInfo

_BYTES_PER_GIB = 1024**3


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def probe_device(device: str, node: str) -> WorkerInfo:
    """Name and memory of `device`; fails clearly when a CUDA device is asked for and absent."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} asked for, but torch sees no CUDA GPU")
        props = torch.cuda.get_device_properties(dev)
        return WorkerInfo(
            node=node,
            hostname=socket.gethostname(),
            device=str(dev),
            gpu_name=props.name,
            vram_gib=round(props.total_memory / _BYTES_PER_GIB, 2),
        )
    return WorkerInfo(node=node, hostname=socket.gethostname(), device=str(dev), gpu_name=None, vram_gib=None)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so phase timings measure the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
