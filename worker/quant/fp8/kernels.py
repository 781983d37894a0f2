"""Per-row dynamic fp8 (e4m3) quantization of activations, one pass over the input.

The fp8 tensor-core matmul takes both operands in e4m3 with one float32 scale per row of each. Done
with torch ops this is an abs, a max, a divide and a cast (four kernels, four trips through memory)
before every Linear; this kernel reads the row once and writes the e4m3 row and its scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(x, q, scales, cols, stride, BLOCK: tl.constexpr, LIMIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    values = tl.load(x + row * stride + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(values), axis=0), 1e-12) / LIMIT
    scaled = tl.clamp(values / scale, -LIMIT, LIMIT)
    tl.store(q + row * cols + offsets, scaled.to(q.dtype.element_ty), mask=mask)
    tl.store(scales + row, scale)


def launch_quantize_rows(x, q, scales) -> None:
    """x: (rows, cols) with unit column stride; q: (rows, cols) fp8 contiguous; scales: (rows,) float32.
    Each row is scaled so that its largest magnitude lands on q's largest finite value."""
    rows, cols = x.shape
    block = triton.next_power_of_2(cols)
    warps = max(1, min(16, block // 1024))
    _rows_kernel[(rows,)](x, q, scales, cols, x.stride(0), BLOCK=block, LIMIT=torch.finfo(q.dtype).max, num_warps=warps)
