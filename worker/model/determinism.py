"""FLUXFARM_DETERMINISTIC: what makes two renders of one job on one card differ, switched off.

Batching is one source (a batch's rows may round differently: the settings hold a deterministic worker to one
job a batch); kernels are the other. torch's deterministic mode makes every op that has a deterministic
implementation use it (and warns about the rest), cuDNN stops choosing among algorithms by timing, and cuBLAS
gets a fixed workspace, which it needs for repeatable results (the variable is read when cuBLAS starts, so
this runs before the model loads)."""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def apply_determinism(deterministic: bool) -> None:
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
