"""`fluxfarm export`: a dataset out of the farm's storage in a form people load.

- imagefolder: Hugging Face's layout, `<job_id>.png` beside a `metadata.jsonl` whose `file_name`
  names each image (`datasets.load_dataset("imagefolder", data_dir=...)`);
- parquet: one row per image, every metadata field flattened into a column, the image's key and URI;
- jsonl: one stored metadata document per line;
- webdataset: `.tar` shards of about `shard_bytes`, a `.png` and a `.json` per sample;
- contact-sheet: one grid PNG of the first images with their prompts, for a quick look.

Only finished jobs (metadata JSON stored) are exported, in job id order. Objects are fetched by a few
threads at once, and large files are built in a temporary folder one at a time, so memory and disk
stay bounded whatever the dataset's size. The destination is a folder or an s3:// URL.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel

from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.metadata import CalibrationCite, RenderResult, read_result
from fluxfarm.shared.storage import PNG_CONTENT_TYPE, ObjectStore, ResultKeys
from fluxfarm.shared.units import GIB

if typing.TYPE_CHECKING:
    import pyarrow as pa

ExportFormat = Literal["imagefolder", "parquet", "jsonl", "webdataset", "contact-sheet"]
FETCH_THREADS = 8
FETCH_CHUNK = 64
"""Jobs fetched together: enough to keep FETCH_THREADS busy, few enough to bound memory."""
PARQUET_ROWS_PER_GROUP = 1000
DEFAULT_SHARD_BYTES = GIB
CONTACT_THUMB_PX = 256
CONTACT_CAPTION_CHARS = 40


class ExportSummary(BaseModel):
    format: str
    rows: int
    files: list[str]
    """URIs of what was written."""
    keys: list[str] = []
    """The same files' keys in the destination store (the gateway presigns them)."""


@dataclass(frozen=True)
class Row:
    result: RenderResult
    png: bytes | None


def _fetch(store: ObjectStore, keys: ResultKeys, with_image: bool) -> Row:
    result = read_result(store, keys)
    return Row(result=result, png=store.get(keys.image) if with_image else None)


def iter_rows(store: ObjectStore, keys: list[ResultKeys], with_images: bool) -> Iterator[Row]:
    """The jobs at `keys`, in order, fetched FETCH_THREADS at a time."""
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for start in range(0, len(keys), FETCH_CHUNK):
            chunk = keys[start : start + FETCH_CHUNK]
            yield from pool.map(lambda k: _fetch(store, k, with_images), chunk)


# ---- flat rows: one column per metadata field ---------------------------------------------------------


def flat_row(result: RenderResult) -> dict[str, Any]:
    """The metadata as one flat record: the job's fields as they are (prompt, seed, ...), everything else
    prefixed by its section (model_id, worker_node, timings_denoise_s, image_key, ...)."""
    data = result.model_dump(mode="json")
    job = data.pop("job")
    row: dict[str, Any] = {"job_id": data.pop("job_id")}
    row.update({name: _cell(value) for name, value in job.items() if name not in ("job_id", "quant")})
    row["quant_asked"] = job["quant"]
    for name, value in data.items():
        if _is_section(RenderResult.model_fields[name].annotation):
            row.update({f"{name}_{field}": _cell(inner) for field, inner in value.items()})
        elif name in FILTERABLE_SECTIONS:
            fields = FILTERABLE_SECTIONS[name].model_fields
            row.update({f"{name}_{field}": _cell(value[field]) if value else None for field in fields})
        else:
            row[name] = _cell(value)
    return row


FILTERABLE_SECTIONS: dict[str, type[BaseModel]] = {"calibration": CalibrationCite}
"""Optional sections flattened into columns (null where absent) so a dataset can be filtered by them: the
calibration's figures (calibration_psnr_db, calibration_ssim, ...). Other optional records are one JSON column."""


