"""Which cards run the fp8 level's fast paths: named once, for the kernels that check a card and for the VRAM
plan that picks fp8 for one (no torch here: the plan imports it without the GPU stack's weight)."""

from __future__ import annotations

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
"""fp8 tensor cores (`torch._scaled_mm`): Ada (8.9) and Hopper (9.0) on; older cards upcast fp8 weights instead."""
FP8_ATTENTION_MIN_COMPUTE_CAPABILITY = (9, 0)
"""cuDNN's fp8 flash attention: Hopper on; elsewhere the fp8 level's attention stays bf16."""
