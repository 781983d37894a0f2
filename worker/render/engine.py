"""The render loop: jobs in, decoded images and phase timings out.

Encode, denoise and decode run as separate phases (the pipeline's own steps, called in turn), so
each is timed on its own and the expensive ones are shared across jobs:
- encode: the prompts of all the jobs in hand are encoded in one phase (one swap of the text
  encoders onto the GPU on a gpu-swap plan), and embeddings are cached by prompt, so a tight-budget
  worker keeps its transformer resident instead of paying an offload per image;
- denoise: jobs of the same size, steps and guidance run as one batch, up to `max_batch`;
- decode: per image (its working memory is what the plan sized).
Jobs with LoRAs render a LoRA set at a time, the set the weights already carry first: the set is
fused into the weights once (worker/adapters/lora_fuser.py), so its steps cost what the level's plain steps
cost. ControlNet jobs denoise through diffusers' ControlNet pipeline on the same loaded parts
(worker/adapters/controlnet.py), batched with jobs of the same ControlNet and scale.
PNG encoding is not a phase here: `RenderedImage.png` encodes on first use, in the caller's thread
(the worker's task thread), so it overlaps the next render instead of idling the GPU (zlib releases the GIL).
A batched image keeps its own seed's starting noise, so it matches its batch-of-one render up to
floating-point summation order.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.metadata import ControlNetInfo, InputImageInfo, LoraInfo
from fluxfarm.shared.models import MODELS, ImageUse
from fluxfarm.worker.adapters.controlnet import ControlNets
from fluxfarm.worker.adapters.job_images import JobImage, JobImages
from fluxfarm.worker.adapters.lora_fuser import LoraFuser
from fluxfarm.worker.fast.step_graphs import step_graphs
from fluxfarm.worker.model.families import FAMILIES, Embeddings, flux1_pipeline_over
from fluxfarm.worker.model.gpu import PhaseClock
from fluxfarm.worker.model.host_mirror import HostMirror
from fluxfarm.worker.model.pipeline import LoadedModel
from fluxfarm.worker.render.fault_injection import FaultPlan
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

PROMPTS_PER_ENCODE = 8
"""Prompts per text-encoder forward: T5-XXL at 512 tokens stays under 0.3 GiB of working memory a prompt."""


@dataclass(frozen=True)
class RenderedImage:
    job: RenderJob
    model: LoadedModel
    """What rendered it: a worker that stepped down a level renders later jobs with another model."""
    image: Image.Image
    encode_s: float
    denoise_s: float
    decode_s: float
    batch_size: int = 1
    """Jobs denoised together with this one; its encode and denoise seconds are its share of the phase."""
    batch_position: int = 0
    """Its row in that batch (a batch's rows may differ in the last bits: its reproducibility record says)."""
    adapter_s: float = 0.0
    """Its share of fusing its LoRA set and loading its ControlNet, where its batch had to."""
    loras: tuple[LoraInfo, ...] = ()
    controlnet: ControlNetInfo | None = None
    input_images: tuple[InputImageInfo, ...] = ()

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @cached_property
    def png(self) -> bytes:
        """Encoded on first use, by whichever thread asks (the GPU thread never does)."""
        return encode_png(self.image, self.job)


class EmbeddingCache:
    """Prompt embeddings by prompt hash, least recently used first out; kept in host memory so they
    cost no VRAM (a T5 embedding is 4 MiB in bf16)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Embeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(job: RenderJob, text_encoder_loras: str | None = None) -> str:
        """`text_encoder_loras`: the LoRA set fused into the text encoder, which changes the embeddings."""
        text = json.dumps([job.prompt, job.prompt_2, job.max_sequence_length, text_encoder_loras], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> Embeddings | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return found

    def put(self, key: str, value: Embeddings) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def encode_png(image: Image.Image, job: RenderJob) -> bytes:
    """PNG with the job's parameters in a text chunk, so a file on its own still says what it is."""
    info = PngImagePlugin.PngInfo()
    info.add_text("fluxfarm-job", json.dumps(job.model_dump(mode="json"), ensure_ascii=False), zip=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def denoise_groups(
    jobs: Sequence[RenderJob], max_batch: int, limit: Callable[[int, int], int] | None = None
) -> list[list[int]]:
    """Indices of `jobs` in groups that can share a denoising batch (same shape of work, same LoRA set and
    ControlNet settings), in job order: at most `max_batch`, and at most `limit(width, height)` (the VRAM
    plan's batch at that size) when given."""
    by_shape: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        control = job.controlnet
        control_key = None if control is None else (control.source, control.conditioning_scale, control.control_mode)
        # FLUX.2's references are one set for a whole batch; other images are each job's own.
        shared = MODELS[job.model].image_use == ImageUse.REFERENCES
        images = job.images if shared else len(job.images)
        work = (job.width, job.height, job.steps, job.guidance, job.max_sequence_length, images, job.strength)
        shape = (*work, job.lora_set, control_key)
        by_shape.setdefault(shape, []).append(index)
    groups = []
    for indices in by_shape.values():
        first = jobs[indices[0]]
        size = min(max_batch, limit(first.width, first.height)) if limit else max_batch
        groups.extend(indices[start : start + size] for start in range(0, len(indices), size))
    return sorted(groups, key=lambda group: group[0])


class RenderEngine:
    """Renders jobs with one loaded pipeline; keeps only the embedding cache between calls."""

    def __init__(
        self,
        model: LoadedModel,
        max_batch: int = 1,
        embedding_cache: int = 64,
        faults: FaultPlan | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        """`settings` say where LoRAs, ControlNets and control images may come from and where fused weights
        are cached; the environment's FLUXFARM_* settings when not given."""
        self.model = model
        self.ops = FAMILIES[model.family]
        self.faults = faults
        self.max_batch = max(1, max_batch)
        self.embeddings = EmbeddingCache(embedding_cache)
        settings = settings or WorkerSettings()
        pipe = model.pipe
        self.loras = LoraFuser(
            {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder},
            lambda: model.info.transformer_sha256,
            model.level,
            settings,
            before_layer=self._check_fuse,
            loader=self.ops.pipeline,
        )
        self.inputs = JobImages(settings)
        self.controlnets = ControlNets(pipe, model.level, model.device, settings, self.inputs)
        self._img2img_pipe: Any = None
        self._mirrors: list[HostMirror] = []
        if model.text_encoders == "gpu-swap":
            encoders = [getattr(pipe, name) for name in self.ops.text_encoder_names]
            self._mirrors = [HostMirror(m) for m in (pipe.transformer, *encoders)]

    def _check_fuse(self, layers_done: int, level: str) -> None:
        if self.faults is not None:
            self.faults.check_fuse(layers_done, level)

    @contextmanager
    def _encoders_on_gpu(self) -> Iterator[None]:
        """For a gpu-swap plan: the transformer waits in host memory while the encoders use the GPU."""
        if not self._mirrors:
            yield
            return
        transformer, *encoders = self._mirrors
        graphs = step_graphs(self.model.pipe.transformer)
        if graphs is not None:
            graphs.release()  # their memory pool is the encoders' room, and the weights are about to move
        transformer.to_host()
        for encoder in encoders:
            encoder.to_device(self.model.device)
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.to_host()
            transformer.to_device(self.model.device)

    def _encode(self, jobs: Sequence[RenderJob]) -> list[Embeddings]:
        """Embeddings for every job: cached ones as they are, the rest in one encoder phase."""
        text_loras = self.loras.active_id if self.loras.touches_text_encoder else None
        keys = [EmbeddingCache.key(job, text_loras) for job in jobs]
        found = {key: self.embeddings.get(key) for key in dict.fromkeys(keys)}
        missing = [(key, job) for key, job in dict(zip(keys, jobs, strict=True)).items() if found[key] is None]
        if missing:
            pipe, device = self.model.pipe, torch.device(self.model.device)
            with self._encoders_on_gpu():
                for start in range(0, len(missing), PROMPTS_PER_ENCODE):
                    chunk = missing[start : start + PROMPTS_PER_ENCODE]
                    # One forward a prompt length: T5 pads to max_sequence_length, which may differ.
                    for length in dict.fromkeys(job.max_sequence_length for _, job in chunk):
                        same = [(key, job) for key, job in chunk if job.max_sequence_length == length]
                        encoded = self.ops.encode(pipe, [job for _, job in same], device, length)
                        for (key, _), embedding in zip(same, encoded, strict=True):
                            found[key] = embedding
                            self.embeddings.put(key, embedding)
        return [found[key] for key in keys]  # type: ignore[misc]

    def _denoise(
        self,
        jobs: Sequence[RenderJob],
        embeddings: Sequence[Embeddings],
        control: Sequence[Image.Image],
        inputs: Sequence[Sequence[JobImage]],
    ) -> torch.Tensor:
        pipe, device = self.model.pipe, self.model.device
        first = jobs[0]
        if self.faults is not None:
            self.faults.check_denoise(jobs, self.model.level)
        extra = self.ops.image_arguments(jobs, [[read.image for read in row] for row in inputs])
        if first.images and self.ops.img2img is not None:
            pipe = self._img2img()
        if first.controlnet is not None:
            pipe = self.controlnets.get(first.controlnet).pipeline
            extra = {
                "control_image": list(control),
                "controlnet_conditioning_scale": first.controlnet.conditioning_scale,
                "control_mode": first.controlnet.control_mode,
            }
        return pipe(
            **extra,
            **self.ops.conditioning(embeddings, device),
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            max_sequence_length=first.max_sequence_length,
            # CPU generators, one a job: the same starting noise for a seed on every card and in any batch.
            generator=[torch.Generator(device="cpu").manual_seed(job.seed) for job in jobs],
            output_type="latent",
        ).images

    def _img2img(self) -> Any:
        """The family's img2img pipeline over the loaded parts, made once."""
        if self._img2img_pipe is None:
            assert self.ops.img2img is not None
            self._img2img_pipe = flux1_pipeline_over(self.model.pipe, self.ops.img2img)
        return self._img2img_pipe

    def _decode(self, latents: torch.Tensor, job: RenderJob) -> Image.Image:
        return self.ops.decode(self.model.pipe, latents, job)

    def unload(self) -> None:
        """Drop the pipeline's weights so another level can take their memory; the engine is done."""
        if self.model.pipe.transformer is None:
            return
        graphs = step_graphs(self.model.pipe.transformer)
        if graphs is not None:
            graphs.release()
        self._mirrors = []
        self.controlnets.release()
        pipe = self.model.pipe
        for name in ("transformer", *self.ops.text_encoder_names, "vae"):
            setattr(pipe, name, None)
        torch._dynamo.reset()  # compiled blocks hold their weights too
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _shrink_batch(self, failed: int) -> None:
        """A batch of `failed` jobs ran out of memory: from now on batches stay below it."""
        self.max_batch = max(1, failed // 2)
        log.warning("a batch of %d ran out of GPU memory; batching at most %d from now on", failed, self.max_batch)
        graphs = step_graphs(self.model.pipe.transformer)
        if graphs is not None:
            graphs.release()
        torch.cuda.empty_cache()

    def _fit_step_graphs(self, batch: int, width: int, height: int) -> None:
        """Replay this batch's steps as a CUDA graph only where it pays and fits. Not on a gpu-swap plan: the
        transformer leaves the card for every encode phase, so each batch would capture its graph again (run 15,
        H100, Q6_K at 12 GiB: a batch of one took 4.52 s with graphs, 4.32 s without). Elsewhere only where the
        plan has room for the graph's pool beside the decode that follows; larger batches run eagerly, at the
        batch size the plan sized."""
        graphs, plan = step_graphs(self.model.pipe.transformer), self.model.plan
        if graphs is None or plan is None:
            return
        if self._mirrors:
            graphs.hold_off("the transformer leaves the card every encode phase")
        elif batch > plan.graph_batch_limit(width, height):
            graphs.hold_off("no room for the graph beside the decode")
        else:
            graphs.hold_off("")

    def _use_loras(self, jobs: Sequence[RenderJob]) -> tuple[tuple[LoraInfo, ...], float]:
        """Fuse the jobs' (shared) LoRA set into the weights if they do not carry it already."""
        switches = self.loras.switches
        try:
            infos = tuple(lora.info for lora in self.loras.activate(jobs[0].loras))
        finally:
            if self._mirrors and self.loras.switches != switches:
                # The host copy is what the next swap brings back: the fused set, or the base weights
                # a failed fuse rolled back to.
                self._mirrors[0].keep_current()
        return infos, 0.0 if self.loras.switches == switches else self.loras.last_fuse_s

    @torch.inference_mode()
    def render_batch(self, jobs: Sequence[RenderJob]) -> list[RenderedImage]:
        """Render `jobs`, a LoRA set at a time (the set the weights carry first), sharing one encode phase
        per set and denoising compatible jobs together; results in job order."""
        by_set: dict[str | None, list[int]] = {}
        for index, job in enumerate(jobs):
            by_set.setdefault(job.lora_set, []).append(index)
        order = sorted(by_set, key=lambda set_id: set_id != self.loras.active_id)
        results: dict[int, RenderedImage] = {}
        for set_id in order:
            indices = by_set[set_id]
            rendered = self._render_set([jobs[i] for i in indices])
            results.update(zip(indices, rendered, strict=True))
        return [results[i] for i in range(len(jobs))]

    def _render_set(self, jobs: Sequence[RenderJob]) -> list[RenderedImage]:
        loras, fuse_s = self._use_loras(jobs)
        clock = PhaseClock(self.model.device)
        embeddings = self._encode(jobs)
        encode_share = clock.lap() / len(jobs)
        results: dict[int, RenderedImage] = {}
        plan = self.model.plan
        groups = denoise_groups(jobs, self.max_batch, plan.batch_limit if plan else None)
        while groups:
            group = groups.pop(0)
            group_jobs = [jobs[i] for i in group]
            controls = [
                self.controlnets.image(job.controlnet, job.dataset) for job in group_jobs if job.controlnet is not None
            ]
            inputs = [[self.inputs.read(src, job.dataset, "input image") for src in job.images] for job in group_jobs]
            adapter_s = (fuse_s + clock.lap()) / len(group)
            fuse_s = 0.0
            self._fit_step_graphs(len(group), group_jobs[0].width, group_jobs[0].height)
            try:
                latents = self._denoise(
                    group_jobs, [embeddings[i] for i in group], [image for image, _ in controls], inputs
                )
            except torch.cuda.OutOfMemoryError:
                if len(group) == 1:
                    raise
                self._shrink_batch(len(group))
                half = len(group) // 2
                groups[:0] = [group[:half], group[half:]]
                clock.lap()
                continue
            denoise_share = clock.lap() / len(group)
            for row, index in enumerate(group):
                job = jobs[index]
                results[index] = RenderedImage(
                    job=job,
                    model=self.model,
                    image=self._decode(latents[row : row + 1], job),
                    encode_s=encode_share,
                    denoise_s=denoise_share,
                    decode_s=clock.lap(),
                    batch_size=len(group),
                    batch_position=row,
                    adapter_s=adapter_s,
                    loras=loras,
                    controlnet=controls[row][1] if controls else None,
                    input_images=tuple(InputImageInfo(source=r.origin, sha256=r.sha256) for r in inputs[row]),
                )
        return [results[i] for i in range(len(jobs))]

    def render(self, job: RenderJob) -> RenderedImage:
        return self.render_batch([job])[0]