def _is_section(annotation: Any) -> TypeGuard[type[BaseModel]]:
    """A metadata section always present (model, worker, timings, image): flattened into prefixed columns."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _cell(value: Any) -> Any:
    """Lists and optional records (LoRAs, ControlNet) go into one column as JSON text."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value


def _arrow_type(annotation: Any) -> pa.DataType:
    import pyarrow as pa  # here, not at the top: the CLI starts without it

    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _arrow_type(args[0])
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    if annotation is datetime:
        return pa.string()  # ISO 8601, as in the metadata JSON
    return pa.string()


def _flat_fields(model: type[BaseModel]) -> dict[str, pa.DataType]:
    return {name: _arrow_type(info.annotation) for name, info in model.model_fields.items()}


def flat_schema() -> pa.Schema:
    """flat_row's columns with fixed types, so every row group agrees (a column may be null throughout)."""
    import pyarrow as pa

    job = _flat_fields(RenderJob)
    fields: dict[str, pa.DataType] = {"job_id": pa.string()}
    fields.update({name: kind for name, kind in job.items() if name not in ("job_id", "quant")})
    fields["quant_asked"] = pa.string()
    for name, info in RenderResult.model_fields.items():
        if name in ("job_id", "job"):
            continue
        if _is_section(info.annotation):
            fields.update({f"{name}_{inner}": kind for inner, kind in _flat_fields(info.annotation).items()})
        elif name in FILTERABLE_SECTIONS:
            fields.update({f"{name}_{inner}": kind for inner, kind in _flat_fields(FILTERABLE_SECTIONS[name]).items()})
        else:
            fields[name] = _arrow_type(info.annotation)
    return pa.schema(list(fields.items()))


# ---- the formats --------------------------------------------------------------------------------------


class _Writer:
    """Writes into the destination store, building large files in a temporary folder first."""

    def __init__(self, dest: ObjectStore, scratch: Path) -> None:
        self.dest, self.scratch = dest, scratch
        self.files: list[str] = []
        self.keys: list[str] = []

    def put(self, name: str, data: bytes, content_type: str) -> None:
        self.dest.put(self.dest.key(name), data, content_type)

    def put_file(self, name: str, path: Path, content_type: str) -> None:
        key = self.dest.key(name)
        self.dest.put_file(key, path, content_type)
        self.files.append(self.dest.uri(key))
        self.keys.append(key)
        path.unlink()


def _imagefolder(rows: Iterator[Row], out: _Writer, **_: Any) -> int:
    count = 0
    metadata = out.scratch / "metadata.jsonl"
    with metadata.open("w", encoding="utf-8") as lines:
        for row in rows:
            file_name = f"{row.result.job_id}.png"
            assert row.png is not None
            out.put(file_name, row.png, PNG_CONTENT_TYPE)
            lines.write(json.dumps({"file_name": file_name, **flat_row(row.result)}) + "\n")
            count += 1
    out.put_file("metadata.jsonl", metadata, "application/x-ndjson")
    return count


def _jsonl(rows: Iterator[Row], out: _Writer, dataset: str, **_: Any) -> int:
    count = 0
    path = out.scratch / f"{dataset}.jsonl"
    with path.open("w", encoding="utf-8") as lines:
        for row in rows:
            lines.write(row.result.model_dump_json() + "\n")
            count += 1
    out.put_file(path.name, path, "application/x-ndjson")
    return count


def _parquet(rows: Iterator[Row], out: _Writer, dataset: str, **_: Any) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = flat_schema()
    path = out.scratch / f"{dataset}.parquet"
    count = 0
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            batch.append(flat_row(row.result))
            if len(batch) == PARQUET_ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count, batch = count + len(batch), []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    out.put_file(path.name, path, "application/vnd.apache.parquet")
    return count


def sample_key(job_id: str) -> str:
    """A webdataset sample key: readers cut a name at its first '.', and job ids may hold dots."""
    return job_id.replace(".", "%2E")


_TAR_END = 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE
"""What closing a tar may add: two end blocks, then padding up to a whole record."""


