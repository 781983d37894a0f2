"""GGUF block encoders in torch: the legacy types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) and the K-quants.

gguf-py quantizes the legacy types in numpy (slow for a 12B-parameter model) and cannot make
K-quants at all. The legacy encoders here repeat gguf-py's arithmetic, so their bytes are the same;
the K-quant encoders follow ggml's reference quantizers (`quantize_row_qN_K_ref` and the
`make_qx_quants`, `make_qkx2_quants`, `make_q3_quants` searches they call). All are vectorized over
many blocks at once, so the same code runs on the CPU or, much faster, on a GPU. Each takes float32
blocks shaped (n_blocks, block_size) and returns packed bytes shaped (n_blocks, type_size): the
layout ggml, gguf-py and diffusers read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QK_K = 256
_GROUP_MAX_EPS = 1e-15
_F16_MAX = 65504.0


def _fp16_bytes(value: torch.Tensor) -> torch.Tensor:
    """(n,) float -> (n, 2) little-endian float16 bytes."""
    return value.clamp(-_F16_MAX, _F16_MAX).to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _as_fp16(value: torch.Tensor) -> torch.Tensor:
    """The value as the decoder will see it: rounded through float16."""
    return value.clamp(-_F16_MAX, _F16_MAX).to(torch.float16).to(torch.float32)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last axis, with its sign (ggml's `max`)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def _make_qx_quants_scale(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml `make_qx_quants(n, nmax, x, L, rmse_type=1)`: the best scale of each group (rows of x).

    The search tries 19 scales around nmax/max and keeps the one that maximizes sum(w*x*l)^2 /
    sum(w*l^2) with w = x^2; ties keep the earliest, as ggml does.
    """
    peak = _signed_absmax(x)
    steps = torch.tensor([0, *range(-9, 0), *range(1, 10)], dtype=x.dtype, device=x.device)
    iscale = -(nmax + 0.1 * steps) / torch.where(peak != 0, peak, 1.0).unsqueeze(-1)  # (G, 19)
    levels = torch.round(iscale.unsqueeze(-1) * x.unsqueeze(-2)).clamp(-nmax, nmax - 1)  # (G, 19, n)
    weight = (x * x).unsqueeze(-2)
    sumlx = (weight * x.unsqueeze(-2) * levels).sum(-1)
    suml2 = (weight * levels * levels).sum(-1)
    merit = _safe_div(sumlx * sumlx, suml2)
    merit[..., 1:] = torch.where(suml2[..., 1:] > 0, merit[..., 1:], -torch.inf)
    best = merit.argmax(dim=-1, keepdim=True)
    scale = _safe_div(sumlx.gather(-1, best), suml2.gather(-1, best)).squeeze(-1)
    return torch.where(peak.abs() < _GROUP_MAX_EPS, 0.0, scale)


