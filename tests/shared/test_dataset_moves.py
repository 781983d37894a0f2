"""A dataset record's moves on a real Redis: a job is in exactly one state whatever order its moves come in,
and the common moves (queued to running to done) cost a few commands (issue 21, point 5)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import redis

from fluxfarm.shared import keys
from fluxfarm.shared.datasets import STATES, DatasetBook, JobState
from fluxfarm.shared.job_records import DeadLetter, SentJob
from fluxfarm.shared.jobs import parse_job


def _queue(book: DatasetBook, dataset: str, prompt: str) -> str:
    job = parse_job({"prompt": prompt, "dataset": dataset})
    book.note_queued(dataset, [SentJob.of(job, 3, datetime.now(UTC).isoformat(), keep_result=False)])
    return job.id


def _states(client: redis.Redis, dataset: str, job_id: str) -> list[JobState]:
    return [state for state in STATES if client.sismember(keys.dataset(dataset, state), job_id)]


def _commands_of(client: redis.Redis, action: Callable[[], object]) -> int:
    """Commands Redis processed while `action` ran (the INFO calls around it taken out)."""
    first = int(client.info("stats")["total_commands_processed"])
    idle = int(client.info("stats")["total_commands_processed"]) - first
    before = int(client.info("stats")["total_commands_processed"])
    action()
    return int(client.info("stats")["total_commands_processed"]) - before - idle


def test_queued_running_done_is_a_few_commands_and_leaves_one_state(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    book = DatasetBook(redis_client)
    book.mark_done("moves", _queue(book, "moves", "the first job"), "fp8")  # the script is loaded once, by then
    job_id = _queue(book, "moves", "a lighthouse")
    book.start_attempt("moves", job_id)
    book.note_attempt_failed("moves", job_id, "out of memory")  # an error and an attempt to clear at the end
    assert _commands_of(redis_client, lambda: book.mark_running("moves", job_id)) == 1  # one SMOVE, no SISMEMBER
    assert _states(redis_client, "moves", job_id) == [JobState.RUNNING]
    assert book.last_error("moves", job_id) == "out of memory"
    # EVALSHA, then in the script SMOVE, 2 HDEL (the sent record; the attempts with the last error), SADD (the
    # level), HINCRBYFLOAT, HSET, TIME and ZADD
    assert _commands_of(redis_client, lambda: book.mark_done("moves", job_id, "fp8", gpu_s=2.5)) == 9
    assert _states(redis_client, "moves", job_id) == [JobState.DONE]
    for part in ("sent", "attempts", "failures"):
        assert not redis_client.hexists(keys.dataset("moves", part), job_id), part
    assert book.last_error("moves", job_id) is None and book.attempts("moves", job_id) == 0
    record = book.record("moves")
    assert (record.queued, record.running, record.done) == (0, 0, 2)
    assert redis_client.zscore(keys.dataset("moves", "done_at"), job_id) is not None
    assert float(redis_client.hget(keys.dataset("moves", "meta"), "gpu_seconds") or 0) == pytest.approx(2.5)
    assert redis_client.sismember(keys.dataset("moves", "levels"), "fp8")
    known = _queue(book, "moves", "a level the caller knows is noted")
    book.mark_running("moves", known)
    assert _commands_of(redis_client, lambda: book.mark_done("moves", known, None)) == 7  # no SADD, no GPU time

    # The renderer's claim goes with the record (GET and DEL in the script, no call of its own); another
    # owner's claim (the job's lease lapsed and another worker took it) stays.
    for owner, left in (("w1/mine", False), ("w2/theirs", True)):
        claimed = _queue(book, "moves", f"claimed by {owner}")
        redis_client.set(keys.claim("moves", claimed), owner, px=60_000)
        book.mark_running("moves", claimed)
        done = functools.partial(book.mark_done, "moves", claimed, None, 0.0, "w1/mine")
        assert _commands_of(redis_client, done) == 9 - left
        assert bool(redis_client.exists(keys.claim("moves", claimed))) is left


def test_moves_from_unexpected_states_still_leave_exactly_one(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    book = DatasetBook(redis_client)
    failed = _queue(book, "odd", "failed then redelivered")
    letter = DeadLetter(
        dataset="odd", job_id=failed, reason="gave up", attempts=3, node="w1", at=datetime.now(UTC), job={}
    )
    book.dead_letter(letter)
    assert _states(redis_client, "odd", failed) == [JobState.FAILED]
    book.mark_running("odd", failed)  # a redelivery of a job already given up on
    assert _states(redis_client, "odd", failed) == [JobState.RUNNING]
    assert book.failure("odd", failed) is None

    dropped = _queue(book, "odd", "cancelled before a worker took it")
    book.cancel("odd")
    assert book.mark_running("odd", dropped) is False  # the worker drops it: it stays cancelled
    assert _states(redis_client, "odd", dropped) == [JobState.CANCELLED]

    cancelled = _queue(book, "odd", "cancelled while rendering elsewhere")
    book.cancel("odd")
    book.mark_done("odd", cancelled, "bf16")  # not running: the general move
    assert _states(redis_client, "odd", cancelled) == [JobState.DONE]

    retired = _queue(book, "gone", "done on a retired dataset")
    redis_client.srem(keys.DATASETS, "gone")
    redis_client.sadd(keys.DATASETS_RETIRED, "gone")
    redis_client.smove(keys.dataset("gone", JobState.QUEUED), keys.dataset("gone", JobState.FAILED), retired)
    book.mark_done("gone", retired, "bf16")
    assert _states(redis_client, "gone", retired) == [JobState.DONE]
    assert "gone" in book.names()  # a dataset that gets a result is active again


def _letter(dataset: str, index: int) -> DeadLetter:
    job = {"prompt": f"a wren {index}", "dataset": dataset}
    return DeadLetter(
        dataset=dataset, job_id=f"job-{index}", reason="no", attempts=3, node="w@h", at=datetime.now(UTC), job=job
    )


def test_one_dataset_s_dead_letters_are_read_in_chunks_and_not_at_all_without_failures(
    redis_client: redis.Redis,
) -> None:
    redis_client.flushdb()
    book = DatasetBook(redis_client)
    book.dead_letter(_letter("wrens", 0))
    for index in range(1, 1200):  # another dataset's, newer: more than two chunks of them
        book.dead_letter(_letter("finches", index))
    (found,) = book.dead_letters(20, "wrens")
    assert (found.dataset, found.job_id) == ("wrens", "job-0")
    assert [letter.job_id for letter in book.dead_letters(3, "finches")] == ["job-1199", "job-1198", "job-1197"]
    assert _commands_of(redis_client, lambda: book.dead_letters(3, "finches")) == 2  # HLEN, one chunk
    assert len(book.dead_letters(5)) == 5
    # A dataset without failures in its record has no dead letters: the list is not read (one HLEN).
    redis_client.lpush(keys.DEAD_LETTERS, "not a letter")  # would fail to parse if it were read
    assert book.dead_letters(20, "sparrows") == []
    assert _commands_of(redis_client, lambda: book.dead_letters(20, "sparrows")) == 1
