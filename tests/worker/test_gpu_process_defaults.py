"""Every GPU command gets the worker image's CUDA allocator setting (expandable segments) unless the operator
chose one: a pip-installed worker, the bench and the VRAM probe then use memory as the image's worker does."""

from __future__ import annotations

import os

import pytest

from fluxfarm.worker.cli import ALLOCATOR_DEFAULT, _require_gpu_stack


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ({}, {"PYTORCH_CUDA_ALLOC_CONF": ALLOCATOR_DEFAULT}),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}),
        ({"PYTORCH_ALLOC_CONF": "backend:native"}, {"PYTORCH_ALLOC_CONF": "backend:native"}),
    ],
)
def test_the_allocator_default_yields_to_the_operators_setting(
    given: dict[str, str], want: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # records the value to restore, whatever it was
        monkeypatch.delenv(name)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    _require_gpu_stack()
    seen = {name: os.environ[name] for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if name in os.environ}
    assert seen == want
