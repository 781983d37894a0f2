"""Read jobs from a prompt file, streaming: `.txt` (a prompt a line), `.jsonl` (a job object a line),
`.csv` (a header row, any job field as a column) or `.parquet` (any job field as a column).

Rows are read one at a time, so a file of any length costs the same memory. Every row is validated
on its own; a bad row is reported by its line number (for parquet: its row number, from 1) and never
stops the rows after it from being checked. With `seeds`, each row becomes that many jobs with
consecutive seeds starting at the row's seed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxfarm.shared.errors import InvalidJob
from fluxfarm.shared.jobs import MAX_SEED, RenderJob, parse_job

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
_PARQUET_BATCH_ROWS = 4096


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str


@dataclass(frozen=True)
class FileJob:
    line: int
    job: RenderJob


def _text_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if text.strip() and not text.lstrip().startswith("#"):
                yield line_no, {"prompt": text}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_no, RowError(line_no, f"not valid JSON: {error.msg}")


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            extra = row.pop(None, None)  # DictReader keeps the cells past the header under None
            if extra:
                yield reader.line_num, RowError(reader.line_num, f"{len(extra)} more cells than the header names")
                continue
            # An empty cell means "not given": the CLI option or the schema's default applies.
            yield reader.line_num, {name: value for name, value in row.items() if value not in ("", None)}


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, {name: value for name, value in row.items() if value is not None}


_READERS = {".txt": _text_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def _row_jobs(row: dict[str, Any], defaults: Mapping[str, Any], seeds: int) -> list[RenderJob]:
    first = parse_job({**defaults, **row})
    if seeds == 1:
        return [first]
    if "job_id" in row or "job_id" in defaults:
        raise InvalidJob("job_id names one job; it cannot be expanded to several seeds")
    if first.seed + seeds - 1 > MAX_SEED:
        raise InvalidJob(f"seeds {first.seed}..{first.seed + seeds - 1} go past {MAX_SEED}")
    fields = first.model_dump(exclude={"job_id"})
    return [first] + [parse_job({**fields, "seed": first.seed + i}) for i in range(1, seeds)]


def iter_file_jobs(path: Path, defaults: Mapping[str, Any], seeds: int = 1) -> Iterator[FileJob | RowError]:
    """Each valid job of `path` (row values override `defaults`) or each bad row's reason, in file order."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise InvalidJob(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if seeds < 1:
        raise InvalidJob("seeds must be at least 1")
    for line, row in reader(path):
        if isinstance(row, RowError):
            yield row
            continue
        if not isinstance(row, dict):
            yield RowError(line, "a row must be a JSON object")
            continue
        try:
            jobs = _row_jobs(row, defaults, seeds)
        except InvalidJob as error:
            yield RowError(line, str(error))
            continue
        for job in jobs:
            yield FileJob(line, job)
