"""fp8 GEMM rates at FLUX's shapes: row-wise scales (the fp8 level's layers) against one scale per
tensor and against bf16 (device diagnostic). python3 tests/gpu/fp8_gemm.py"""

from __future__ import annotations

import torch

from fluxfarm.worker.model.gpu import time_calls

SHAPES = [(4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288), (4096, 12288, 3072), (4608, 15360, 3072)]


def rates(m: int, k: int, n: int) -> str:
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    rows, cols = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    one = torch.ones((), device="cuda")
    runs = {
        "rowwise": lambda: torch._scaled_mm(a, b.t(), scale_a=rows, scale_b=cols, out_dtype=torch.bfloat16),
        "tensorwise": lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "bf16": lambda: a16 @ b16.t(),
    }
    flops = 2 * m * n * k
    return ", ".join(f"{name} {flops / time_calls(run, 'cuda', 50, 5) / 1e12:.0f}" for name, run in runs.items())


def main() -> None:
    for m, k, n in SHAPES:
        print(f"M={m} K={k} N={n} TFLOP/s:", rates(m, k, n), flush=True)


if __name__ == "__main__":
    main()
