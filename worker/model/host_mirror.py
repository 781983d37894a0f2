"""Move a module between host and GPU without copying it back each time.

Weights change only when a LoRA set is fused (which copies them back with `keep_current`), so a
pinned host copy made once serves every swap:
sending the module "to the host" only points its tensors back at that copy (no transfer), and
bringing it to the GPU is one pinned host-to-device copy per tensor (~2x the rate of pageable
memory). A gpu-swap worker swaps the transformer out and the text encoders in for every encode phase.
"""

from __future__ import annotations

import torch
from torch import nn


class HostMirror:
    """A pinned host copy of `module`'s parameters and buffers, and the two moves that use it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        pin = torch.cuda.is_available()
        self._host: dict[str, torch.Tensor] = {}
        for name, tensor in self._tensors():
            host = tensor.detach().cpu()  # no copy when already on the host
            host = host.pin_memory() if pin else host
            if tensor.device.type == "cpu":
                tensor.data = host  # one host copy, not two
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
