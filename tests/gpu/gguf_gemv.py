"""The fused GGUF GEMV against dequantize + cuBLAS at FLUX's modulation shapes, one input row per
image (device diagnostic). python3 tests/gpu/gguf_gemv.py"""

from __future__ import annotations

import torch

from fluxfarm.worker.model.gpu import time_calls
from fluxfarm.worker.quant.gguf.blocks import quantize_rows
from fluxfarm.worker.quant.gguf.linear import dequantize_gguf, gemv_gguf

SHAPES = [(18432, 3072), (9216, 3072), (6144, 3072)]
"""(out, in) of the double blocks' norm1, the single blocks' norm and norm_out."""


def compare(qtype: str, rows: int, cols: int, batch: int) -> str:
    blocks = quantize_rows(torch.randn(rows, cols) * 0.02, qtype).cuda()
    weight = dequantize_gguf(blocks, qtype, rows, cols, torch.bfloat16)
    x = torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16)
    fused = time_calls(lambda: gemv_gguf(blocks, x, None, qtype, rows), "cuda", 200, 20)
    split = time_calls(lambda: x @ dequantize_gguf(blocks, qtype, rows, cols, torch.bfloat16).t(), "cuda", 200, 20)
    got = gemv_gguf(blocks, x, None, qtype, rows).float()
    want = (x @ weight.t()).float()
    error = ((got - want).norm() / want.norm()).item()
    return (
        f"{qtype} {rows}x{cols} batch {batch}: fused {fused * 1e6:.0f} us "
        f"({blocks.numel() / fused / 1e9:.0f} GB/s of blocks), dequantize+matmul {split * 1e6:.0f} us, "
        f"rel. difference {error:.1e}"
    )


def main() -> None:
    for qtype in ("Q8_0", "Q4_K", "Q6_K"):
        for rows, cols in SHAPES:
            for batch in (1, 2, 4):
                print(compare(qtype, rows, cols, batch), flush=True)


if __name__ == "__main__":
    main()
