"""Build the diffusers FLUX pipeline a worker keeps loaded: base components plus one transformer.

The transformer comes from a GGUF file (diffusers' GGUF quantizer), a single safetensors file, or
the base folder's `transformer/` (bf16).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

from fluxfarm.shared.errors import ModelLoadError
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ModelInfo
from fluxfarm.shared.models import LEGACY_MODEL, MODELS, FluxFamily, FluxModel
from fluxfarm.worker.fast.fast_paths import FastPaths, apply_fast_paths, encoder_fast_paths
from fluxfarm.worker.model.catalog import nf4_installed
from fluxfarm.worker.model.determinism import apply_determinism
from fluxfarm.worker.model.families import FAMILIES
from fluxfarm.worker.model.file_digest import DigestCache
from fluxfarm.worker.model.gpu import PhaseClock
from fluxfarm.worker.model.model_sizes import EncoderPrecision
from fluxfarm.worker.model.plan import VAE_TILE_PX, Placement, Plan
from fluxfarm.worker.model.reproduction import weight_digests
from fluxfarm.worker.model.sources import resolve_base, resolve_file
from fluxfarm.worker.model.text_encoders import prepare_text_encoder
from fluxfarm.worker.quant.fp8.weights import to_scaled_fp8
from fluxfarm.worker.quant.gguf.writer import gguf_level
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class LoadedWeights:
    """The loaded weights as every image's record names them: the model's names and each component's sha256.

    A load hashes a plain folder's files beside itself (worker/model/file_digest.py). The digests are first needed
    by the first image's record (or a LoRA fuse's cache key), not by its render, so they are awaited there and not
    at the end of the load: on an H100 a fresh worker of FLUX.1-dev waited 2.6 s for them after loading, before its
    first job; its first render takes longer than the hashing."""

    def __init__(self, model_id: str, transformer: str, digests: Future[dict[str, str]]) -> None:
        self.model_id = model_id
        """The base pipeline: a Hub repo id or a folder (known at once, unlike the digests)."""
        self.transformer = transformer
        """Where the transformer weights came from."""
        self._digests = digests

    @classmethod
    def known(cls, info: ModelInfo) -> LoadedWeights:
        """Weights whose record is known already (a bench's random weights, a test's pipeline)."""
        digests: Future[dict[str, str]] = Future()
        digests.set_result({"transformer": info.transformer_sha256})
        return cls(info.id, info.transformer, digests)

    def on_failure(self, call: Callable[[BaseException], object]) -> None:
        """`call(error)` once if the hashing fails (at once if it has failed already): a worker that cannot hash
        its weights cannot write any image's record, so it leaves (and is restarted) rather than fail every job."""

        def done(future: Future[dict[str, str]]) -> None:
            if (error := future.exception()) is not None:
                call(error)

        self._digests.add_done_callback(done)

    @cached_property
    def sha256(self) -> dict[str, str]:
        """Each weight component by sha256 (transformer, text encoders, VAE); waits for the hashing if it runs."""
        try:
            return self._digests.result()
        except OSError as error:
            raise ModelLoadError(f"could not hash the weights of {self.model_id}: {error}") from error

    @cached_property
    def info(self) -> ModelInfo:
        return ModelInfo(id=self.model_id, transformer=self.transformer, transformer_sha256=self.sha256["transformer"])


