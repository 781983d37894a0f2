"""Turn a model reference into local files: Hugging Face, S3 or a local path, one resolver.

Accepted transformer sources: a local `.gguf`/`.safetensors` path; `hf://owner/repo[@rev]/file`;
`https://huggingface.co/owner/repo/(resolve|blob)/rev/file`; `s3://bucket/key` (downloaded once into
the cache dir). Base pipelines: a local diffusers folder or a Hugging Face repo id. Hugging Face
reads its token from `HF_TOKEN` itself.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fluxfarm.shared.errors import JobInputError, ModelLoadError, ModelMissing, ObjectNotFound, StorageError
from fluxfarm.shared.s3_store import S3Store
from fluxfarm.shared.units import GIB
from fluxfarm.worker.model.cache import ModelCache
from fluxfarm.worker.model.file_digest import DigestCache
from fluxfarm.worker.settings import WorkerSettings

_HF_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+)$")
_HF_SCHEME = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<file>.+)$")
_HF_FOLDER = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?$")
log = logging.getLogger(__name__)

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


def _hf_error(error: Exception, what: str) -> ModelLoadError:
    """ModelMissing when the hub says the repo, revision or file does not exist; ModelLoadError otherwise
    (network, auth), which a later attempt may get past."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    missing = isinstance(error, EntryNotFoundError | RepositoryNotFoundError | RevisionNotFoundError)
    return (ModelMissing if missing else ModelLoadError)(f"could not download {what} from Hugging Face: {error}")


def _hf_download(repo: str, filename: str, revision: str | None, limit: _SizeLimit | None = None) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        if limit is not None:  # the size the Hub reports, before a byte is downloaded
            limit.check_file(get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision)).size)
        return Path(hf_hub_download(repo, filename, revision=revision))
    except JobInputError:
        raise
    except Exception as error:  # the hub raises many types: network, auth, missing file
        raise _hf_error(error, f"{filename} of repo {repo}") from error


class _SizeLimit:
    """What a job may make a worker fetch: a file's bytes, a folder's files and bytes. A source past them
    fails the job at once (JobInputError), before anything is downloaded."""

    def __init__(self, settings: WorkerSettings, what: str, source: str) -> None:
        self.what, self.source = what, source
        self.file_bytes = int(settings.job_file_max_gib * GIB)
        self.folder_bytes = int(settings.job_folder_max_gib * GIB)
        self.folder_files = settings.job_folder_max_files

    def check_file(self, size: int | None) -> None:
        if size is not None and size > self.file_bytes:
            raise JobInputError(
                f"{self.what} {self.source} is {size / GIB:.2f} GiB, more than the {self.file_bytes / GIB:.2f} GiB "
                "a job may make a worker fetch (FLUXFARM_JOB_FILE_MAX_GIB)"
            )

    def check_folder(self, sizes: list[int]) -> None:
        if len(sizes) > self.folder_files:
            raise JobInputError(
                f"{self.what} {self.source} holds more than {self.folder_files} files, the most a job may make a "
                "worker fetch (FLUXFARM_JOB_FOLDER_MAX_FILES)"
            )
        if (total := sum(sizes)) > self.folder_bytes:
            raise JobInputError(
                f"{self.what} {self.source} is {total / GIB:.2f} GiB, more than the {self.folder_bytes / GIB:.2f} "
                "GiB a job may make a worker fetch (FLUXFARM_JOB_FOLDER_MAX_GIB)"
            )

    def check_on_disk(self, folder: Path) -> None:
        """The folder as downloaded (a Hub snapshot that could not be sized first, e.g. offline)."""
        files = [path for path in folder.rglob("*") if path.is_file()]
        self.check_folder([path.stat().st_size for path in files[: self.folder_files + 1]])


def model_cache(settings: WorkerSettings) -> ModelCache:
    return ModelCache(settings.cache_dir / "s3", settings.cache_max_gib, DigestCache(settings.cache_dir))


def bucket_store(bucket: str, settings: WorkerSettings) -> S3Store:
    """The store of a bucket a model or job input lives in, on the farm's S3 endpoint and CA."""
    return S3Store(
        bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region, ca_file=settings.tls_ca_file
    )


def _s3_download(source: str, settings: WorkerSettings, limit: _SizeLimit | None = None) -> Path:
    bucket, _, key = source.removeprefix("s3://").partition("/")
    cache = model_cache(settings)
    dest = cache.path_for(bucket, key)
    if dest.is_file():
        cache.touch(dest)
        return dest
    store = bucket_store(bucket, settings)
    try:
        size = store.size(key)
        if limit is not None:
            limit.check_file(size)
        cache.make_room(size)
        return store.fetch_to(key, dest)
    except ObjectNotFound as error:
        raise ModelMissing(f"{source} does not exist: {error}") from error
    except StorageError as error:
        raise ModelLoadError(f"could not download {source}: {error}") from error


