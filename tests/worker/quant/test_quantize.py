"""`fluxfarm quantize`: every GGUF level loads in diffusers and stays within its level's error."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.quant.gguf.blocks import quantize_rows
from fluxfarm.worker.quant.gguf.writer import QUANTIZABLE_LEVELS
from tests.conftest import load_gguf_transformer, run_fluxfarm

MAX_RELATIVE_RMS = {
    QuantLevel.Q8_0: 0.01,
    QuantLevel.Q6_K: 0.025,
    QuantLevel.Q5_K: 0.05,
    QuantLevel.Q5_1: 0.05,
    QuantLevel.Q5_0: 0.05,
    QuantLevel.Q4_K: 0.1,
    QuantLevel.Q4_1: 0.1,
    QuantLevel.Q4_0: 0.1,
    QuantLevel.Q3_K: 0.2,
    QuantLevel.Q2_K: 0.4,
}
BETTER_THAN = [  # (level, level it must beat): more bits or a better scheme at the same bits
    (QuantLevel.Q8_0, QuantLevel.Q6_K),
    (QuantLevel.Q6_K, QuantLevel.Q5_K),
    (QuantLevel.Q5_K, QuantLevel.Q5_1),
    (QuantLevel.Q5_1, QuantLevel.Q5_0),
    (QuantLevel.Q5_0, QuantLevel.Q4_K),
    (QuantLevel.Q4_K, QuantLevel.Q4_1),
    (QuantLevel.Q4_1, QuantLevel.Q4_0),
    (QuantLevel.Q4_0, QuantLevel.Q3_K),
    (QuantLevel.Q3_K, QuantLevel.Q2_K),
]


def _relative_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).pow(2).mean().sqrt() / exact.float().pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def quantized_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[QuantLevel, Path]:
    out = tmp_path_factory.mktemp("quantized")
    files = {}
    for level in QUANTIZABLE_LEVELS:
        path = out / f"tiny-{level.value}.gguf"
        done = run_fluxfarm("quantize", str(tiny_model), "--level", level.value, "--out", str(path), "--device", "cpu")
        assert done.returncode == 0, done.stderr
        files[level] = path
    return files


def test_every_gguf_level_loads_and_matches_the_source_within_its_error(
    tiny_model: Path, quantized_files: dict[QuantLevel, Path]
) -> None:
    source = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").state_dict()
    errors: dict[QuantLevel, float] = {}
    rows = []
    for level, path in quantized_files.items():
        model = load_gguf_transformer(path, tiny_model)
        quantized = {n: p for n, p in model.state_dict().items() if getattr(p, "quant_type", None) is not None}
        assert quantized, level
        assert {p.quant_type.name for p in quantized.values()} == {level.value}
        ours = torch.cat([(dequantize_gguf_tensor(p).float() - source[n]).flatten() for n, p in quantized.items()])
        scale = torch.cat([source[n].flatten() for n in quantized])
        errors[level] = float(ours.pow(2).mean().sqrt() / scale.pow(2).mean().sqrt())
        reference = "-"
        if level.value not in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"):  # gguf-py quantizes these itself
            qtype = gguf.GGMLQuantizationType[level.value]
            made = {n: gguf.quants.quantize(source[n].numpy(), qtype) for n in quantized}
            deq = torch.cat([torch.from_numpy(gguf.quants.dequantize(made[n], qtype)).flatten() for n in quantized])
            reference = f"{_relative_rms(deq, scale):.4f}"
            assert all(np.array_equal(made[n], quantized[n].as_tensor().view(torch.uint8).numpy()) for n in quantized)
        rows.append(f"{level.value:5} {len(quantized):4d} tensors  rel RMS {errors[level]:.4f}  gguf-py {reference}")
    print("\nlevel quantized         ours            gguf-py\n" + "\n".join(rows))
    for level, error in errors.items():
        assert error < MAX_RELATIVE_RMS[level], (level, error)
    for better, worse in BETTER_THAN:
        assert errors[better] < errors[worse], (better, worse, errors)


def test_k_quant_bytes_decode_the_same_in_gguf_py_and_diffusers() -> None:
    torch.manual_seed(1)
    weights = torch.randn(8, 512) * 0.05
    weights[0, :256] = 0.0  # an all-zero block decodes to zeros
    for name in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"):
        qtype = gguf.GGMLQuantizationType[name]
        packed = quantize_rows(weights, name)
        by_gguf = torch.from_numpy(gguf.quants.dequantize(packed.numpy(), qtype))
        by_diffusers = dequantize_gguf_tensor(GGUFParameter(packed, quant_type=qtype)).float()
        # diffusers decodes in float16 arithmetic: the two agree to fp16 rounding of the block's range.
        assert (by_gguf - by_diffusers).abs().max() <= 2e-3 * by_gguf.abs().max(), name
        assert torch.count_nonzero(by_gguf[0, :256]) == 0, name


def test_quantize_refuses_unknown_levels_and_non_gguf_outputs(tiny_model: Path, tmp_path: Path) -> None:
    for args, message in (
        (["--level", "Q7_X", "--out", str(tmp_path / "x.gguf")], "unknown quantization level"),
        (["--level", "bf16", "--out", str(tmp_path / "x.gguf")], "cannot quantize to bf16"),
        (["--level", "Q8_0", "--out", str(tmp_path / "x.bin")], "must name a .gguf file"),
    ):
        done = run_fluxfarm("quantize", str(tiny_model), *args)
        assert done.returncode == 1 and message in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"])
def test_torch_legacy_encoders_write_the_same_bytes_as_gguf_py(name: str) -> None:
    """The GPU path for big models must not change a single byte of what gguf-py would write."""
    torch.manual_seed(2)
    weights = torch.randn(64, 512) * 0.03
    weights[0, :32] = 0.0
    weights[1, :32] = 0.25
    weights[2, :32] = torch.linspace(-1, 1, 32)  # exact halves exercise the rounding rule
    ours = quantize_rows(weights, name).numpy()
    theirs = gguf.quants.quantize(weights.numpy(), gguf.GGMLQuantizationType[name])
    assert np.array_equal(ours, theirs)
