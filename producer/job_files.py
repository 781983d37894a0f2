"""Read jobs from a prompt file: `.txt` (one prompt a line) or `.jsonl` (one job object a line).

Every row is validated before anything is enqueued; bad rows are reported by line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InvalidJob
from shared.jobs import RenderJob, parse_job

SUPPORTED_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip() or (suffix == ".txt" and text.lstrip().startswith("#")):
                continue
            if suffix == ".txt":
                yield line_no, {"prompt": text}
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as error:
                yield line_no, error


def read_job_file(path: Path, defaults: Mapping[str, Any]) -> tuple[list[RenderJob], list[RowError]]:
    """All valid jobs of `path` (row values override `defaults`) and every bad row's reason."""
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise InvalidJob(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    jobs: list[RenderJob] = []
    errors: list[RowError] = []
    for line_no, row in _rows(path):
        if isinstance(row, json.JSONDecodeError):
            errors.append(RowError(line_no, f"not valid JSON: {row.msg}"))
            continue
        if not isinstance(row, dict):
            errors.append(RowError(line_no, "a row must be a JSON object"))
            continue
        try:
            jobs.append(parse_job({**defaults, **row}))
        except InvalidJob as error:
            errors.append(RowError(line_no, str(error)))
    return jobs, errors
