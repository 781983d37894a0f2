"""A failed attempt backs off in Redis, not in a worker thread (issue 31, point 2): the job waits in the
delayed-retry set with its message acknowledged, the worker renders other jobs meanwhile, and the job
is published again once its back-off is over. A real worker process on a real redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import QUEUE_ANY, task_id, waiting_messages
from fluxfarm.shared.errors import JobFailed
from fluxfarm.shared.redis_conn import redis_now
from tests.conftest import S3Server, fresh_farm_settings
from tests.fault_farm import SMALL_JOB, fault_worker, wait_until

pytestmark = pytest.mark.slow

BACKOFF_S = 20.0


def test_a_failed_attempt_waits_in_redis_while_the_worker_renders_another_job(
    tmp_path: Path, tiny_model: Path, s3_server: S3Server
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        settings = fresh_farm_settings(server, s3_server, f"s3://{s3_server.new_bucket()}/renders", tmp_path)
        worker = fault_worker(
            settings,
            tiny_model,
            tmp_path / "worker.log",
            "w-backoff",
            {"poison_prompt": "POISON"},
            max_attempts="2",
            retry_backoff_s=str(BACKOFF_S),
            max_batch="1",
        )
        admin = redis.Redis.from_url(server.url)
        try:
            with FarmClient(settings) as client:
                failing = client.submit({"prompt": "a POISON pear", "dataset": "backoff", **SMALL_JOB})
                member = task_id("backoff", failing.job_id)
                wait_until(lambda: admin.zscore(keys.RETRIES_DUE, member) is not None, 120, "the delayed retry")
                due = admin.zscore(keys.RETRIES_DUE, member)
                assert due is not None and due - redis_now(admin) > BACKOFF_S / 2, "backed off in Redis"
                # Acknowledged just after the entry is written; a sleeping thread would hold it for the back-off.
                wait_until(lambda: not admin.hlen(keys.UNACKED), BACKOFF_S / 4, "the failed attempt's message acked")
                assert waiting_messages(admin, [QUEUE_ANY]) == [0], "and not back in its queue"
                other = client.submit({"prompt": "a ripe pear", "dataset": "backoff", **SMALL_JOB})
                assert other.result(timeout=120).job.prompt == "a ripe pear"
                assert redis_now(admin) < due, "rendered during the back-off"
                assert admin.zscore(keys.RETRIES_DUE, member) is not None
                with pytest.raises(JobFailed, match="dead-lettered: 2 attempts failed"):
                    failing.result(timeout=120)
                assert redis_now(admin) >= due, "the second attempt came after the back-off"
                assert admin.zscore(keys.RETRIES_DUE, member) is None
            log = worker.log_text()
            assert f"job {failing.job_id} attempt 1/2 failed" in log and f"sent again in {BACKOFF_S:.0f}s" in log
        finally:
            worker.stop()
