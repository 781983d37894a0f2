"""Gather the jobs a worker holds into one render call, so queued jobs share encode phases and batches.

Celery hands each job to its own task thread (threads pool, one thread per job the worker may hold).
Each thread puts its job here and waits; one render thread, the only one that touches the GPU, takes
what has gathered (up to `max_jobs`, waiting at most `wait_s` for more after the first) and renders
it with `RenderEngine.render_batch`: one text-encoder phase for all of them (on a gpu-swap plan, one
swap instead of one per job) and same-shape jobs denoised together. Every task still acks its own
message after its own result is stored, so nothing is acknowledged before it is done. The task
threads encode and store their PNGs while the render thread is already on the next batch, which is
why a worker holds two batches' worth of jobs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.worker.render.engine import RenderedImage, RenderEngine

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: RenderJob
    on_start: Callable[[], None] | None = None
    future: Future[RenderedImage] = field(default_factory=Future)


def held_jobs(max_batch: int) -> int:
    """Jobs a worker holds: one batch rendering, one batch encoding and storing its PNGs."""
    return 2 * max(1, max_batch)


_STOP = None
"""Put in the inbox by `close()`: the render thread finishes what it holds and ends."""


class RenderBatcher:
    """`render(job)` from any thread; rendering happens on one daemon thread, in gathered groups."""

    def __init__(
        self,
        engine: RenderEngine,
        max_jobs: int,
        wait_s: float,
        step_down: Callable[[RenderEngine, RenderJob], RenderEngine | None] | None = None,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        """`after_batch` runs on the render thread after each group is rendered (the warm start publishes
        what the first one compiled)."""
        self.engine = engine
        self._step_down = step_down
        self._after_batch = after_batch
        self.max_jobs = max(1, max_jobs)
        self.wait_s = wait_s
        self._inbox: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="fluxfarm-render", daemon=True)
        self._thread.start()

    def render(self, job: RenderJob, on_start: Callable[[], None] | None = None) -> RenderedImage:
        """Blocks until `job` is rendered (with whatever else gathered); raises what its render raised.
        `on_start` runs on the render thread just before the job's render begins (not while it waits)."""
        pending = _Pending(job, on_start)
        self._inbox.put(pending)
        return pending.future.result()

    def close(self) -> None:
        """Stop the render thread after the jobs already handed in; `render` must not be called after."""
        self._inbox.put(_STOP)
        self._thread.join()

    def _gather(self) -> list[_Pending]:
        """Up to `max_jobs` pending jobs; empty once `close()` was called."""
        first = self._inbox.get()
        if first is _STOP:
            return []
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_jobs:
            remaining = deadline - time.monotonic()
            try:
                pending = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if pending is _STOP:
                self._inbox.put(_STOP)  # seen again by the next gather, after this batch is rendered
                break
            batch.append(pending)
        return batch

    def _loop(self) -> None:
        while batch := self._gather():
            self._render(batch)
            if self._after_batch is not None:
                try:
                    self._after_batch()
                except Exception:  # a hook's failure is the hook's, never the jobs' or the render thread's
                    log.exception("after-batch hook failed")

    def _started(self, batch: list[_Pending]) -> list[_Pending]:
        """Run each job's `on_start`; a job whose hook fails is failed with that error, not rendered."""
        started = []
        for pending in batch:
            try:
                if pending.on_start is not None:
                    pending.on_start()
            except Exception as error:
                pending.future.set_exception(error)
                continue
            started.append(pending)
        return started

    def _render(self, batch: list[_Pending]) -> None:
        batch = self._started(batch)
        if not batch:
            return
        if len(batch) == 1:
            self._render_alone(batch[0])
            return
        try:
            rendered = self.engine.render_batch([p.job for p in batch])
        except Exception as error:  # each job gets its own try below
            log.warning("rendering %d jobs together failed (%s); rendering them one by one", len(batch), error)
            for pending in batch:
                self._render_alone(pending)
            return
        for pending, image in zip(batch, rendered, strict=True):
            pending.future.set_result(image)

    def _render_alone(self, pending: _Pending) -> None:
        try:
            pending.future.set_result(self._render_one(pending.job))
        except Exception as error:  # handed to the job's own task, which reports it
            pending.future.set_exception(error)

    def _render_one(self, job: RenderJob) -> RenderedImage:
        """Render one job; out of memory even alone, step the engine down a level (if allowed) and retry.
        A job with LoRAs or a ControlNet fails alone instead: its adapters' memory is its own, and one such
        job must not cost every later job of the worker a level."""
        try:
            return self.engine.render(job)
        except torch.OutOfMemoryError as error:
            if self._step_down is None:
                raise
            if job.loras or job.controlnet is not None:
                raise torch.OutOfMemoryError(
                    f"{error} (a job with adapters: it fails alone, the worker keeps its level)"
                ) from None
            reason = str(error)
        # Out of the except block on purpose: the exception's traceback holds the frames of the failed
        # forward pass, and with them the old weights, which must be freed before a level can load.
        lower = self._step_down(self.engine, job)
        if lower is None:
            raise torch.OutOfMemoryError(reason)
        self.engine = lower
        return self.engine.render(job)
