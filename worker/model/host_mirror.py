"""Move a module between host and GPU without copying it back each time.

Weights change only when a LoRA set is fused (which copies them back with `keep_current`), so a
pinned host copy made once serves every swap:
sending the module "to the host" only points its tensors back at that copy (no transfer), and
bringing it to the GPU is one pinned host-to-device copy per tensor (~2x the rate of pageable
memory). A gpu-swap worker swaps the transformer out and the text encoders in for every encode phase.

The copy is packed into slabs of SLAB_BYTES, a power of two: PyTorch's pinned-memory allocator rounds every
allocation up to the next power of two, so pinning each tensor on its own took up to twice its bytes (FLUX.2
[dev]'s Q4_K transformer and fp8 encoder, 34 GiB, held ~53 GiB of pinned host memory and the host ran out).
"""

from __future__ import annotations

import torch
from torch import nn

SLAB_BYTES = 1 << 30
"""Slab size: larger than any one FLUX weight (FLUX.2 [dev]'s largest bf16 matrix is 0.63 GiB), a power of two."""
_ALIGN = 512
"""Every tensor starts at a multiple of this within its slab (any dtype's alignment, and DMA-friendly)."""


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def _slab_sizes(sizes: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Slab sizes and each tensor's (slab, offset), packed in order; a tensor over SLAB_BYTES gets a slab of its
    own, and a last slab shrinks to the power of two that holds what it holds."""
    slabs: list[int] = []
    places: list[tuple[int, int]] = []
    used = SLAB_BYTES  # bytes taken in the last slab: "full" starts a new one
    for size in sizes:
        if size > SLAB_BYTES:
            slabs.append(size)
            places.append((len(slabs) - 1, 0))
            used = SLAB_BYTES
            continue
        if used + size > SLAB_BYTES:
            slabs.append(SLAB_BYTES)
            used = 0
        places.append((len(slabs) - 1, used))
        used += _aligned(size)
    if used < SLAB_BYTES:
        slabs[-1] = max(_ALIGN, 1 << (max(used, 1) - 1).bit_length())
    return slabs, places


def packed_host_copies(tensors: list[torch.Tensor], pin: bool) -> list[torch.Tensor]:
    """Host copies of `tensors` (same dtypes and shapes), views into a few slabs, pinned when `pin`."""
    slabs, places = _slab_sizes([_nbytes(t) for t in tensors])
    buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for size in slabs]
    copies: list[torch.Tensor] = []
    for tensor, (slab, offset) in zip(tensors, places, strict=True):
        view = buffers[slab][offset : offset + _nbytes(tensor)].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach())
        copies.append(view)
    return copies


def release_pinned_cache() -> None:
    """Give the pinned host memory PyTorch keeps cached after its tensors are freed back to the system. A worker
    reuses it (its next load's slabs are the same sizes); a process that pinned copies for one configuration and
    then runs another that pins none (the bench's 4-bit recipe after a swapping plan: ~35 GiB for FLUX.2 [dev])
    would otherwise hold it for nothing."""
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


class HostMirror:
    """A pinned host copy of `module`'s parameters and buffers, and the two moves that use it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = self._tensors()
        copies = packed_host_copies([tensor for _, tensor in named], pin=torch.cuda.is_available())
        self._host: dict[str, torch.Tensor] = {}
        for (name, tensor), host in zip(named, copies, strict=True):
            if tensor.device.type == "cpu":
                tensor.data = host  # one host copy, not two: the module's own host tensors are freed
            self._host[name] = host

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.module.named_parameters(), *self.module.named_buffers()]

    def to_host(self) -> None:
        """Free the module's device memory: its tensors become the host copies again."""
        for name, tensor in self._tensors():
            tensor.data = self._host[name]

    def to_device(self, device: str | torch.device) -> None:
        for name, tensor in self._tensors():
            tensor.data = self._host[name].to(device, non_blocking=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def keep_current(self) -> None:
        """Copy the module's tensors, changed in place on the device (a fused LoRA), into the host copy."""
        for name, tensor in self._tensors():
            host = self._host[name]
            if tensor.data_ptr() != host.data_ptr():
                host.copy_(tensor.detach())
