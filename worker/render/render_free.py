"""A render-free engine: the worker does everything but the model's work, to measure the control plane.

With FLUXFARM_RENDER_FREE a worker loads no model and touches no GPU: each job it claims is "rendered" as
an 8x8 PNG of its seed's colour, then stored with its metadata, its lease, dataset record and heartbeat
exactly as a real render's. Claims, leases, result writes and the sweep then cost what they cost a real
fleet, while a machine runs dozens of such workers: `fluxfarm bench-fleet` measures the farm's own
overhead per job with them (docs/scale.md). Never for real datasets: the images are placeholders, and
their metadata says so (model `render-free`).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ModelInfo
from fluxfarm.worker.model.pipeline import LoadedModel, LoadedWeights
from fluxfarm.worker.render.engine import RenderedImage

RENDER_FREE_MODEL = "render-free"
PLACEHOLDER_PX = 8


class _NoLoras:
    """The LoRA state a render-free engine reports: never a fused set."""

    active_id: str | None = None
    touches_text_encoder = False


class RenderFreeEngine:
    """The engine interface the batcher and the job runner use, with placeholder images."""

    def __init__(self, level: QuantLevel, max_batch: int = 1) -> None:
        info = ModelInfo(id=RENDER_FREE_MODEL, transformer=RENDER_FREE_MODEL, transformer_sha256="0" * 64)
        self.model = LoadedModel(pipe=None, weights=LoadedWeights.known(info), level=level, device="cpu")  # type: ignore[arg-type]
        self.max_batch = max(1, max_batch)
        self.loras = _NoLoras()

    def render_batch(self, jobs: Sequence[RenderJob]) -> list[RenderedImage]:
        return [self._placeholder(job, len(jobs)) for job in jobs]

    def render(self, job: RenderJob) -> RenderedImage:
        return self._placeholder(job, 1)

    def unload(self) -> None:
        """Nothing is loaded."""

    def _placeholder(self, job: RenderJob, batch: int) -> RenderedImage:
        colour = (job.seed % 256, job.seed // 256 % 256, job.seed // 65536 % 256)
        image = Image.new("RGB", (PLACEHOLDER_PX, PLACEHOLDER_PX), colour)
        return RenderedImage(
            job=job, model=self.model, image=image, encode_s=0.0, denoise_s=0.0, decode_s=0.0, batch_size=batch
        )
