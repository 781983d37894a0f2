"""Fused GGUF dequantize + matrix-vector product, for inputs of a few rows.

FLUX's modulation layers (27% of its weights) see one row per image: the timestep/guidance vector.
Dequantize-then-matmul moves about 5 bytes per weight for them (the blocks in, a bf16 copy out and in
again); this kernel reads the blocks once (~1 byte per weight at Q8_0) and sums in float32. Each
program decodes whole rows of the weight with the same `decode_blocks` as the dequantization kernel, so
the two cannot disagree on a block format.
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fluxfarm.worker.quant.gguf.dequant_kernel import decode_blocks

_VALUES_PER_PROGRAM = 4096


@triton.jit
def _gemv_kernel(
    src,
    x,
    out,
    bias,
    n_out,
    HAS_BIAS: tl.constexpr,
    M: tl.constexpr,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    SIZE: tl.constexpr,
    BLOCKS_PER_ROW: tl.constexpr,
    BLOCKS_P2: tl.constexpr,
    ROWS: tl.constexpr,
):
    # One flat index over (weight row r of this program, block j of that row); blocks padded to a power of 2.
    flat = tl.arange(0, ROWS * BLOCKS_P2)
    j = flat % BLOCKS_P2
    row = tl.program_id(0) * ROWS + flat // BLOCKS_P2
    valid = ((j < BLOCKS_PER_ROW) & (row < n_out))[:, None]
    e = tl.arange(0, QK)[None, :]
    w = decode_blocks(src, (row.to(tl.int64) * BLOCKS_PER_ROW + j)[:, None], e, valid, QTYPE, SIZE)
    cols = j[:, None] * QK + e
    rows_out = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    out_mask = rows_out < n_out
    for m in tl.static_range(M):
        xv = tl.load(x + m * (BLOCKS_PER_ROW * QK) + cols, mask=valid, other=0.0).to(tl.float32)
        y = tl.sum(tl.reshape(tl.sum(w * xv, axis=1), (ROWS, BLOCKS_P2)), axis=1)
        if HAS_BIAS:
            y += tl.load(bias + rows_out, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out + m * n_out + rows_out, y.to(out.dtype.element_ty), mask=out_mask)


def launch_gemv(raw, x, bias, out, qtype: str) -> None:
    """out[m] = W @ x[m] (+ bias) for the (n_out, K) weight in GGUF blocks `raw`; x is (M, K) contiguous."""
    values, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows_in, width = x.shape
    n_out = out.shape[1]
    blocks_per_row = width // values
    blocks_p2 = triton.next_power_of_2(blocks_per_row)
    rows_per_program = max(1, _VALUES_PER_PROGRAM // (blocks_p2 * values))
    _gemv_kernel[(triton.cdiv(n_out, rows_per_program),)](
        raw,
        x,
        out,
        bias if bias is not None else out,
        n_out,
        HAS_BIAS=bias is not None,
        M=rows_in,
        QTYPE=qtype,
        QK=values,
        SIZE=size,
        BLOCKS_PER_ROW=blocks_per_row,
        BLOCKS_P2=blocks_p2,
        ROWS=rows_per_program,
    )