def _make_qkx2_quants(
    x: torch.Tensor, weight: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml `make_qkx2_quants`: per group, the scale and (positive) min of an affine quantization.

    Starts from the plain min/max fit, then tries nstep+1 scales and solves the weighted least
    squares for (scale, min) with each candidate's levels, keeping the lowest weighted error.
    """
    low = x.min(dim=-1).values.clamp(max=0.0)
    high = x.max(dim=-1).values
    span = high - low
    flat = span == 0
    span = torch.where(flat, 1.0, span)
    sum_w = weight.sum(-1)
    sum_x = (weight * x).sum(-1)

    def error(scale: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        diff = scale.unsqueeze(-1) * levels + offset.unsqueeze(-1) - x.unsqueeze(-2)
        diff = diff.abs() if use_mad else diff * diff
        return (weight.unsqueeze(-2) * diff).sum(-1)

    steps = torch.arange(nstep + 1, dtype=x.dtype, device=x.device)
    iscales = torch.cat([(nmax / span).unsqueeze(-1), (rmin + rdelta * steps + nmax) / span.unsqueeze(-1)], dim=-1)
    levels = torch.round(iscales.unsqueeze(-1) * (x - low.unsqueeze(-1)).unsqueeze(-2)).clamp(0, nmax)  # (G, S, n)
    w = weight.unsqueeze(-2)
    sum_l = (w * levels).sum(-1)
    sum_l2 = (w * levels * levels).sum(-1)
    sum_xl = (w * levels * x.unsqueeze(-2)).sum(-1)
    det = sum_w.unsqueeze(-1) * sum_l2 - sum_l * sum_l
    scale = _safe_div(sum_w.unsqueeze(-1) * sum_xl - sum_x.unsqueeze(-1) * sum_l, det)
    offset = _safe_div(sum_l2 * sum_x.unsqueeze(-1) - sum_l * sum_xl, det)
    positive = offset > 0
    offset = torch.where(positive, 0.0, offset)
    scale = torch.where(positive, _safe_div(sum_xl, sum_l2), scale)
    # Candidate 0 is the plain fit (scale 1/iscale, offset = min), the rest need a solvable system.
    scale[..., 0] = 1.0 / iscales[..., 0]
    offset[..., 0] = low
    err = error(scale, offset, levels)
    err[..., 1:] = torch.where(det[..., 1:] > 0, err[..., 1:], torch.inf)
    best = err.argmin(dim=-1, keepdim=True)
    best_scale = scale.gather(-1, best).squeeze(-1)
    best_offset = offset.gather(-1, best).squeeze(-1)
    return torch.where(flat, 0.0, best_scale), torch.where(flat, -low, -best_offset)


def _make_q3_quants_scale(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml `make_q3_quants(n, nmax, x, L, do_rmse=true)`: a scale per group, refined coordinate-wise."""
    peak = _signed_absmax(x)
    iscale = -nmax / torch.where(peak != 0, peak, 1.0)
    levels = torch.round(iscale.unsqueeze(-1) * x).clamp(-nmax, nmax - 1)
    weight = x * x
    sumlx = (weight * x * levels).sum(-1)
    suml2 = (weight * levels * levels).sum(-1)
    for _ in range(5):
        for i in range(x.shape[-1]):
            xi, wi, li = x[..., i], weight[..., i], levels[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = torch.round(xi * _safe_div(sl2, slx)).clamp(-nmax, nmax - 1)
            slx_new = slx + wi * xi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            accept = (slx > 0) & (new_l != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            levels[..., i] = torch.where(accept, new_l, li)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
    return torch.where(peak.abs() < _GROUP_MAX_EPS, 0.0, _safe_div(sumlx, suml2))


def _pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """(B, 256) values 0..3 -> (B, 64): byte 32h+l holds levels 128h+l, +32, +64, +96 in bit pairs."""
    halves = levels.view(-1, 2, 4, 32).to(torch.uint8)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _pack_k4_scales(scale_levels: torch.Tensor, min_levels: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> the 12 bytes `get_scale_min_k4` reads."""
    ls, lm = scale_levels.to(torch.uint8), min_levels.to(torch.uint8)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], dim=1)


@dataclass(frozen=True)
class _SuperBlockScales:
    """A super-block's group scales and mins, quantized to `top` levels under two fp16 maxima (d, dmin)."""

    scale_levels: torch.Tensor
    min_levels: torch.Tensor
    step: torch.Tensor  # d * scale level: each group's decoded step
    offset: torch.Tensor  # dmin * min level: each group's decoded (positive) min
    header: torch.Tensor  # d and dmin as fp16 bytes

    @classmethod
    def quantize(cls, scales: torch.Tensor, mins: torch.Tensor, top: int) -> _SuperBlockScales:
        max_scale = scales.max(dim=1).values.clamp(min=0.0)
        max_min = mins.max(dim=1).values.clamp(min=0.0)
        scale_levels = torch.round(_safe_div(torch.full_like(max_scale, float(top)), max_scale).unsqueeze(1) * scales)
        min_levels = torch.round(_safe_div(torch.full_like(max_min, float(top)), max_min).unsqueeze(1) * mins)
        scale_levels, min_levels = scale_levels.clamp(0, top), min_levels.clamp(0, top)
        return cls(
            scale_levels=scale_levels,
            min_levels=min_levels,
            step=_as_fp16(max_scale / top).unsqueeze(1) * scale_levels,
            offset=_as_fp16(max_min / top).unsqueeze(1) * min_levels,
            header=torch.cat([_fp16_bytes(max_scale / top), _fp16_bytes(max_min / top)], dim=1),
        )


def _affine_k_block(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Shared by Q4_K and Q5_K: 8 groups of 32 with 6-bit scales and mins."""
    groups = x.view(-1, 8, 32)
    rms = groups.pow(2).mean(-1, keepdim=True).sqrt()
    scales, mins = _make_qkx2_quants(groups, rms + groups.abs(), nmax, rmin, 0.1, nstep, use_mad=False)
    q = _SuperBlockScales.quantize(scales, mins, top=63)
    levels = torch.round(_safe_div(groups + q.offset.unsqueeze(-1), q.step.unsqueeze(-1))).clamp(0, nmax)
    return q.header, _pack_k4_scales(q.scale_levels, q.min_levels), levels.reshape(-1, QK_K).to(torch.uint8)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    header, scales, levels = _affine_k_block(x, nmax=15, rmin=-1.0, nstep=20)
    chunks = levels.view(-1, 4, 2, 32)
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([header, scales, qs], dim=1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    header, scales, levels = _affine_k_block(x, nmax=31, rmin=-0.5, nstep=15)
    chunks = levels.view(-1, 4, 2, 32)  # (B, chunk c, first/second 32, j)
    low = chunks & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (chunks >> 4).to(torch.int32)  # bit of chunk c, half h goes to bit 2c+h of qh[j]
    shifts = 2 * torch.arange(4, device=x.device).view(1, 4, 1, 1) + torch.arange(2, device=x.device).view(1, 1, 2, 1)
    qh = (high << shifts).sum(dim=(1, 2)).to(torch.uint8)
    return torch.cat([header, scales, qh, qs], dim=1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    groups = x.view(-1, 16, 16)
    scales = _make_qx_quants_scale(groups, 32)
    max_scale = _signed_absmax(scales)
    empty = max_scale.abs() < _GROUP_MAX_EPS
    iscale = torch.where(empty, 0.0, -128.0 / torch.where(empty, 1.0, max_scale))
    scale_levels = torch.round(iscale.unsqueeze(1) * scales).clamp(-128, 127)
    d = _as_fp16(_safe_div(torch.ones_like(iscale), iscale))
    step = d.unsqueeze(1) * scale_levels
    levels = torch.round(_safe_div(groups, step.unsqueeze(-1))).clamp(-32, 31) + 32
    levels = levels.reshape(-1, 2, 4, 32).to(torch.uint8)  # (B, half, quarter, l)
    low = levels & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2).reshape(-1, 128)
    high = levels >> 4
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    scale_bytes = scale_levels.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, scale_bytes, _fp16_bytes(_safe_div(torch.ones_like(iscale), iscale))], dim=1)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    groups = x.view(-1, 16, 16)
    scales = _make_q3_quants_scale(groups, 4)
    max_scale = _signed_absmax(scales)
    empty = max_scale == 0
    iscale = torch.where(empty, 0.0, -32.0 / torch.where(empty, 1.0, max_scale))
    scale_levels = (torch.round(iscale.unsqueeze(1) * scales).clamp(-32, 31) + 32).to(torch.uint8)  # (B, 16)
    low_nibbles = scale_levels & 0xF
    packed = low_nibbles[:, :8] | (low_nibbles[:, 8:] << 4)
    high = (scale_levels >> 4).view(-1, 4, 4).to(torch.int32)  # [j // 4, j % 4]
    shifts = (2 * torch.arange(4, device=x.device)).view(1, 4, 1)
    high_bytes = (high << shifts).sum(dim=1).to(torch.uint8)
    d = _as_fp16(_safe_div(torch.ones_like(iscale), iscale))
    step = d.unsqueeze(1) * (scale_levels.to(torch.float32) - 32)
    levels = (torch.round(_safe_div(groups, step.unsqueeze(-1))).clamp(-4, 3) + 4).reshape(-1, QK_K)
    levels = torch.where(step.repeat_interleave(16, dim=1) != 0, levels, 4.0).to(torch.uint8)
    upper = levels > 3  # level j's high bit goes to bit j // 32 of hmask[j % 32]
    bit_weights = (1 << torch.arange(8, device=x.device, dtype=torch.int32)).view(1, 8, 1)
    hmask = (upper.view(-1, 8, 32).to(torch.int32) * bit_weights).sum(dim=1).to(torch.uint8)
    qs = _pack_2bit(torch.where(upper, levels - 4, levels))
    return torch.cat([hmask, qs, packed, high_bytes, _fp16_bytes(_safe_div(torch.ones_like(iscale), iscale))], dim=1)


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    groups = x.view(-1, 16, 16)
    scales, mins = _make_qkx2_quants(groups, groups.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    q = _SuperBlockScales.quantize(scales, mins, top=15)
    levels = torch.round(_safe_div(groups + q.offset.unsqueeze(-1), q.step.unsqueeze(-1))).clamp(0, 3)
    scale_bytes = q.scale_levels.to(torch.uint8) | (q.min_levels.to(torch.uint8) << 4)
    return torch.cat([scale_bytes, _pack_2bit(levels.reshape(-1, QK_K)), q.header], dim=1)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (gguf-py's np_roundf): halves round away from zero, unlike torch.round."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(B, 32) values 0..15 -> (B, 16): value j in the low nibble of byte j, value j+16 in the high one."""
    halves = q.to(torch.uint8).view(-1, 2, 16)
    return halves[:, 0] | (halves[:, 1] << 4)


def _pack_fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(B, 32) values 0..31 -> (B, 4): bit 4 of value j at bit j (little-endian)."""
    bits = (q.to(torch.int32) >> 4).view(-1, 4, 8)
    return (bits << torch.arange(8, device=q.device, dtype=torch.int32)).sum(-1).to(torch.uint8)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().max(dim=1, keepdim=True).values / 127
    qs = _round_half_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), qs], dim=1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(x).unsqueeze(1) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    high, low = x.max(dim=1, keepdim=True).values, x.min(dim=1, keepdim=True).values
    d = (high - low) / 15
    q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), _pack_nibbles(q)], dim=1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(x).unsqueeze(1) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31)
    return torch.cat([_fp16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q.to(torch.int32) & 0xF)], dim=1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    high, low = x.max(dim=1, keepdim=True).values, x.min(dim=1, keepdim=True).values
    d = (high - low) / 31
    q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(0, 31)
    nibbles = _pack_nibbles(q.to(torch.int32) & 0xF)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), _pack_fifth_bits(q), nibbles], dim=1)


ENCODERS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q8_0": (32, quantize_q8_0),
    "Q5_1": (32, quantize_q5_1),
    "Q5_0": (32, quantize_q5_0),
    "Q4_1": (32, quantize_q4_1),
    "Q4_0": (32, quantize_q4_0),
    "Q6_K": (QK_K, quantize_q6_k),
    "Q5_K": (QK_K, quantize_q5_k),
    "Q4_K": (QK_K, quantize_q4_k),
    "Q3_K": (QK_K, quantize_q3_k),
    "Q2_K": (QK_K, quantize_q2_k),
}
"""GGML type name -> (values per block, encoder)."""

_VALUES_PER_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 25}
"""Values encoded at once: bounds the (blocks x candidates x values) search tensors (~0.1 / 3 GB)."""


def quantize_rows(
    weights: torch.Tensor, ggml_type_name: str, device: torch.device | str = "cpu", values_per_chunk: int | None = None
) -> torch.Tensor:
    """Quantize a 2-D weight (rows a multiple of the block size) to packed bytes, shape (rows, bytes_per_row).
    `values_per_chunk` bounds the search tensors below the device's default (a fuse beside a loaded model)."""
    block_size, encode = ENCODERS[ggml_type_name]
    rows, cols = weights.shape
    if cols % block_size:
        raise ValueError(f"row length {cols} is not a multiple of the {ggml_type_name} block size {block_size}")
    blocks = weights.detach().reshape(-1, block_size)
    chunk_values = values_per_chunk or _VALUES_PER_CHUNK.get(torch.device(device).type, 1 << 20)
    per_chunk = max(1, chunk_values // block_size)
    out = [
        encode(blocks[start : start + per_chunk].to(device=device, dtype=torch.float32)).to("cpu", non_blocking=True)
        for start in range(0, blocks.shape[0], per_chunk)
    ]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(out).reshape(rows, -1)