def resolve_file(
    source: str, settings: WorkerSettings, sha256: str | None = None, limit: _SizeLimit | None = None
) -> Path:
    """A local path to the file `source` names, downloading it first when it is remote.

    With `sha256`, the file must have that digest (a cached download that does not is deleted). With
    `limit` (a file a job names), a file past it is refused before it is downloaded or read.
    """
    owned = False
    if match := _HF_SCHEME.match(source) or _HF_URL.match(source):
        path = _hf_download(match["repo"], match["file"], match["rev"], limit)
    elif source.startswith("s3://"):
        path, owned = _s3_download(source, settings, limit), True
    elif source.startswith(("http://", "https://")):
        raise ModelLoadError(f"{source}: only huggingface.co URLs, hf://, s3:// and local paths are supported")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelMissing(f"file {path} does not exist")
    if limit is not None:
        limit.check_file(path.stat().st_size)  # a cached copy, or a path on the worker
    if sha256 is not None:
        model_cache(settings).verify(path, sha256, owned)
    return path


def resolve_base(model: str, settings: WorkerSettings, with_transformer_weights: bool) -> Path:
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


def _job_path(source: str, settings: WorkerSettings, what: str) -> Path:
    """A worker path a job names, allowed only under FLUXFARM_JOB_FILE_ROOTS (symlinks resolved first)."""
    path = Path(source).resolve()
    if not any(path.is_relative_to(root) for root in settings.job_file_roots):
        raise JobInputError(f"{what} {source}: this worker reads job paths only under FLUXFARM_JOB_FILE_ROOTS")
    if not path.exists():
        raise JobInputError(f"{what} {source} does not exist")
    return path


def resolve_job_file(source: str, settings: WorkerSettings, what: str) -> Path:
    """A file a job names (a LoRA, a control image), local. A missing file fails the job (JobInputError);
    an unreachable source is a ModelLoadError, which the job's next attempt retries."""
    limit = _SizeLimit(settings, what, source)
    if source.startswith("/"):
        path = _job_path(source, settings, what)
        if not path.is_file():
            raise JobInputError(f"{what} {source} is not a file")
        limit.check_file(path.stat().st_size)
        return path
    try:
        return resolve_file(source, settings, limit=limit)
    except ModelMissing as error:
        raise JobInputError(f"{what}: {error}") from None


def _s3_folder(source: str, settings: WorkerSettings, what: str) -> Path:
    """Every object under an s3:// prefix, downloaded once into the cache (a diffusers model folder)."""
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    cache = model_cache(settings)
    dest = cache.path_for(bucket, prefix)
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    store = bucket_store(bucket, settings)
    limit = _SizeLimit(settings, what, source)
    try:
        sized = store.sizes_under(prefix, limit.folder_files + 1)
        if not sized:
            raise JobInputError(f"{what} {source}: no objects under that prefix")
        limit.check_folder(list(sized.values()))
        cache.make_room(sum(sized.values()))
        for key in sized:
            store.fetch_to(key, cache.path_for(bucket, key))
    except StorageError as error:
        raise ModelLoadError(f"could not download {what} {source}: {error}") from error
    marker.touch()
    return dest


def resolve_job_folder(source: str, settings: WorkerSettings, what: str) -> Path:
    """A model folder a job names (a ControlNet): a worker path, hf://owner/repo[@rev][/subfolder] or s3://."""
    if source.startswith("/"):
        path = _job_path(source, settings, what)
        if not path.is_dir():
            raise JobInputError(f"{what} {source} is not a folder")
        return path
    if source.startswith("s3://"):
        return _s3_folder(source, settings, what)
    match = _HF_FOLDER.match(source)
    if match is None:
        raise JobInputError(
            f"{what} {source} must be a worker folder, hf://owner/repo[/subfolder] or s3://bucket/prefix"
        )
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    sub = match["sub"]
    patterns = [f"{sub}/*"] if sub else ["*.json", "*.safetensors"]
    limit = _SizeLimit(settings, what, source)
    try:
        # The sizes the Hub reports, before a byte is downloaded; offline, the snapshot in the cache is
        # measured instead.
        info = HfApi().model_info(match["repo"], revision=match["rev"], files_metadata=True)
        files = filter_repo_objects(info.siblings or [], allow_patterns=patterns, key=lambda entry: entry.rfilename)
        limit.check_folder([entry.size or 0 for entry in files])
    except JobInputError:
        raise
    except Exception as error:
        log.info("could not size %s %s on the Hub before fetching it: %s", what, source, error)
    try:
        root = Path(snapshot_download(match["repo"], revision=match["rev"], allow_patterns=patterns))
    except Exception as error:  # network, auth, missing repo
        hub_error = _hf_error(error, f"{what} {match['repo']}")
        raise (JobInputError(str(hub_error)) if isinstance(hub_error, ModelMissing) else hub_error) from error
    folder = root / sub if sub else root
    limit.check_on_disk(folder)
    return folder
