"""Which GGUF block types and input shapes the Triton kernels take, importable without Triton.

The loader asks these questions on every worker, Triton or not (a CPU worker, a torch build without
Triton); the kernel modules themselves import Triton and load only where a kernel runs.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

KERNEL_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
"""The ggml block types the dequantization kernel decodes; their sizes come from gguf-py's GGML_QUANT_SIZES."""
GEMV_MAX_ROWS = 4
"""Inputs with more rows (tokens x images) than this go through dequantize + cuBLAS instead."""
GEMV_MAX_COLS = 8192
"""Weights wider than this too: one program holds a whole row of the weight in registers."""


def gemv_fits(qtype: str, rows: int, in_features: int) -> bool:
    """Whether the fused dequantize + GEMV kernel takes an input of `rows` rows against a weight `in_features` wide."""
    values, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return 1 <= rows <= GEMV_MAX_ROWS and in_features <= GEMV_MAX_COLS and in_features % values == 0
