"""On the GPU, full-size random FLUX.1-dev: the memory adapters add to a worker, for the VRAM plan.

- fuse: the peak allocated above the resident transformer while a rank-64 LoRA over every block layer
  is fused by the worker's LoraFuser, fused again from the disk cache, and unfused, per level;
- ControlNet: the resident bytes of a full-size random FLUX ControlNet of 5 double and 10 single blocks,
  at bf16 and as a worker on a quantized level stores it (scaled fp8).

    python3 tests/gpu/adapter_memory.py                 # one JSON line per figure
    python3 tests/gpu/adapter_memory.py Q4_K Q8_0       # the fuse rows of these levels only
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import FluxControlNetModel

from fluxfarm.shared.adapters import LoraSpec
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.adapters.lora_fuser import LoraFuser
from fluxfarm.worker.model.flux_arch import FLUX_DEV_TRANSFORMER, meta_transformer
from fluxfarm.worker.quant.fp8.weights import to_scaled_fp8
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.random_lora import write_random_lora
from fluxfarm.worker.tools.random_weights import SeededWeights

GIB = 1024**3
DEVICE = "cuda"
RANK = 64
CONTROLNET_BLOCKS = {"num_layers": 5, "num_single_layers": 10}


def _settle() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _above(resident: int) -> float:
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - resident) / GIB, 3)


def fuse_rows(folder: Path, levels: list[QuantLevel]) -> None:
    weights = SeededWeights(FLUX_DEV_TRANSFORMER, torch.bfloat16, folder)
    lora = write_random_lora(meta_transformer(FLUX_DEV_TRANSFORMER), folder / "lora.safetensors", RANK, RANK)
    spec = [LoraSpec(source=str(lora), weight=1.0)]
    for level in levels:
        model = weights.transformer(level, DEVICE)
        settings = WorkerSettings(cache_dir=folder / f"cache-{level.value}", job_file_roots=[str(folder)])
        fuser = LoraFuser({"transformer": model}, lambda: "0" * 64, level.value, settings)
        resident = _settle()
        fuser.activate(spec)
        fuse_gib, fuse_s = _above(resident), fuser.last_fuse_s
        resident = _settle()
        fuser.activate([])
        unfuse_gib = _above(resident)
        resident = _settle()
        fuser.activate(spec)
        cached_gib = _above(resident)
        row = {
            "figure": "fuse working memory above the resident transformer",
            "level": level.value,
            "lora_rank": RANK,
            "layers": len(fuser.active[0].updates),
            "resident_gib": round(resident / GIB, 3),
            "fuse_gib": fuse_gib,
            "fuse_s": round(fuse_s, 1),
            "from_cache_gib": cached_gib,
            "unfuse_gib": unfuse_gib,
        }
        print(json.dumps(row), flush=True)
        del fuser, model
        _settle()


def controlnet_rows() -> None:
    config = {
        key: FLUX_DEV_TRANSFORMER[key]
        for key in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
    }
    config |= {"pooled_projection_dim": 768, "guidance_embeds": True, **CONTROLNET_BLOCKS}
    start = _settle()
    with torch.device(DEVICE):
        model = FluxControlNetModel(**config).to(torch.bfloat16)
    bf16_gib = (torch.cuda.memory_allocated() - start) / GIB
    params = sum(p.numel() for p in model.parameters())
    model = model.cpu()
    to_scaled_fp8(model, torch.bfloat16)
    start = _settle()
    model.to(DEVICE)
    fp8_gib = (torch.cuda.memory_allocated() - start) / GIB
    row = {
        "figure": "ControlNet resident memory",
        "blocks": CONTROLNET_BLOCKS,
        "params_billion": round(params / 1e9, 3),
        "bf16_gib": round(bf16_gib, 3),
        "scaled_fp8_gib": round(fp8_gib, 3),
    }
    print(json.dumps(row), flush=True)


def main() -> None:
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    levels = [QuantLevel(name) for name in sys.argv[1:]]
    if not levels:
        levels = [QuantLevel.BF16, QuantLevel.FP8, QuantLevel.Q8_0, QuantLevel.Q4_K]
        controlnet_rows()
        _settle()
    with tempfile.TemporaryDirectory() as tmp:
        fuse_rows(Path(tmp), levels)


if __name__ == "__main__":
    main()
