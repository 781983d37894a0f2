"""The host copy a gpu-swap worker keeps (worker/model/host_mirror.py): packed into power-of-two slabs, since the
pinned allocator rounds each allocation up to one; every tensor's copy has its dtype, shape and values."""

from __future__ import annotations

import pytest
import torch

from fluxfarm.worker.model import host_mirror
from fluxfarm.worker.model.host_mirror import HostMirror, packed_host_copies

DTYPES = (torch.bfloat16, torch.float32, torch.uint8, torch.float8_e4m3fn, torch.bool, torch.int64)


def _tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 7), (0,), (), (4096,), (33, 65), (1,), (2000, 3)]
    made = []
    for index, shape in enumerate(shapes * 3):
        values = torch.randn(shape, generator=generator) * 10
        made.append(values.to(DTYPES[index % len(DTYPES)]))
    return made


def _storages(copies: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in copies}


@pytest.mark.parametrize("slab", [1 << 30, 1 << 14, 1 << 12])
def test_copies_are_equal_views_of_few_power_of_two_slabs(slab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_mirror, "SLAB_BYTES", slab)
    tensors = _tensors()
    copies = packed_host_copies(tensors, pin=False)
    for tensor, copy in zip(tensors, copies, strict=True):
        assert (copy.dtype, copy.shape) == (tensor.dtype, tensor.shape)
        assert torch.equal(copy.float(), tensor.float())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in copies}
    payload = sum(t.numel() * t.element_size() for t in tensors)
    oversize = [t for t in tensors if t.numel() * t.element_size() > slab]
    if slab == 1 << 30:
        assert len(storages) == 1, "everything fits one slab"
    assert all(size & (size - 1) == 0 for size in storages.values() if size <= slab), "slabs are powers of two"
    assert len(storages) <= payload // slab + 2 + 2 * len(oversize)
    assert sum(storages.values()) < 2 * payload + slab


def test_a_module_points_at_its_packed_copy_and_comes_back_unchanged() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    module.register_buffer("steps", torch.arange(5))
    before = {name: t.clone() for name, t in module.state_dict().items()}
    mirror = HostMirror(module)
    assert len(_storages([t for t in module.state_dict().values()])) == 1, "one slab holds the small module"
    mirror.to_device("cpu")
    module[0].weight.data.mul_(2)  # a fused LoRA changes the weights in place on the device
    mirror.keep_current()
    mirror.to_host()
    after = module.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"] * 2)
    assert all(torch.equal(after[name], before[name]) for name in before if name != "0.weight")
