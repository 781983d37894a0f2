"""The shared compile cache: what one process compiled, another with empty local caches loads from S3 (over
HTTP, moto) and compiles from cache hits; a blob not signed with the farm's secret is never loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxfarm.shared.settings import FarmSettings
from fluxfarm.shared.storage import open_store_url
from fluxfarm.worker.fast.compile_cache import CompileCacheKey, SharedCompileCache
from tests.conftest import S3Server

SECRET = "a-test-secret-of-32-characters!!"

# One process: compile a small function on the CPU (Inductor's C++ backend), with the shared cache around it.
_PROCESS = """
import json, os, sys
import torch
from torch._dynamo.utils import counters
from fluxfarm.shared.settings import FarmSettings
from fluxfarm.shared.storage import open_store_url
from fluxfarm.worker.fast.compile_cache import CompileCacheKey, SharedCompileCache

action, url, secret = sys.argv[1:4]
cache = SharedCompileCache(open_store_url(url, FarmSettings()), secret.encode())
key = CompileCacheKey.for_device("cpu", "flux.1-dev", "bf16", "{}", ("64x64@1",))
loaded = cache.load(key) if action.startswith("load") else False

@torch.compile(fullgraph=True, dynamic=False)
def block(x, w):
    return torch.nn.functional.gelu(x @ w) * torch.sigmoid(x.sum(-1, keepdim=True))

block(torch.randn(8, 32), torch.randn(32, 32))
published = cache.publish(key) if action.endswith("publish") else False
print(json.dumps({"loaded": loaded, "published": published,
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _process(action: str, url: str, tmp: Path, s3: S3Server, secret: str = SECRET) -> dict[str, object]:
    """Run `_PROCESS` with local compile caches of its own, empty (as on a fresh machine)."""
    local = tmp / f"local-{action}-{len(list(tmp.iterdir()))}"
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(local / "inductor"),
        "TRITON_CACHE_DIR": str(local / "triton"),
        "FLUXFARM_S3_ENDPOINT_URL": s3.endpoint_url,
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROCESS, action, url, secret],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def store_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FLUXFARM_S3_ENDPOINT_URL", s3_server.endpoint_url)
    return f"s3://{s3_server.new_bucket()}/farm"


def test_a_fresh_process_compiles_from_what_another_published(
    store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    first = _process("publish", store_url, tmp_path, s3_server)
    assert first == {"loaded": False, "published": True, "hits": 0, "misses": 1}
    bucket = store_url.removeprefix("s3://").split("/")[0]
    (blob,) = s3_server.keys(bucket, "farm/compile-cache/")
    assert blob.endswith(".bin")

    cold = _process("none", store_url, tmp_path, s3_server)  # empty local caches, nothing loaded: compiles
    assert cold["misses"] == 1 and cold["hits"] == 0
    # Empty local caches, loaded from S3: a hit. Its publish finds the blob there: the first one stays.
    warm = _process("load-publish", store_url, tmp_path, s3_server)
    assert warm == {"loaded": True, "published": False, "hits": 1, "misses": 0}
    assert s3_server.keys(bucket, "farm/compile-cache/") == [blob]


def test_a_blob_not_signed_with_the_farm_secret_is_not_loaded(
    store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    assert _process("publish", store_url, tmp_path, s3_server)["published"] is True
    store = open_store_url(store_url, FarmSettings())
    key = CompileCacheKey.for_device("cpu", "flux.1-dev", "bf16", "{}", ("64x64@1",))
    assert SharedCompileCache(store, b"another-secret-of-32-characters!").load(key) is False
    cache = SharedCompileCache(store, SECRET.encode())
    name = cache.object_key(key)
    blob = bytearray(store.get(name))
    blob[-1] ^= 0xFF  # one byte of the artifacts changed in the store
    store.delete(name)
    store.put(name, bytes(blob), "application/octet-stream")
    assert cache.load(key) is False

    small = SharedCompileCache(store, SECRET.encode(), max_bytes=len(blob) // 2)
    assert small.load(key) is False  # over the size bound: refused before it is read


def test_the_key_names_what_makes_artifacts_valid() -> None:
    key = CompileCacheKey.for_device("cpu", "flux.1-dev", "bf16", "{}", ("1024x1024@1",))
    assert key.torch and key.diffusers != "absent" and key.fluxfarm
    digests = {
        key.digest(),
        key.model_copy(update={"level": "fp8"}).digest(),
        key.model_copy(update={"shapes": ("1024x1024@2",)}).digest(),
        key.model_copy(update={"capability": "9.0", "device": "NVIDIA H200"}).digest(),
        key.model_copy(update={"torch": "2.11.0"}).digest(),
    }
    assert len(digests) == 5
    with pytest.raises(ValueError, match="16 bytes"):
        SharedCompileCache(open_store_url("file:///tmp/unused", FarmSettings()), b"short")
