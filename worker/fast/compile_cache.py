"""Warm starts: torch.compile's artifacts shared through storage, so a new worker of a GPU class loads what
the first one compiled instead of compiling for a minute before its first image.

torch's "mega-cache" (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) serializes everything a
process compiled (Dynamo's and AOTAutograd's graphs, Inductor's code, Triton's kernels, autotuning choices)
into one blob and loads it into the local caches of another process, which then compiles from cache hits.
The blob is kept under a key derived from everything that makes it valid (`CompileCacheKey`): GPU class and
capability, torch, Triton, diffusers and fluxfarm versions, model, level, fast-path choices and the shapes
warmed. torch checks its own versions again on load.

A blob holds code the worker will run, so the store is not trusted with it: each blob is signed with
HMAC-SHA256 under FLUXFARM_COMPILE_CACHE_SECRET, a secret only workers hold, and one whose signature does not
verify is never loaded. Its size is checked before it is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

import torch
from pydantic import BaseModel, ConfigDict

from fluxfarm.shared import __version__, package_version
from fluxfarm.shared.errors import ObjectExists, StorageError
from fluxfarm.shared.storage import ObjectStore
from fluxfarm.shared.units import MIB

log = logging.getLogger(__name__)

BLOB_CONTENT_TYPE = "application/octet-stream"
_MAC_BYTES = 32
_FOLDER = "compile-cache"


class CompileCacheKey(BaseModel):
    """Everything a set of compiled artifacts is valid for; its digest names the blob."""

    model_config = ConfigDict(frozen=True)

    device: str
    """The GPU's name, or "cpu"."""
    capability: str
    torch: str
    triton: str
    diffusers: str
    fluxfarm: str
    model: str
    level: str
    fast_paths: str
    """The worker's fast-path choices (kernels, attention, CUDA graphs) as JSON: each compiles other code."""
    shapes: tuple[str, ...]
    """The shapes warmed before the blob was saved (`WxH@batch`), or ("first-use",)."""

    @classmethod
    def for_device(
        cls, device: str, model: str, level: str, fast_paths: str, shapes: tuple[str, ...]
    ) -> CompileCacheKey:
        dev = torch.device(device)
        cuda = dev.type == "cuda"
        capability = ".".join(map(str, torch.cuda.get_device_capability(dev))) if cuda else "-"
        return cls(
            device=torch.cuda.get_device_name(dev) if cuda else "cpu",
            capability=capability,
            torch=torch.__version__,
            triton=package_version("triton"),
            diffusers=package_version("diffusers"),
            fluxfarm=__version__,
            model=model,
            level=level,
            fast_paths=fast_paths,
            shapes=shapes,
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class SharedCompileCache:
    """Signed compile artifacts in a store, one blob per `CompileCacheKey`."""

    def __init__(self, store: ObjectStore, secret: bytes, max_bytes: int = 512 * MIB) -> None:
        if len(secret) < 16:
            raise ValueError("the compile cache secret must be at least 16 bytes")
        self.store = store
        self._secret = secret
        self.max_bytes = max_bytes

    def object_key(self, key: CompileCacheKey) -> str:
        return self.store.key(_FOLDER, f"{key.digest()}.bin")

    def _mac(self, key: CompileCacheKey, payload: bytes) -> bytes:
        return hmac.new(self._secret, key.digest().encode() + payload, hashlib.sha256).digest()

    def load(self, key: CompileCacheKey) -> bool:
        """Load the artifacts stored for `key` into this process's compile caches. False when there are none,
        or they are too large, unsigned or signed with another secret (each said in the log)."""
        name = self.object_key(key)
        try:
            if not self.store.exists(name):
                log.info("compile cache: nothing stored for this worker's class yet (%s)", name)
                return False
            size = self.store.size(name)
            if size > self.max_bytes + _MAC_BYTES:
                log.warning("compile cache: %s is %d bytes, over the %d allowed", name, size, self.max_bytes)
                return False
            blob = self.store.get(name)
        except StorageError as error:
            log.warning("compile cache: %s could not be read: %s", name, error)
            return False
        mac, payload = blob[:_MAC_BYTES], blob[_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(key, payload)):
            log.error("compile cache: %s is not signed with this farm's secret; not loaded", name)
            return False
        torch.compiler.load_cache_artifacts(payload)
        log.info("compile cache: loaded %d bytes of compiled artifacts from %s", len(payload), name)
        return True

    def publish(self, key: CompileCacheKey) -> bool:
        """Store what this process compiled under `key`, unless a blob is there already (the first worker of
        a class publishes; the others load). True when this call stored it."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None or not saved[0]:
            log.info("compile cache: nothing compiled to publish")
            return False
        payload = saved[0]
        if len(payload) > self.max_bytes:
            log.warning("compile cache: %d bytes compiled, over the %d allowed", len(payload), self.max_bytes)
            return False
        name = self.object_key(key)
        try:
            self.store.put(name, self._mac(key, payload) + payload, BLOB_CONTENT_TYPE, if_absent=True)
        except ObjectExists:
            return False
        except StorageError as error:
            log.warning("compile cache: %s could not be stored: %s", name, error)
            return False
        log.info("compile cache: published %d bytes of compiled artifacts to %s", len(payload), name)
        return True
