"""Prompt files in every supported format: any job field as a column, CLI defaults under them, bad rows
named by line, seeds expanded, and the file streamed rather than loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fluxfarm.producer.job_files import FileJob, RowError, iter_file_jobs
from fluxfarm.shared.errors import InvalidJob
from fluxfarm.shared.jobs import parse_job

DEFAULTS = {"width": 256, "height": 256, "steps": 2, "dataset": "files"}


def _split(path: Path, seeds: int = 1) -> tuple[list[FileJob], list[RowError]]:
    items = list(iter_file_jobs(path, DEFAULTS, seeds))
    return [i for i in items if isinstance(i, FileJob)], [i for i in items if isinstance(i, RowError)]


def test_csv_columns_are_job_fields_typed_by_the_schema_and_empty_cells_take_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text('prompt,seed,width\n"a fox, running",7,512\na hare,,\n"a newt\nover two lines",1,100\n')
    jobs, errors = _split(path)
    assert [(j.line, j.job.prompt, j.job.seed, j.job.width) for j in jobs] == [
        (2, "a fox, running", 7, 512),
        (3, "a hare", 0, 256),
    ]
    assert [e.line for e in errors] == [5] and "width" in errors[0].reason  # the row ends on line 5


def test_parquet_rows_are_numbered_from_one_and_nulls_take_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    table = pa.table({"prompt": ["a crow", "a rook", "a jay"], "steps": [4, None, 500], "seed": [1, 2, 3]})
    pq.write_table(table, path, row_group_size=2)
    jobs, errors = _split(path)
    assert [(j.line, j.job.prompt, j.job.steps) for j in jobs] == [(1, "a crow", 4), (2, "a rook", 2)]
    assert [e.line for e in errors] == [3] and "steps" in errors[0].reason


def test_txt_and_jsonl_name_each_bad_line(tmp_path: Path) -> None:
    txt = tmp_path / "prompts.txt"
    txt.write_text("# a comment\na kite\n\n" + "x" * 5000 + "\na swift\n")
    jobs, errors = _split(txt)
    assert [(j.line, j.job.prompt) for j in jobs] == [(2, "a kite"), (5, "a swift")]
    assert [e.line for e in errors] == [4]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"prompt": "ok"}\n{"prompt": \n["a list"]\n{"prompt": "p", "colour": "red"}\n')
    jobs, errors = _split(jsonl)
    assert [j.line for j in jobs] == [1]
    assert [(e.line, e.reason.split(":")[0]) for e in errors] == [
        (2, "not valid JSON"),
        (3, "a row must be a JSON object"),
        (4, "colour"),
    ]


def test_seeds_expand_each_row_from_its_own_seed_into_distinct_jobs(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a lynx", "seed": 10}) + "\n" + json.dumps({"prompt": "a vole"}) + "\n")
    jobs, errors = _split(path, seeds=3)
    assert not errors
    assert [(j.line, j.job.prompt, j.job.seed) for j in jobs] == [
        (1, "a lynx", 10),
        (1, "a lynx", 11),
        (1, "a lynx", 12),
        (2, "a vole", 0),
        (2, "a vole", 1),
        (2, "a vole", 2),
    ]
    assert len({j.job.id for j in jobs}) == 6
    # the expanded job is the same job as one written out by hand: resubmits find it
    assert jobs[1].job.id == parse_job({**DEFAULTS, "prompt": "a lynx", "seed": 11}).id


def test_seeds_refuse_a_row_with_an_explicit_job_id_or_past_the_last_seed(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "job_id": "mine"}\n{"prompt": "b", "seed": 4294967295}\n')
    jobs, errors = _split(path, seeds=2)
    assert not jobs and [e.line for e in errors] == [1, 2]


def test_an_unknown_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rows.xlsx"
    path.write_text("")
    with pytest.raises(InvalidJob, match="unsupported file type"):
        list(iter_file_jobs(path, {}, 1))
