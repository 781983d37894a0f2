"""What a job may add to the base model: LoRAs and a ControlNet, as job fields.

Only where things come from and how strongly they apply is said here; the worker fetches, checks and
applies them (worker/adapters/lora_fuser.py, worker/adapters/controlnet.py). Sources are the forms the worker's model
resolver reads: `hf://owner/repo[@rev]/file`, huggingface.co URLs, `s3://bucket/key` and absolute
paths on the worker (which only reads paths under its FLUXFARM_JOB_FILE_ROOTS). LoRA files must be
safetensors: a pickled checkpoint can run code when it is read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fluxfarm.shared.units import KIB, MIB

MAX_LORAS = 4
"""Each LoRA is fused into the weights once per set; four covers style + subject + detail LoRAs."""
MAX_SOURCE_CHARS = 1024
MAX_LORA_WEIGHT = 4.0
LORA_WEIGHT_DECIMALS = 2
"""LoRA weights are rounded to 0.01: each distinct set of weights is fused (and cached) apart, and
weights 1.0, 0.999, 0.998 ... would each cost a fuse and a transformer's worth of cache for the same
image. Every weight people write (0.7, 0.75, 1.2) is on the grid already."""
MAX_INLINE_IMAGE_BYTES = MIB
"""The largest inline control image a job may be written with; larger ones go through S3."""
INLINE_KEEP_BYTES = 64 * KIB
"""Inline images up to this size travel in the message. The client stores a larger one in the farm's
storage at submit and the message names it by digest (`sha256:<hex>`): every copy of a job (queue
message, dataset record, lost-job sweep, metadata) would otherwise carry the whole image."""
STORED_INPUT_PREFIX = "sha256:"
_STORED_INPUT = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_CONTROL_IMAGE_BYTES = 16 * MIB
MAX_CONTROL_IMAGE_PIXELS = 4096 * 4096
"""A control image is resized to the job's size (at most 2048^2); anything past 4096^2 is a mistake or a bomb."""

