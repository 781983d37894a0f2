"""Turn a model reference into local files: Hugging Face, S3 or a local path, one resolver.

Accepted transformer sources: a local `.gguf`/`.safetensors` path; `hf://owner/repo[@rev]/file`;
`https://huggingface.co/owner/repo/(resolve|blob)/rev/file`; `s3://bucket/key` (downloaded once into
the cache dir). Base pipelines: a local diffusers folder or a Hugging Face repo id. Hugging Face
reads its token from `HF_TOKEN` itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.errors import ModelLoadError, StorageError
from shared.settings import FarmSettings
from shared.storage import S3Store
from worker.file_digest import DigestCache
from worker.model_cache import ModelCache

_HF_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+)$")
_HF_SCHEME = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<file>.+)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

BASE_COMPONENT_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "vae/*",
    "transformer/config.json",
]
"""What a worker needs of a FLUX repo when the transformer weights come from elsewhere."""


def _hf_download(repo: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as error:  # the hub raises many types: network, auth, missing file
        raise ModelLoadError(f"could not download {filename} from Hugging Face repo {repo}: {error}") from error


def model_cache(settings: FarmSettings) -> ModelCache:
    return ModelCache(settings.cache_dir / "s3", settings.cache_max_gib, DigestCache(settings.cache_dir))


def _s3_download(source: str, settings: FarmSettings) -> Path:
    bucket, _, key = source.removeprefix("s3://").partition("/")
    cache = model_cache(settings)
    dest = cache.root / bucket / key
    if dest.is_file():
        cache.touch(dest)
        return dest
    store = S3Store(bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    try:
        cache.make_room(store.size(key))
        return store.fetch_to(key, dest)
    except StorageError as error:
        raise ModelLoadError(f"could not download {source}: {error}") from error


def resolve_file(source: str, settings: FarmSettings, sha256: str | None = None) -> Path:
    """A local path to the file `source` names, downloading it first when it is remote.

    With `sha256`, the file must have that digest (a cached download that does not is deleted).
    """
    owned = False
    if match := _HF_SCHEME.match(source) or _HF_URL.match(source):
        path = _hf_download(match["repo"], match["file"], match["rev"])
    elif source.startswith("s3://"):
        path, owned = _s3_download(source, settings), True
    elif source.startswith(("http://", "https://")):
        raise ModelLoadError(f"{source}: only huggingface.co URLs, hf://, s3:// and local paths are supported")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"transformer file {path} does not exist")
    if sha256 is not None:
        model_cache(settings).verify(path, sha256, owned)
    return path


def resolve_base(model: str, settings: FarmSettings, with_transformer_weights: bool) -> Path:
    """A local diffusers folder for the base pipeline: the folder itself, or a snapshot of a repo."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if not _REPO_ID.match(model):
        raise ModelLoadError(f"model {model!r} is neither a diffusers folder nor a Hugging Face repo id")
    from huggingface_hub import snapshot_download

    patterns = BASE_COMPONENT_PATTERNS + (["transformer/*"] if with_transformer_weights else [])
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as error:  # network, auth (gated FLUX.1-dev needs HF_TOKEN), missing repo
        raise ModelLoadError(f"could not fetch base pipeline {model} from Hugging Face: {error}") from error