@dataclass(frozen=True)
class LoadedModel:
    """A pipeline on its device, with what the metadata says about it."""

    pipe: FluxPipeline
    weights: LoadedWeights
    level: QuantLevel
    """The level the transformer is held at (a step down loads another LoadedModel)."""
    device: str
    text_encoders: Placement = "gpu"
    """gpu: resident; gpu-swap: on the GPU only while encoding; cpu: encode on the CPU."""
    fast_paths: FastPaths = field(default_factory=FastPaths)
    family: FluxFamily = FluxFamily.FLUX_1
    """Which pipeline class it is, and so how the engine runs its phases (worker/model/families.py)."""
    plan: Plan | None = None
    """The VRAM plan it was loaded under (None on a CPU): the engine's batches follow it."""
    level_source: Literal["file", "derived-from-bf16"] = "file"
    text_encoder_precision: EncoderPrecision = "bf16"
    vae_tiling: bool = False
    deterministic: bool = False
    """Loaded under FLUXFARM_DETERMINISTIC (worker/model/determinism.py)."""

    @property
    def info(self) -> ModelInfo:
        return self.weights.info

    @property
    def weights_sha256(self) -> dict[str, str]:
        """Each weight component by sha256 (transformer, text encoders, VAE): every image's record names them."""
        return self.weights.sha256


def _log_when_hashed(digests: Future[dict[str, str]], started: float) -> None:
    """Say when the weights' digests are known: a first image whose record waited for them shows it here."""

    def done(future: Future[dict[str, str]]) -> None:
        if future.exception() is None:
            log.info("weight digests ready %.2fs after the load began", time.perf_counter() - started)

    digests.add_done_callback(done)


