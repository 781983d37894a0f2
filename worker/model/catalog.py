"""Where each level of a known model lives: built in for FLUX.1-dev, FLUX.1-schnell and FLUX.2-dev (city96's
published GGUF files) and FLUX.2 [klein] 9B (the levels unsloth publishes whose file names we have seen:
Q8_0, Q5_0 and Q4_K_M; klein 4B's GGUF names are not built in until seen, so a wrong guess can never strand a
worker at load), overridable by a TOML file (`FLUXFARM_CATALOG`), e.g. for a private bucket:

    [models."black-forest-labs/FLUX.1-dev"]
    Q8_0 = { source = "s3://models/flux1-dev-Q8_0.gguf", sha256 = "9f2c..." }
    Q4_K = "/mnt/models/flux1-dev-Q4_K_S.gguf"

A pinned sha256 is checked before the file is loaded. bf16, fp8 and nf4 need no entry: they load the
base repo's bf16 transformer (fp8 and nf4 quantize it on the host; nf4 only where bitsandbytes is
installed, and only on a CUDA GPU, where bitsandbytes quantizes).
"""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fluxfarm.shared.errors import ModelLoadError
from fluxfarm.shared.ladder import QuantLevel, parse_level
from fluxfarm.shared.models import LEGACY_MODEL, MODELS, FluxModel, model_of_repo

_CITY96_SUFFIX = {
    QuantLevel.Q8_0: "Q8_0",
    QuantLevel.Q6_K: "Q6_K",
    QuantLevel.Q5_K: "Q5_K_S",
    QuantLevel.Q5_1: "Q5_1",
    QuantLevel.Q5_0: "Q5_0",
    QuantLevel.Q4_K: "Q4_K_S",
    QuantLevel.Q4_1: "Q4_1",
    QuantLevel.Q4_0: "Q4_0",
    QuantLevel.Q3_K: "Q3_K_S",
    QuantLevel.Q2_K: "Q2_K",
}
_UNSLOTH_SUFFIX = {QuantLevel.Q8_0: "Q8_0", QuantLevel.Q5_0: "Q5_0", QuantLevel.Q4_K: "Q4_K_M"}
_BUILT_IN_REPOS = {
    "black-forest-labs/FLUX.1-dev": ("city96/FLUX.1-dev-gguf", "flux1-dev", _CITY96_SUFFIX),
    "black-forest-labs/FLUX.1-schnell": ("city96/FLUX.1-schnell-gguf", "flux1-schnell", _CITY96_SUFFIX),
    "black-forest-labs/FLUX.2-dev": ("city96/FLUX.2-dev-gguf", "flux2-dev", _CITY96_SUFFIX),
    "black-forest-labs/FLUX.2-klein-9B": ("unsloth/FLUX.2-klein-9B-GGUF", "flux-2-klein-9b", _UNSLOTH_SUFFIX),
}
BASE_WEIGHT_LEVELS = (QuantLevel.BF16, QuantLevel.FP8, QuantLevel.NF4)


@dataclass(frozen=True)
class CatalogEntry:
    source: str
    sha256: str | None = None


Catalog = dict[str, dict[QuantLevel, CatalogEntry]]


def built_in_catalog() -> Catalog:
    return {
        model: {level: CatalogEntry(f"hf://{repo}/{stem}-{suffix}.gguf") for level, suffix in suffixes.items()}
        for model, (repo, stem, suffixes) in _BUILT_IN_REPOS.items()
    }


def _entry(value: object, where: str) -> CatalogEntry:
    if isinstance(value, str):
        return CatalogEntry(value)
    if isinstance(value, dict) and isinstance(value.get("source"), str):
        sha256 = value.get("sha256")
        return CatalogEntry(value["source"], str(sha256).lower() if sha256 else None)
    raise ModelLoadError(f"catalog entry {where} must be a source string or {{ source = ..., sha256 = ... }}")


def load_catalog(override: Path | None) -> Catalog:
    """The built-in catalog, with the TOML file's entries replacing or adding levels per model."""
    catalog = built_in_catalog()
    if override is None:
        return catalog
    try:
        data = tomllib.loads(override.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ModelLoadError(f"cannot read model catalog {override}: {error}") from None
    for model, levels in data.get("models", {}).items():
        entries = catalog.setdefault(model, {})
        for name, value in levels.items():
            entries[parse_level(name)] = _entry(value, f"{model}.{name}")
    return catalog


def resolve_model(source: str, named: FluxModel | None = None) -> tuple[str, FluxModel]:
    """What a worker loads for FLUXFARM_MODEL `source`, and the catalog model it serves (its queues): a
    catalog name (`flux.2-klein-4b`) loads that model's Hub repo; a Hub repo of the catalog serves its
    model; any other repo or folder serves FLUXFARM_MODEL_NAME (`named`), or FLUX.1 [dev] when unset."""
    try:
        catalog_name = FluxModel(source.strip().lower())
    except ValueError:
        catalog_name = None
    if catalog_name is not None:
        source = MODELS[catalog_name].hub_repo
    by_repo = model_of_repo(source)
    if named is not None and by_repo is not None and named != by_repo:
        raise ModelLoadError(f"FLUXFARM_MODEL_NAME says {named.value}, but {source} is {by_repo.value}")
    return source, by_repo or named or LEGACY_MODEL


def nf4_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def available_levels(catalog: Catalog, model: str) -> list[QuantLevel]:
    """Levels a worker can load for `model` without being handed a transformer file."""
    base = [level for level in BASE_WEIGHT_LEVELS if level != QuantLevel.NF4 or nf4_installed()]
    return [*base, *catalog.get(model, {})]
