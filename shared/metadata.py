"""The metadata JSON stored beside every image; it is also the task's result.

It says what was rendered (the job), with what (model file hash, quantization level, card), how long
each phase took, and where the image is, so a dataset can be audited without the worker's logs.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.ladder import QuantLevel

if TYPE_CHECKING:
    from fluxfarm.shared.storage import ObjectStore, ResultKeys


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Record):
    id: str = Field(description="The base pipeline: Hugging Face repo id or folder name.")
    transformer: str = Field(description="Where the transformer weights came from.")
    transformer_sha256: str = Field(description="sha256 of the transformer file (or of its shard list).")


class LoraInfo(_Record):
    source: str
    sha256: str = Field(description="sha256 of the LoRA file that was fused.")
    weight: float


class ControlNetInfo(_Record):
    source: str
    sha256: str = Field(description="sha256 of the ControlNet's weight files.")
    conditioning_scale: float
    control_mode: int | None = None
    control_image: str = Field(description="Where the control image came from ('inline' for one in the job).")
    control_image_sha256: str


class InputImageInfo(_Record):
    source: str = Field(description="Where the input image came from ('inline' for one in the job).")
    sha256: str = Field(description="sha256 of the image's bytes as read.")


class WorkerInfo(_Record):
    node: str = Field(description="The worker's Celery node name: which process rendered the job.")
    hostname: str
    device: str
    gpu_name: str | None
    vram_gib: float | None


class Timings(_Record):
    queued_at: datetime | None = Field(description="When the producer enqueued the job.")
    started_at: datetime
    finished_at: datetime
    load_s: float = Field(description="Model load time paid before this job: only the first job of a worker.")
    encode_s: float
    denoise_s: float
    decode_s: float = Field(description="VAE decode to pixels; PNG encoding is png_s.")
    png_s: float = Field(default=0.0, description="PNG encoding, done while the GPU renders the next batch.")
    upload_s: float = Field(description="Time to store the PNG (the metadata JSON is written after).")
    adapter_s: float = Field(
        default=0.0, description="Its share of fusing its LoRA set and loading its ControlNet and control image."
    )
    batch_size: int = Field(
        default=1, ge=1, description="Jobs denoised together with this one; encode and denoise are its share."
    )


def gpu_seconds(timings: Timings) -> float:
    """The GPU time a job took: its share of its batch's encode and denoise, its decode, and its share of
    fusing adapters (not the model load, paid once a worker, nor the PNG and upload, off the GPU)."""
    return timings.encode_s + timings.denoise_s + timings.decode_s + timings.adapter_s


class ImageInfo(_Record):
    key: str
    uri: str
    sha256: str
    bytes: int
    width: int
    height: int


class Reproduction(_Record):
    """What else decides an image's pixels, so it can be rendered again and a re-render can say what differs:
    every weight by its sha256, how the level was made, the scheduler, the kernels, the libraries, the card,
    and where in its batch the image was."""

    weights_sha256: dict[str, str] = Field(
        description="Each weight component by sha256 (transformer, text_encoder, text_encoder_2, vae); "
        "LoRAs, the ControlNet and input images carry theirs in their own records."
    )
    level_source: Literal["file", "derived-from-bf16"] = Field(
        description="file: the level as its file holds it (bf16, GGUF); derived-from-bf16: fp8 or NF4 made at load."
    )
    text_encoder_precision: str
    text_encoders: str = Field(description="Where the text encoders ran: gpu, gpu-swap or cpu.")
    vae_tiling: bool
    scheduler: dict[str, Any] = Field(description="The scheduler's class and its config.")
    fast_paths: dict[str, Any] = Field(
        description="Kernels the transformer ran with: compile, CUDA graphs, attention kernel, fp8 attention, "
        "fp8 tensor-core layers and their fast accumulation, Triton GGUF layers, fused projections."
    )
    versions: dict[str, str] = Field(description="torch, diffusers, transformers, triton, CUDA and cuDNN.")
    gpu: str | None
    compute_capability: str | None
    batch_size: int
    batch_position: int = Field(description="The image's row in its denoising batch (0 first).")
    deterministic: bool = Field(default=False, description="Rendered under FLUXFARM_DETERMINISTIC.")


class CalibrationCite(_Record):
    """The calibration of the level an image was rendered at (shared/calibration.py): how far that level is
    from bf16 on these weights, card and fast paths, measured by `fluxfarm calibrate` over its probe set."""

    id: str
    psnr_db: float | None = Field(description="Over the probe set; None where the level renders bf16's pixels.")
    ssim: float
    perceptual: float | None
    perceptual_metric: str | None
    images: int
    gpu: str | None


class RenderResult(_Record):
    """One rendered job. Stored as `<job_id>.json` and returned by the task."""

    job_id: str
    job: RenderJob
    model: ModelInfo
    quant: QuantLevel = Field(description="The quantization level actually used, e.g. bf16 or Q8_0.")
    loras: tuple[LoraInfo, ...] = Field(
        default=(), description="LoRAs fused into the weights, with their files' hashes."
    )
    controlnet: ControlNetInfo | None = None
    input_images: tuple[InputImageInfo, ...] = Field(
        default=(), description="The job's input images (Kontext: the image edited), by their bytes' sha256."
    )
    worker: WorkerInfo
    timings: Timings
    image: ImageInfo
    metadata_key: str
    fluxfarm_version: str
    calibration: CalibrationCite | None = Field(
        default=None, description="The calibration of this level on these weights, where one was measured."
    )
    reproduction: Reproduction | None = Field(
        default=None, description="Everything else that decides the pixels (absent in records of fluxfarm < 0.2)."
    )


def read_result(store: ObjectStore, keys: ResultKeys) -> RenderResult:
    """A job's stored metadata; ObjectNotFound when it is not stored, ValidationError when unreadable."""
    return RenderResult.model_validate_json(store.get(keys.metadata))


def png_object_metadata(job: RenderJob, model: ModelInfo, quant: str, version: str) -> dict[str, str]:
    """Key fields for the PNG's S3 object metadata. S3 metadata is ASCII only: no prompt, URL-quoted ids."""
    return {
        "job-id": job.id,
        "dataset": job.dataset,
        "seed": str(job.seed),
        "steps": str(job.steps),
        "quant": quant,
        "model": quote(model.id, safe="/:@-._~"),
        "transformer-sha256": model.transformer_sha256,
        "fluxfarm-version": version,
    }