INLINE_PNG_PREFIX = "data:image/png;base64,"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_HF_FILE = re.compile(r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?/[^\s]+$")
_HF_REPO = re.compile(r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?(/[^\s]+)?$")
_HF_URL = re.compile(r"^https://huggingface\.co/[^/\s]+/[^/\s]+/(resolve|blob)/[^/\s]+/[^\s]+$")
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]+$")


def _plain_path(remote: str) -> bool:
    """No empty, `.` or `..` segment after the scheme (a trailing `/` of a prefix aside): the key or repo
    path names one place, and a worker's cache path built from it cannot leave the cache."""
    segments = remote.split("://", 1)[1].removesuffix("/").split("/")
    return all(segment not in ("", ".", "..") for segment in segments)


def _check_source(value: str, what: str, allow_repo: bool = False) -> str:
    if len(value) > MAX_SOURCE_CHARS or any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{what} must be at most {MAX_SOURCE_CHARS} printable characters")
    remote = _HF_URL.match(value) or _S3.match(value) or (_HF_REPO if allow_repo else _HF_FILE).match(value)
    if remote and not _plain_path(value):
        raise ValueError(f"{what} {value[:200]!r} has an empty, '.' or '..' path segment")
    if remote:
        return value
    if value.startswith("/") and "/../" not in f"{value}/":
        return value
    forms = "hf://owner/repo" + ("[/subfolder]" if allow_repo else "/file") + ", a huggingface.co URL, s3://bucket/key"
    raise ValueError(f"{what} {value!r} must be {forms} or an absolute path on the worker")


class LoraSpec(BaseModel):
    """One LoRA and the strength it is applied with (1.0 as trained; negative weights subtract it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="A .safetensors LoRA: hf://owner/repo/file, s3://bucket/key or a worker path.")
    weight: float = Field(default=1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False)

    @field_validator("weight")
    @classmethod
    def _on_grid(cls, value: float) -> float:
        return round(value, LORA_WEIGHT_DECIMALS) + 0.0  # + 0.0: -0.0 and 0.0 are one weight

    @field_validator("source")
    @classmethod
    def _safetensors_source(cls, value: str) -> str:
        _check_source(value, "LoRA source")
        if not value.lower().endswith(".safetensors"):
            raise ValueError(f"LoRA source {value!r} must be a .safetensors file (pickled checkpoints can run code)")
        return value


class ControlNetSpec(BaseModel):
    """A FLUX ControlNet and the image that conditions the render."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        description="A diffusers FluxControlNetModel folder: hf://owner/repo[@rev][/subfolder], s3://bucket/prefix "
        "or a worker path."
    )
    control_image: str = Field(
        description=(
            "s3://bucket/key, a worker path, an inline PNG as data:image/png;base64,... (at most 1 MiB; the "
            "client stores one over 64 KiB and sends its digest), or sha256:<hex> of an image stored in the "
            "job's dataset (FarmClient.store_input)."
        )
    )
    conditioning_scale: float = Field(default=0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    control_mode: int | None = Field(
        default=None, ge=0, le=15, description="Union ControlNets only: which kind of control the image is."
    )

    @field_validator("source")
    @classmethod
    def _folder_source(cls, value: str) -> str:
        return _check_source(value, "ControlNet source", allow_repo=True)

    @field_validator("control_image")
    @classmethod
    def _image_source(cls, value: str) -> str:
        return check_image_source(value, "control_image")


MAX_INPUT_IMAGES = 4
"""Input images a job may give (Kontext edits one; FLUX.2 takes several references)."""


def check_image_source(value: str, what: str) -> str:
    """An image a job names (a control image, an input image): s3://, an absolute worker path, the
    `sha256:<hex>` of one stored for its dataset, or a small inline PNG."""
    if value.startswith("data:"):
        inline_png(value)
        return value
    if value.startswith(STORED_INPUT_PREFIX):
        if stored_input_digest(value) is None:
            raise ValueError(f"{what} {value[:80]!r} must be sha256: and 64 lowercase hex digits")
        return value
    if value.startswith("s3://") or value.startswith("/"):
        return _check_source(value, what.replace("_", " "))
    raise ValueError(
        f"{what} {value[:80]!r} must be s3://bucket/key, an absolute worker path, sha256:<hex> "
        f"or {INLINE_PNG_PREFIX}..."
    )


def inline_png(value: str) -> bytes:
    """The PNG bytes of a `data:image/png;base64,` control image, checked for size and signature."""
    if not value.startswith(INLINE_PNG_PREFIX):
        raise ValueError(f"an inline control image must start with {INLINE_PNG_PREFIX!r}")
    encoded = value.removeprefix(INLINE_PNG_PREFIX)
    if len(encoded) > (MAX_INLINE_IMAGE_BYTES * 4) // 3 + 4:
        raise ValueError(f"an inline control image must be at most {MAX_INLINE_IMAGE_BYTES >> 20} MiB; use s3://")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an inline control image must be valid base64") from None
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("an inline control image must be a PNG")
    return data


_IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def image_type(data: bytes) -> str | None:
    """The content type of a PNG, JPEG or WebP file by its signature (the formats a control image may
    be); None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _IMAGE_SIGNATURES.items() if data.startswith(magic)), None)


def stored_input_digest(value: str) -> str | None:
    """The digest a `sha256:<hex>` control image names, or None for any other form."""
    return value.removeprefix(STORED_INPUT_PREFIX) if _STORED_INPUT.fullmatch(value) else None


def as_inline_png(png: bytes) -> str:
    """The job-field form of PNG bytes (for clients that hold the control image in memory)."""
    return INLINE_PNG_PREFIX + base64.b64encode(png).decode("ascii")


def lora_set_id(loras: Sequence[LoraSpec]) -> str | None:
    """A short name for a set of LoRAs with their weights, the same in any order; None for no LoRA.
    Jobs with equal ids render with the same fused weights, so a worker batches them together."""
    if not loras:
        return None
    items = sorted((spec.source, spec.weight) for spec in loras)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
