"""GGUF block dequantization in Triton: one kernel launch a weight, straight from the file's bytes.

diffusers dequantizes GGUF weights with a dozen torch ops per layer per step (views, shifts, masks,
casts, each a kernel and a round trip through memory); on FLUX that costs 40-150% of a bf16 step.
These kernels read each block once and write the weight in the compute dtype once, so the cost is
the memory traffic of the quantized bytes plus one bf16 write, about 10 ms a 1024^2 step on an H100.

Every kernel maps one output element to the bytes ggml's reference `dequantize_row_*` reads for it
(ggml-quants.c); tests compare them with gguf-py's numpy dequantizer under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Values per program: enough work to hide memory latency, small enough for registers.
_VALUES_PER_PROGRAM = 4096


@triton.jit
def _u8(src, offsets, mask):
    return tl.load(src + offsets, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(src, offsets, mask):
    """A little-endian float16 at a byte offset, as float32."""
    bits = _u8(src, offsets, mask) | (_u8(src, offsets + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k4_scale_min(src, base, sub, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block `sub` (0..7) from the 12 packed bytes at base+4."""
    low = _u8(src, base + 4 + sub, mask)
    plus4 = _u8(src, base + 8 + sub, mask)
    minus4 = _u8(src, base + 4 + tl.maximum(sub - 4, 0), mask)
    first = sub < 4
    scale = tl.where(first, low & 63, (plus4 & 15) | ((minus4 >> 6) << 4))
    minimum = tl.where(first, plus4 & 63, (plus4 >> 4) | ((low >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def decode_blocks(src, block, e, mask, QTYPE: tl.constexpr, SIZE: tl.constexpr):
    """Value `e` (a row of offsets within a block) of each block in `block` (a column), as float32."""
    base = block.to(tl.int64) * SIZE
    if QTYPE == "Q8_0":
        d = _f16(src, base, mask)
        q = _u8(src, base + 2 + e, mask)
        y = d * (q - ((q >> 7) << 8)).to(tl.float32)
    elif QTYPE == "Q4_0":
        q = (_u8(src, base + 2 + e % 16, mask) >> (4 * (e // 16))) & 15
        y = _f16(src, base, mask) * (q - 8).to(tl.float32)
    elif QTYPE == "Q4_1":
        q = (_u8(src, base + 4 + e % 16, mask) >> (4 * (e // 16))) & 15
        y = _f16(src, base, mask) * q.to(tl.float32) + _f16(src, base + 2, mask)
    elif QTYPE == "Q5_0":
        high = (_u8(src, base + 2 + e // 8, mask) >> (e % 8)) & 1
        q = ((_u8(src, base + 6 + e % 16, mask) >> (4 * (e // 16))) & 15) | (high << 4)
        y = _f16(src, base, mask) * (q - 16).to(tl.float32)
    elif QTYPE == "Q5_1":
        high = (_u8(src, base + 4 + e // 8, mask) >> (e % 8)) & 1
        q = ((_u8(src, base + 8 + e % 16, mask) >> (4 * (e // 16))) & 15) | (high << 4)
        y = _f16(src, base, mask) * q.to(tl.float32) + _f16(src, base + 2, mask)
    elif QTYPE == "Q6_K":
        half, quad, lane = e // 128, (e % 128) // 32, e % 32
        low = (_u8(src, base + half * 64 + lane + (quad % 2) * 32, mask) >> (4 * (quad // 2))) & 15
        high = (_u8(src, base + 128 + half * 32 + lane, mask) >> (2 * quad)) & 3
        scale = _u8(src, base + 192 + half * 8 + lane // 16 + 2 * quad, mask)
        scale = scale - ((scale >> 7) << 8)
        y = _f16(src, base + 208, mask) * (scale * ((low | (high << 4)) - 32)).to(tl.float32)
    elif QTYPE == "Q5_K" or QTYPE == "Q4_K":
        chunk, upper, lane = e // 64, (e % 64) // 32, e % 32
        sub = 2 * chunk + upper
        scale, minimum = _k4_scale_min(src, base, sub, mask)
        if QTYPE == "Q5_K":
            q = (_u8(src, base + 48 + chunk * 32 + lane, mask) >> (4 * upper)) & 15
            q = q | (((_u8(src, base + 16 + lane, mask) >> sub) & 1) << 4)
        else:
            q = (_u8(src, base + 16 + chunk * 32 + lane, mask) >> (4 * upper)) & 15
        y = _f16(src, base, mask) * scale * q.to(tl.float32) - _f16(src, base + 2, mask) * minimum
    elif QTYPE == "Q3_K":
        half, pair, upper, lane = e // 128, (e % 128) // 32, (e % 32) // 16, e % 16
        low = (_u8(src, base + 32 + half * 32 + upper * 16 + lane, mask) >> (2 * pair)) & 3
        high = (_u8(src, base + e % 32, mask) >> (half * 4 + pair)) & 1
        sub = half * 8 + 2 * pair + upper
        scale_low = (_u8(src, base + 96 + sub % 8, mask) >> (4 * (sub // 8))) & 15
        scale_high = (_u8(src, base + 104 + sub % 4, mask) >> (2 * (sub // 4))) & 3
        scale = (scale_low | (scale_high << 4)) - 32
        y = _f16(src, base + 108, mask) * (scale * (low - 4 + 4 * high)).to(tl.float32)
    else:  # Q2_K
        half, pair, upper, lane = e // 128, (e % 128) // 32, (e % 32) // 16, e % 16
        q = (_u8(src, base + 16 + half * 32 + upper * 16 + lane, mask) >> (2 * pair)) & 3
        packed = _u8(src, base + half * 8 + 2 * pair + upper, mask)
        y = _f16(src, base + 80, mask) * (packed & 15).to(tl.float32) * q.to(tl.float32)
        y = y - _f16(src, base + 82, mask) * (packed >> 4).to(tl.float32)
    return y


@triton.jit
def _dequant_kernel(
    src, dst, n_blocks, QTYPE: tl.constexpr, QK: tl.constexpr, SIZE: tl.constexpr, BLOCKS: tl.constexpr
):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    e = tl.arange(0, QK)[None, :]
    mask = block < n_blocks
    y = decode_blocks(src, block, e, mask, QTYPE, SIZE)
    tl.store(dst + block.to(tl.int64) * QK + e, y.to(dst.dtype.element_ty), mask=mask)


def launch_dequantize(raw, out, qtype: str) -> None:
    """Dequantize the contiguous uint8 blocks `raw` into the contiguous tensor `out` (any float dtype)."""
    values, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = raw.numel() // size
    blocks_per_program = _VALUES_PER_PROGRAM // values
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _dequant_kernel[grid](raw, out, n_blocks, QTYPE=qtype, QK=values, SIZE=size, BLOCKS=blocks_per_program)
