"""What card (or CPU) this worker renders on: recorded in every job's metadata."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from fluxfarm.shared.metadata import WorkerInfo
from fluxfarm.shared.units import GIB


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
            vram_gib=round(props.total_memory / GIB, 2),
        )
    return WorkerInfo(node=node, hostname=socket.gethostname(), device=str(dev), gpu_name=None, vram_gib=None)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so phase timings measure the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Seconds per phase, with the GPU drained at each boundary (a phase's queued kernels count in it)."""

    def __init__(self, device: str) -> None:
        self._device = device
        self._last = time.perf_counter()

    def lap(self) -> float:
        synchronize(self._device)
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def time_calls(run: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> float:
    """Seconds per call of `run`, after `warmup` calls (allocations, cuDNN plans, compilation)."""
    for _ in range(warmup):
        run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def cap_memory(device: str, budget_gib: float | None) -> None:
    """Let this process allocate at most `budget_gib` on `device` (None lifts the cap): a shared card, or
    a large card standing in for a smaller one."""
    if torch.device(device).type != "cuda":
        return
    total_bytes = card_bytes(device)
    assert total_bytes is not None
    total_gib = total_bytes / GIB
    fraction = 1.0 if budget_gib is None else min(1.0, budget_gib / total_gib)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


@contextmanager
def memory_cap(device: str, budget_gib: float | None) -> Iterator[None]:
    """`cap_memory` for the duration of a block."""
    cap_memory(device, budget_gib)
    try:
        yield
    finally:
        cap_memory(device, None)


def card_bytes(device: str) -> int | None:
    """The card's memory in bytes (before any budget cap); None off CUDA."""
    dev = torch.device(device)
    return int(torch.cuda.get_device_properties(dev).total_memory) if dev.type == "cuda" else None


def vram_peak_bytes(device: str) -> float:
    """Peak memory torch allocated on `device` since the process started (0 off CUDA)."""
    dev = torch.device(device)
    return float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0.0


def compute_capability(device: str) -> str | None:
    """`9.0` for an H100, `8.6` for a 3060: which fast paths (fp8, Triton kernels) the card runs."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(dev)
    return f"{major}.{minor}"
