"""Fault drills: make a worker fail on purpose, the way real faults do, to prove the farm survives.

Set `FLUXFARM_INJECT_FAULTS` to a FaultPlan as JSON on a worker (tests do; operators may, on a drill
worker). Faults are raised where the real ones come from: inside the render, as the same exception
types (`torch.OutOfMemoryError` for CUDA running out of memory), so everything above the engine
handles them exactly as it handles real ones. Unset, nothing here runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from fluxfarm.shared.jobs import RenderJob


class InjectedFault(RuntimeError):
    """A render failure a drill asked for (a poison job)."""


class FaultPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    poison_prompt: str | None = Field(
        default=None, description="A job whose prompt contains this fails every render: a poison job."
    )
    oom_batch_over: int | None = Field(
        default=None, ge=1, description="Denoising more than this many jobs at once runs out of GPU memory."
    )
    oom_pixels_over: int | None = Field(
        default=None, ge=1, description="A job of more pixels than this runs out of GPU memory even alone."
    )

    oom_levels: list[str] = Field(
        default=[], description="The levels at which oom_pixels_over holds (all when empty): a card too small for them."
    )
    oom_fusing_after_layers: int | None = Field(
        default=None,
        ge=0,
        description="Fusing a LoRA set runs out of GPU memory after this many layers: a fuse failing half way.",
    )
    slow_denoise_s: float = Field(
        default=0, ge=0, le=3600, description="Each denoising phase takes this much longer: a slow card, a long render."
    )

    def check_denoise(self, jobs: Sequence[RenderJob], level: str) -> None:
        """Raise the fault this plan puts on denoising `jobs` together, if any (after its slowness)."""
        time.sleep(self.slow_denoise_s)
        for job in jobs:
            if self.poison_prompt and self.poison_prompt in job.prompt:
                raise InjectedFault(f"injected poison: job {job.id} fails every render")
        if self.oom_batch_over is not None and len(jobs) > self.oom_batch_over:
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory denoising {len(jobs)} jobs at once")
        largest = max(job.width * job.height for job in jobs)
        at_level = not self.oom_levels or level in self.oom_levels
        if self.oom_pixels_over is not None and largest > self.oom_pixels_over and at_level:
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory denoising {largest} pixels at {level}")

    def check_fuse(self, layers_done: int, level: str) -> None:
        """Raise the fault this plan puts on fusing the next layer of a LoRA set, if any."""
        if self.oom_fusing_after_layers is not None and layers_done >= self.oom_fusing_after_layers:
            raise torch.OutOfMemoryError(
                f"injected: CUDA out of memory fusing a LoRA set's layer {layers_done + 1} at {level}"
            )


def parse_fault_plan(value: str | None) -> FaultPlan | None:
    return FaultPlan.model_validate_json(value) if value else None
