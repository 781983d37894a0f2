"""The FLUX models a job may name, and what each family needs from a job.

A job names its model (`flux.1-dev`, `flux.2-klein-4b`, ...); each model has its own queues
(shared/routing.py), and a worker consumes only the queues of the model it loaded, so a fleet serves
several models at once and a job only ever reaches a worker holding its weights.

The family decides what a job may say: FLUX.1 reads two prompts (CLIP and T5), FLUX.2 one (its text
encoder is an LLM); ControlNets exist for FLUX.1 [dev]'s architecture only; the distilled models
(schnell, klein) render in 4 steps, and the step count and guidance a job leaves out are its model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FluxFamily(StrEnum):
    """Models that share a pipeline class and a transformer architecture."""

    FLUX_1 = "flux.1"
    FLUX_1_KONTEXT = "flux.1-kontext"
    FLUX_2 = "flux.2"
    FLUX_2_KLEIN = "flux.2-klein"


class ImageUse(StrEnum):
    """What a model does with a job's `images`."""

    IMG2IMG = "img2img"
    """FLUX.1: one image, noised to `strength` and denoised toward the prompt."""
    EDIT = "edit"
    """Kontext: one image to edit as the prompt says."""
    REFERENCES = "references"
    """FLUX.2: reference images the prompt draws on (their tokens join the image's in attention)."""


class FluxModel(StrEnum):
    """The catalog names a job's `model` field takes."""

    FLUX_1_DEV = "flux.1-dev"
    FLUX_1_SCHNELL = "flux.1-schnell"
    FLUX_1_KREA_DEV = "flux.1-krea-dev"
    FLUX_1_KONTEXT_DEV = "flux.1-kontext-dev"
    FLUX_2_DEV = "flux.2-dev"
    FLUX_2_KLEIN_4B = "flux.2-klein-4b"
    FLUX_2_KLEIN_9B = "flux.2-klein-9b"


@dataclass(frozen=True)
class ModelSpec:
    """One model: its family, its Hub repo, and the defaults of the parameters a job leaves out."""

    family: FluxFamily
    hub_repo: str
    steps: int
    guidance: float

    @property
    def two_prompts(self) -> bool:
        """FLUX.1 encodes with CLIP and T5 (`prompt_2` goes to T5); FLUX.2 with one LLM encoder."""
        return self.family in (FluxFamily.FLUX_1, FluxFamily.FLUX_1_KONTEXT)

    @property
    def image_use(self) -> ImageUse:
        return _IMAGE_USE[self.family]

    @property
    def max_images(self) -> int:
        """img2img and Kontext read one image; FLUX.2 up to the farm's bound on input images."""
        return MAX_REFERENCE_IMAGES if self.image_use == ImageUse.REFERENCES else 1

    @property
    def controlnets(self) -> bool:
        """FLUX ControlNets (FluxControlNetModel) condition FLUX.1's text-to-image transformer only."""
        return self.family == FluxFamily.FLUX_1


MAX_REFERENCE_IMAGES = 4
"""FLUX.2's reference images a job may give (each adds a 1024² image's tokens to every step's attention)."""
DEFAULT_IMG2IMG_STRENGTH = 0.6
"""How far an img2img job's image is noised when the job leaves `strength` out (diffusers' default)."""
_IMAGE_USE = {
    FluxFamily.FLUX_1: ImageUse.IMG2IMG,
    FluxFamily.FLUX_1_KONTEXT: ImageUse.EDIT,
    FluxFamily.FLUX_2: ImageUse.REFERENCES,
    FluxFamily.FLUX_2_KLEIN: ImageUse.REFERENCES,
}

MODELS: dict[FluxModel, ModelSpec] = {
    # Steps and guidance as each model card renders: the distilled ones in 4 steps, schnell without guidance.
    FluxModel.FLUX_1_DEV: ModelSpec(FluxFamily.FLUX_1, "black-forest-labs/FLUX.1-dev", 28, 3.5),
    FluxModel.FLUX_1_SCHNELL: ModelSpec(FluxFamily.FLUX_1, "black-forest-labs/FLUX.1-schnell", 4, 0.0),
    FluxModel.FLUX_1_KREA_DEV: ModelSpec(FluxFamily.FLUX_1, "black-forest-labs/FLUX.1-Krea-dev", 28, 4.5),
    FluxModel.FLUX_1_KONTEXT_DEV: ModelSpec(FluxFamily.FLUX_1_KONTEXT, "black-forest-labs/FLUX.1-Kontext-dev", 28, 2.5),
    FluxModel.FLUX_2_DEV: ModelSpec(FluxFamily.FLUX_2, "black-forest-labs/FLUX.2-dev", 50, 4.0),
    FluxModel.FLUX_2_KLEIN_4B: ModelSpec(FluxFamily.FLUX_2_KLEIN, "black-forest-labs/FLUX.2-klein-4B", 4, 1.0),
    FluxModel.FLUX_2_KLEIN_9B: ModelSpec(FluxFamily.FLUX_2_KLEIN, "black-forest-labs/FLUX.2-klein-9B", 4, 1.0),
}

LEGACY_MODEL = FluxModel.FLUX_1_DEV
"""What a job meant before jobs named their model: its id leaves the model out, so stored results of
those jobs still answer their resubmits, and its queues keep their old names."""


def model_of_repo(repo: str) -> FluxModel | None:
    """The catalog model whose Hub repo `repo` is (any letter case); None for any other repo or path."""
    wanted = repo.strip().rstrip("/").lower()
    return next((model for model, spec in MODELS.items() if spec.hub_repo.lower() == wanted), None)