def enable_vae_tiling(vae: AutoencoderKL, tile_px: int) -> None:
    """Decode in tiles of `tile_px` pixels: the decoder's working memory becomes that of one tile."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // 2 ** (len(vae.config.block_out_channels) - 1)


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs, as FLUX was trained; fp32 on CPU, where bf16 convolutions run ~40x slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _load_nf4(base: Path, dtype: torch.dtype, transformer_class: type[torch.nn.Module]) -> torch.nn.Module:
    """NF4 through bitsandbytes, quantizing the base bf16 weights as they load."""
    if not nf4_installed():
        raise ModelLoadError("the nf4 level needs bitsandbytes: pip install bitsandbytes")
    from diffusers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return transformer_class.from_pretrained(  # type: ignore[attr-defined]
        base, subfolder="transformer", quantization_config=config, dtype=dtype
    )


def _load_transformer(
    base: Path, path: Path | None, dtype: torch.dtype, nf4: bool = False, family: FluxFamily = FluxFamily.FLUX_1
) -> tuple[FluxTransformer2DModel, str]:
    """The transformer from its file `path` (None: the base folder's bf16 `transformer/`), and its level."""
    transformer_class = FAMILIES[family].transformer
    if path is None:
        if nf4:
            return _load_nf4(base, dtype, transformer_class), QuantLevel.NF4.value
        model = transformer_class.from_pretrained(base, subfolder="transformer", dtype=dtype)
        return model, QuantLevel.BF16.value
    if path.suffix == ".gguf":
        model = transformer_class.from_single_file(
            str(path),
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            config=str(base),
            subfolder="transformer",
            dtype=dtype,
        )
        level = gguf_level(path)
    elif path.suffix == ".safetensors":
        model = transformer_class.from_single_file(str(path), config=str(base), subfolder="transformer", dtype=dtype)
        level = QuantLevel.BF16.value
    else:
        raise ModelLoadError(f"transformer file {path} is neither .gguf nor .safetensors")
    return model, level


def place_pipeline(pipe: FluxPipeline, device: str, text_encoders: Placement) -> None:
    """Move components one by one, so a small card never holds more than the plan says."""
    pipe.transformer.to(device)
    pipe.vae.to(device)
    encoders_device = device if text_encoders == "gpu" else "cpu"
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(encoders_device)


def ready_pipeline(
    pipe: FluxPipeline,
    device: str,
    text_encoders: Placement,
    vae_tiling: bool,
    settings: WorkerSettings,
) -> FastPaths:
    """Place the components as planned, tile the decode if planned, and switch on the fast paths: the
    transformer's, and the quantized kernels for a text encoder that encodes on the GPU."""
    place_pipeline(pipe, device, text_encoders)
    if vae_tiling:
        enable_vae_tiling(pipe.vae, VAE_TILE_PX)
    pipe.set_progress_bar_config(disable=True)
    if text_encoders != "cpu" and settings.fast_kernels:
        encoder_fast_paths(pipe.text_encoder, device)
    return apply_fast_paths(
        pipe.transformer, device, settings.fast_kernels, settings.attention, settings.compile, settings.cuda_graphs
    )


def load_model(
    model: str,
    transformer: str | None,
    device: str,
    settings: WorkerSettings,
    level: QuantLevel | None = None,
    text_encoders: Placement = "gpu",
    vae_tiling: bool = False,
    transformer_path: Path | None = None,
    flux_model: FluxModel = LEGACY_MODEL,
    text_encoder_precision: EncoderPrecision = "bf16",
) -> LoadedModel:
    """Resolve, load and place the whole pipeline of `flux_model`'s family once; every later job reuses it.

    `level` asks for fp8 or nf4, which are made from bf16 weights; other levels are what the file holds.
    `transformer_path` is `transformer` already resolved to a local file (the worker's loadout does that).
    """
    apply_determinism(settings.deterministic)
    dtype = compute_dtype(device)
    base = resolve_base(model, settings, with_transformer_weights=transformer is None)
    try:
        if transformer is not None and transformer_path is None:
            transformer_path = resolve_file(transformer, settings)
        # Every weight file is hashed for the images' record beside the load and the first render (LoadedWeights):
        # on a fresh machine with a folder of weights (no Hub blob names) that is ~34 GB for FLUX.1-dev.
        hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-digests")
        digests = hashing.submit(weight_digests, base, transformer_path, DigestCache(settings.cache_dir))
        hashing.shutdown(wait=False)
        _log_when_hashed(digests, time.perf_counter())
        clock, phases = PhaseClock(device), []
        family = MODELS[flux_model].family
        flux_transformer, held = _load_transformer(
            base, transformer_path, dtype, nf4=level == QuantLevel.NF4, family=family
        )
        phases.append(f"transformer {clock.lap():.2f}s")
        if level == QuantLevel.FP8:
            if held != QuantLevel.BF16.value:
                raise ModelLoadError(f"fp8 is made from bf16 weights; {transformer} holds {held}")
            # A layer at a time on the card (the bf16 model whole would not fit the cards fp8 is for; the host
            # takes tens of seconds for 12B parameters), each result kept there: every plan places the transformer
            # on the card (place_pipeline), so the fp8 layers, never more than the plan's resident transformer,
            # are not copied back to the host and up again.
            to_scaled_fp8(flux_transformer, dtype, device, keep_on_work_device=True)
            held = QuantLevel.FP8.value
            phases.append(f"fp8 {clock.lap():.2f}s")
        pipe = FAMILIES[family].pipeline.from_pretrained(base, transformer=flux_transformer, dtype=dtype)
        prepare_text_encoder(pipe.text_encoder, family, text_encoder_precision, dtype, device)
        phases.append(f"other components {clock.lap():.2f}s")
        fast_paths = ready_pipeline(pipe, device, text_encoders, vae_tiling, settings)
        phases.append(f"placed with fast paths {clock.lap():.2f}s")
        log.info("load phases: %s", ", ".join(phases))
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"could not load FLUX pipeline from {model} ({transformer or 'bf16'}): {error}") from error
    weights = LoadedWeights(model, transformer or f"{model}/transformer", digests)
    log.info("loaded %s with transformer %s (%s) on %s", model, transformer or f"{model}/transformer", held, device)
    return LoadedModel(
        pipe=pipe,
        weights=weights,
        level=QuantLevel(held),
        device=device,
        text_encoders=text_encoders,
        fast_paths=fast_paths,
        family=family,
        level_source="derived-from-bf16" if level in (QuantLevel.FP8, QuantLevel.NF4) else "file",
        text_encoder_precision=text_encoder_precision,
        vae_tiling=vae_tiling,
        deterministic=settings.deterministic,
    )
