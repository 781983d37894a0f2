"""Replay the transformer's forward as a CUDA graph: one launch a step instead of a thousand.

A FLUX step launches ~1,500 kernels (more with GGUF dequantization); at 512^2 the GPU finishes them
faster than Python issues them, so a step is CPU-bound (measured on an H100: Q8_0 compiled 124 ms
issued from Python, 53 ms replayed). A worker renders the same few shapes for hours, so each input
signature (shapes, dtypes) is captured once and replayed: inputs are copied into the graph's static
tensors, outputs are cloned out of it.

Graphs hold their weights by address. `release()` drops them (and the memory they keep) before the
weights move, e.g. while a gpu-swap plan has the text encoders on the GPU; a signature seen before
is captured again on its next call. A guard on the weights' addresses recaptures rather than
replaying stale pointers if something moved them anyway.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

MAX_GRAPHS = 4
"""Signatures kept per model (each costs one step's activations, shared through one memory pool)."""


def _plain(value: Any) -> bool:
    """A value a graph can bake in: part of the signature, so another value captures another graph."""
    return value is None or isinstance(value, bool | int | float | str)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], output: Any) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class StepGraphs:
    """Wraps `module.forward`; eager until a signature's first call, graph replay after it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._forward: Callable[..., Any] = module.forward
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._warmed: set[Hashable] = set()
        self._uncapturable: set[Hashable] = set()
        self._pool: Any = None
        self._weights_at: tuple[int, ...] = ()
        self.captures = 0
        self.replays = 0
        self.warmup_s = 0.0
        """Seconds in the eager calls before each capture (where a compiled block's first call compiles)."""
        self.capture_s = 0.0
        """Seconds capturing graphs."""
        self.eager: Counter[str] = Counter()
        """Calls run eagerly, by why: a worker whose steps never replay says so instead of running slower unseen."""
        self._held_off = ""

    def install(self) -> StepGraphs:
        self.module.forward = self  # instance attribute: nn.Module.__call__ now lands here
        return self

    def uninstall(self) -> None:
        self.release()
        self.module.__dict__.pop("forward", None)

    def release(self) -> None:
        """Drop every captured graph and its memory pool (weights about to move, or memory needed)."""
        self._graphs.clear()
        self._pool = None

    def hold_off(self, why: str) -> None:
        """Run every call eagerly, counted under `why`, and free the graphs' memory now (their pool would stay
        reserved beside what the next phase needs); `hold_off("")` captures and replays again."""
        if why and not self._held_off:
            self.release()
        self._held_off = why

    def _weight_addresses(self) -> tuple[int, ...]:
        """Where the first weight lives: every move of this worker's (HostMirror, .to) moves all of them,
        and reading one keeps the per-step check off the ~1,000-tensor walk."""
        first = next(self.module.parameters(), None)
        return () if first is None else (first.data_ptr(),)

    @staticmethod
    def _signature(kwargs: dict[str, Any]) -> tuple[Hashable | None, str]:
        """Shapes and dtypes of tensor arguments plus the plain values of the others (and of dicts of plain
        values: FluxPipeline passes `joint_attention_kwargs={}` on every step); None, and why, when an
        argument is none of these (the call then runs eagerly)."""
        parts: list[Hashable] = []
        for name in sorted(kwargs):
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                if value.device.type != "cuda":
                    return None, f"{name} off the GPU"
                parts.append((name, tuple(value.shape), value.dtype, value.device))
            elif _plain(value):
                parts.append((name, value))
            elif isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items()):
                parts.append((name, tuple(sorted(value.items()))))
            else:
                return None, f"{name} a {type(value).__name__}"
        return tuple(parts), ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._held_off:
            key, why = None, self._held_off
        elif args:
            key, why = None, "positional arguments"
        else:
            key, why = self._signature(kwargs)
        if key is not None and key in self._uncapturable:
            key, why = None, "not capturable"
        elif key is not None and torch.is_grad_enabled():
            key, why = None, "gradients on"
        if key is None:
            self.eager[why] += 1
            return self._forward(*args, **kwargs)
        addresses = self._weight_addresses()
        if addresses != self._weights_at:
            self.release()
            self._weights_at = addresses
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, kwargs)
            if captured is None:
                self.eager["not capturable"] += 1
                return self._forward(**kwargs)
        self._graphs.move_to_end(key)
        for name, static in captured.inputs.items():
            static.copy_(kwargs[name])
        captured.graph.replay()
        self.replays += 1
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, captured.output)

    def _capture(self, key: Hashable, kwargs: dict[str, Any]) -> _Captured | None:
        static = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()}
        warmups = 1 if key in self._warmed else 2  # the first calls compile, autotune and plan
        started = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmups):
                self._forward(**static)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.warmup_s += time.perf_counter() - started
        started = time.perf_counter()
        self._warmed.add(key)
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._forward(**static)
        except RuntimeError as error:  # an op that syncs with the host or is not capturable
            log.warning("transformer step not capturable as a CUDA graph, running eagerly: %s", error)
            self._uncapturable.add(key)
            return None
        self.captures += 1
        self.capture_s += time.perf_counter() - started
        inputs = {n: v for n, v in static.items() if isinstance(v, torch.Tensor)}
        self._graphs[key] = captured = _Captured(graph, inputs, output)
        return captured


def step_graphs(module: nn.Module) -> StepGraphs | None:
    """The StepGraphs installed on `module`, if any."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, StepGraphs) else None


def use_step_graphs(module: nn.Module) -> StepGraphs:
    """Install CUDA-graph replay on `module` (idempotent)."""
    return step_graphs(module) or StepGraphs(module).install()


def remove_step_graphs(module: nn.Module) -> None:
    """Uninstall graph replay from `module`, if installed, freeing its graphs (before the module is dropped:
    it breaks the module -> forward -> module cycle at once instead of at the next garbage collection)."""
    graphs = step_graphs(module)
    if graphs is not None:
        graphs.uninstall()
