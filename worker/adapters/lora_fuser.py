"""Fuse a job's LoRA set into the loaded weights, so a LoRA job renders at its level's plain speed.

diffusers (and ComfyUI-GGUF) apply a LoRA beside each quantized layer at every step: a dequantized
weight plus two extra matmuls, markedly slower. Here each updated weight is computed once per LoRA
set: read the layer as floats, add `scale * weight * up @ down` of every LoRA in the set, and store
it back in the layer's own format: bf16 rows as they are, fp8 rows with fresh scales, GGUF blocks
re-quantized to the same block type with our quantizer. Steps then run the unchanged fast paths.

A switch is a transaction: if anything fails half way (the GPU runs out of memory, a cached part is
unreadable), every changed layer gets its base weight back before the error goes on, so the next job
never renders with half a LoRA while its metadata says none. Writing the disk cache is not part of
it: a full disk drops the cache folder with a warning and the fused weights are used as they are.

Re-quantizing a 12B-parameter transformer takes a while, so for GGUF levels the fused blocks are
kept on disk, keyed by the base file's sha256, the level and the LoRA files' sha256 and weights; a
worker that meets the set again (or another worker sharing the cache) loads them instead. The
weights a set replaces are kept in host memory, so the next set (or none) starts from the base.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fluxfarm.shared.adapters import LoraSpec, lora_set_id
from fluxfarm.shared.errors import JobInputError
from fluxfarm.shared.metadata import LoraInfo
from fluxfarm.shared.units import GIB
from fluxfarm.worker.adapters.lora_files import LowRank, read_lora
from fluxfarm.worker.adapters.weight_slots import Storage, WeightSlot, check_update_shape, find_slots
from fluxfarm.worker.model.file_digest import DigestCache
from fluxfarm.worker.model.sources import resolve_job_file
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

FUSED_FORMAT = 1
"""Part of every disk cache key: a change to how fused blocks are made invalidates the old ones."""
_CHUNK_BYTES = GIB
"""Fused blocks are written in files of about this size, so no set has to sit in host memory whole."""


@dataclass(frozen=True)
class LoadedLora:
    spec: LoraSpec
    sha256: str
    updates: dict[str, LowRank]

    @property
    def info(self) -> LoraInfo:
        return LoraInfo(source=self.spec.source, sha256=self.sha256, weight=self.spec.weight)


class FusedCache:
    """Fused GGUF blocks on disk: one folder per (base, level, LoRA set), its manifest written last.

    Bounded in bytes: the least recently used sets go first, whole (a set with some of its parts
    gone would only be fused again), and half-written folders of sets that failed go before any."""

    def __init__(self, root: Path, max_gib: float) -> None:
        self.root = root
        self.max_bytes = int(max_gib * GIB)

    def folder(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> dict[str, Storage] | None:
        folder = self.folder(key)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return None
        os.utime(manifest)  # used now: the last set to be evicted
        stored: dict[str, Storage] = {}
        for path in sorted(folder.glob("part-*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    slot, _, part = name.rpartition(":")
                    stored.setdefault(slot, {})[part] = handle.get_tensor(name)
        return stored

    def writer(self, key: str) -> _ChunkWriter:
        return _ChunkWriter(self.folder(key), self)

    def make_room(self, incoming_bytes: int, writing: Path) -> None:
        """Evict other sets, least recently used first, until `incoming_bytes` more fit; OSError (as a full
        disk would raise) when they cannot."""
        if incoming_bytes + _folder_bytes(writing) > self.max_bytes:
            raise OSError(
                errno.ENOSPC, f"a LoRA set larger than FLUXFARM_FUSED_CACHE_MAX_GIB ({self.max_bytes / GIB:.1f} GiB)"
            )
        others = [folder for folder in self.root.iterdir() if folder.is_dir() and folder != writing]

        def last_used(folder: Path) -> float:
            manifest = folder / "manifest.json"
            return manifest.stat().st_mtime if manifest.is_file() else 0.0  # half-written: first out

        sizes = {folder: _folder_bytes(folder) for folder in others}
        used = sum(sizes.values()) + _folder_bytes(writing)
        for folder in sorted(others, key=last_used):
            if used + incoming_bytes <= self.max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            used -= sizes[folder]
            log.info("fused LoRA set %s evicted from the cache (least recently used)", folder.name)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*") if path.is_file()) if folder.is_dir() else 0


class _ChunkWriter:
    """Writes one set's fused blocks. A write that fails (a full disk) abandons the folder: the cache
    is a saving, never a reason to fail the job whose weights are already fused."""

    def __init__(self, folder: Path, cache: FusedCache) -> None:
        self._folder, self._cache = folder, cache
        self._pending: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._parts = 0
        self._abandoned = False
        self._guarded(lambda: folder.mkdir(parents=True, exist_ok=True))

    def _guarded(self, write: Callable[[], object]) -> None:
        if self._abandoned:
            return
        try:
            write()
        except OSError as error:
            log.warning("fused LoRA blocks not cached in %s: %s", self._folder, error)
            self._abandoned, self._pending = True, {}
            shutil.rmtree(self._folder, ignore_errors=True)

    def add(self, slot: str, data: Storage) -> None:
        if self._abandoned:
            return
        for part, tensor in data.items():
            self._pending[f"{slot}:{part}"] = tensor.to("cpu").contiguous()
            self._bytes += tensor.numel() * tensor.element_size()
        if self._bytes >= _CHUNK_BYTES:
            self._guarded(self._flush)

    def _flush(self) -> None:
        if not self._pending:
            return
        self._cache.make_room(self._bytes, self._folder)
        path = self._folder / f"part-{self._parts:04d}.safetensors"
        partial = path.with_name(f".{path.name}.partial")
        save_file(self._pending, str(partial))
        partial.replace(path)
        self._parts += 1
        self._pending, self._bytes = {}, 0

    def finish(self, description: dict[str, object]) -> None:
        self._guarded(self._flush)
        self._guarded(lambda: (self._folder / "manifest.json").write_text(json.dumps(description, indent=2)))


class LoraFuser:
    """Which LoRA set a pipeline's weights carry now, and the switch to another set (or none)."""

    def __init__(
        self,
        components: dict[str, nn.Module | None],
        base_sha256: Callable[[], str],
        level: str,
        settings: WorkerSettings,
        before_layer: Callable[[int, str], None] | None = None,
        loader: Any = None,
    ) -> None:
        """`base_sha256` gives the base transformer's digest, asked for only when a set is fused (a worker's load may
        still be hashing its weights, worker/model/pipeline.py's LoadedWeights).
        `before_layer(layers done, level)` runs before each layer is fused: a fault drill's hook
        (worker/render/fault_injection.py), None in service. `loader` is the family's pipeline class, whose
        `lora_state_dict` reads the files (FLUX.1's when not given)."""
        self._loader = loader
        self._components = {name: module for name, module in components.items() if module is not None}
        self._slots: dict[str, dict[str, WeightSlot]] = {}
        self._base_sha256 = base_sha256
        self._level = level
        self._settings = settings
        self._digests = DigestCache(settings.cache_dir)
        self._cache = FusedCache(settings.cache_dir / "fused-lora", settings.fused_cache_max_gib)
        self._originals: dict[str, Storage] = {}
        self.active_id: str | None = None
        self.active: tuple[LoadedLora, ...] = ()
        self.touches_text_encoder = False
        self.last_fuse_s = 0.0
        self.last_fuse_from_cache = False
        self.switches = 0
        """How many times the weights were changed (a fused set, a restore, a roll-back): a host copy
        of them is stale once this moves."""
        self._settled = True
        """False while a switch is under way, and after one whose roll-back failed too: the next
        `activate` then restores the base weights whatever set it is asked for."""
        self._before_layer = before_layer

    def _slot(self, qualified: str, source: str) -> WeightSlot:
        component, _, module = qualified.partition(".")
        if component not in self._components:
            raise JobInputError(f"LoRA {source} updates {component}, which this worker does not hold")
        if component not in self._slots:
            self._slots[component] = find_slots(self._components[component])
        slot = self._slots[component].get(module)
        if slot is None:
            raise JobInputError(
                f"LoRA {source} updates {qualified}, a layer this model does not have (a LoRA for another base model?)"
            )
        return slot

    def _load(self, spec: LoraSpec) -> LoadedLora:
        path = resolve_job_file(spec.source, self._settings, "LoRA")
        return LoadedLora(
            spec=spec, sha256=self._digests.sha256(path), updates=read_lora(path, spec.source, self._loader)
        )

    def _targets(self, loras: Sequence[LoadedLora]) -> dict[str, list[tuple[LowRank, float]]]:
        """Every slot the set updates, with its updates; checked against this model before anything changes."""
        targets: dict[str, list[tuple[LowRank, float]]] = {}
        for lora in loras:
            for qualified, update in lora.updates.items():
                slot = self._slot(qualified, lora.spec.source)
                check_update_shape(slot, update.up.shape[0], update.down.shape[1], lora.spec.source)
                targets.setdefault(qualified, []).append((update, lora.spec.weight))
        return targets

    def _cache_key(self, loras: Sequence[LoadedLora]) -> str:
        parts = sorted((lora.sha256, lora.spec.weight) for lora in loras)
        text = json.dumps([FUSED_FORMAT, self._base_sha256(), self._level, parts])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def activate(self, specs: Sequence[LoraSpec]) -> tuple[LoadedLora, ...]:
        """Make the weights carry exactly `specs` (none: the base weights). A LoRA that cannot be used
        raises JobInputError before any weight changes."""
        set_id = lora_set_id(specs)
        if self._settled and set_id == self.active_id:
            return self.active
        started = time.perf_counter()
        loras = tuple(self._load(spec) for spec in specs)
        targets = self._targets(loras)
        self._settled, self.switches = False, self.switches + 1
        self.active_id, self.active, self.touches_text_encoder = None, (), False
        try:
            self._restore(keep=set(targets))
            from_cache = self._fuse(loras, targets) if targets else False
        except BaseException:
            self._restore(keep=set())  # if this fails too, the next activate tries again
            self._settled = True
            log.warning("fusing LoRA set %s failed half way; the base weights are back", set_id)
            raise
        self._settled = True
        self.active_id, self.active = set_id, loras
        self.touches_text_encoder = any(name.startswith("text_encoder.") for name in targets)
        self.last_fuse_s, self.last_fuse_from_cache = time.perf_counter() - started, from_cache
        if set_id is not None:
            log.info(
                "LoRA set %s fused into %d layers in %.1fs%s",
                set_id,
                len(targets),
                self.last_fuse_s,
                " (from the disk cache)" if from_cache else "",
            )
        return loras

    def _restore(self, keep: set[str]) -> None:
        """Put the base weights back into every slot a set changed, except those about to be fused again."""
        for qualified, original in self._originals.items():
            if qualified not in keep:
                slot = self._slot(qualified, "base")
                slot.write({key: tensor.to(slot.device) for key, tensor in original.items()})

    def _base(self, qualified: str, slot: WeightSlot) -> torch.Tensor:
        """The slot's base weight as floats: its saved original once a set has changed it."""
        original = self._originals.get(qualified)
        if original is None:
            self._originals[qualified] = slot.save()
            return slot.read()
        return slot.decode({key: tensor.to(slot.device) for key, tensor in original.items()})

    def _fuse(self, loras: Sequence[LoadedLora], targets: dict[str, list[tuple[LowRank, float]]]) -> bool:
        """Write every target slot; GGUF blocks come from the disk cache when this set was fused before."""
        key = self._cache_key(loras)
        cached = self._cache.load(key)
        writer = None
        if cached is None and any(self._slot(name, "").requantized for name in targets):
            writer = self._cache.writer(key)
        for done, (qualified, updates) in enumerate(targets.items()):
            if self._before_layer is not None:
                self._before_layer(done, self._level)
            slot = self._slot(qualified, "")
            if cached is not None and qualified in cached:
                self._originals.setdefault(qualified, slot.save())
                slot.write({k: t.to(slot.device) for k, t in cached[qualified].items()})
                continue
            dense = self._base(qualified, slot)
            for update, weight in updates:
                dense += update.delta(dense.device, weight)
            encoded = slot.encode(dense)
            slot.write(encoded)
            if writer is not None and slot.requantized:
                writer.add(qualified, encoded)
        if writer is not None:
            loras_info = [lora.info.model_dump() for lora in loras]
            writer.finish({"base_sha256": self._base_sha256(), "level": self._level, "loras": loras_info})
        return cached is not None