def _tar_bytes(*members: bytes) -> int:
    """A sample's size in a tar: a header block per member, its data padded to whole blocks."""
    return sum(tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for data in members)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _webdataset(rows: Iterator[Row], out: _Writer, dataset: str, shard_bytes: int, **_: Any) -> int:
    count, shard = 0, 0
    tar: tarfile.TarFile | None = None
    path = out.scratch / "shard.tar"

    def close() -> None:
        nonlocal tar, shard
        if tar is not None:
            tar.close()
            out.put_file(f"{dataset}-{shard:06d}.tar", path, "application/x-tar")
            tar, shard = None, shard + 1

    for row in rows:
        assert row.png is not None
        document = row.result.model_dump_json().encode()
        if tar is not None and tar.offset + _tar_bytes(row.png, document) + _TAR_END > shard_bytes:
            close()
        if tar is None:
            tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans rows; close())
        key = sample_key(row.result.job_id)
        _add_member(tar, f"{key}.png", row.png)
        _add_member(tar, f"{key}.json", document)
        count += 1
    close()
    return count


def _contact_sheet(rows: Iterator[Row], out: _Writer, dataset: str, **_: Any) -> int:
    from PIL import Image, ImageDraw

    thumbs: list[tuple[Image.Image, str]] = []
    for row in rows:
        assert row.png is not None
        image = Image.open(io.BytesIO(row.png)).convert("RGB")
        image.thumbnail((CONTACT_THUMB_PX, CONTACT_THUMB_PX))
        prompt = row.result.job.prompt
        caption = prompt if len(prompt) <= CONTACT_CAPTION_CHARS else prompt[: CONTACT_CAPTION_CHARS - 1] + "…"
        thumbs.append((image, caption))
    columns = max(1, math.ceil(math.sqrt(len(thumbs))))
    cell_h = CONTACT_THUMB_PX + 20
    sheet = Image.new("RGB", (columns * CONTACT_THUMB_PX, max(1, math.ceil(len(thumbs) / columns)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(thumbs):
        x, y = (index % columns) * CONTACT_THUMB_PX, (index // columns) * cell_h
        sheet.paste(image, (x, y))
        draw.text((x + 4, y + CONTACT_THUMB_PX + 4), caption, fill="black")
    path = out.scratch / f"{dataset}-contact-sheet.png"
    sheet.save(path, format="PNG")
    out.put_file(path.name, path, PNG_CONTENT_TYPE)
    return len(thumbs)


_FORMATS: dict[str, tuple[Callable[..., int], bool]] = {
    "imagefolder": (_imagefolder, True),
    "parquet": (_parquet, False),
    "jsonl": (_jsonl, False),
    "webdataset": (_webdataset, True),
    "contact-sheet": (_contact_sheet, True),
}
"""Each format's writer, and whether it needs the images themselves."""


def export_dataset(
    source: ObjectStore,
    dataset: str,
    fmt: ExportFormat,
    dest: ObjectStore,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    limit: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_row: Callable[[], None] | None = None,
) -> ExportSummary:
    """Write `dataset`'s finished jobs from `source` into `dest` as `fmt`; `limit` keeps the first ones
    (the contact sheet's N). `on_start` gets the number of jobs, `on_row` is called once per job."""
    write, with_images = _FORMATS[fmt]
    keys = source.stored_results(dataset)[:limit]
    if on_start is not None:
        on_start(len(keys))

    def rows() -> Iterator[Row]:
        for row in iter_rows(source, keys, with_images):
            yield row
            if on_row is not None:
                on_row()

    with tempfile.TemporaryDirectory(prefix="fluxfarm-export-") as scratch:
        writer = _Writer(dest, Path(scratch))
        count = write(rows(), writer, dataset=dataset, shard_bytes=shard_bytes)
    return ExportSummary(format=fmt, rows=count, files=writer.files, keys=writer.keys)
