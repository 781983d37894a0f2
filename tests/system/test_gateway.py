"""The HTTP gateway end to end: `fluxfarm gateway` as a process in front of a real Redis, moto S3 and a
worker process; tokens made with `fluxfarm token create`; every request over HTTP (issue 19)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from fluxfarm.shared import keys
from fluxfarm.shared.queue_registry import registered_queues
from tests.conftest import Farm, run_fluxfarm
from tests.fault_farm import wait_until
from tests.gateway_process import Gateway, running_gateway

pytestmark = pytest.mark.slow

JOB = {"width": 256, "height": 256, "steps": 2}
WAIT_S = 60


@pytest.fixture(scope="module")
def gateway(farm: Farm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    limit = {"FLUXFARM_GATEWAY_MAX_UPLOAD_MIB": "0.05", "FLUXFARM_GATEWAY_MAX_BODY_MIB": "0.5"}  # tests pass both
    with running_gateway(farm.settings, log, limit) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def alice(gateway: Gateway) -> str:
    return gateway.token("alice", "--datasets", "alice-*")


@pytest.fixture(scope="module")
def bob(gateway: Gateway) -> str:
    return gateway.token("bob", "--datasets", "bob-*", "--max-queued", "2")


def test_no_token_or_an_unknown_one_is_401_as_json(gateway: Gateway, alice: str) -> None:
    for token in (None, alice[:-2] + "xx", "not-a-token"):
        with gateway.client(token) as http:
            answer = http.get("/v1/datasets/alice-moths")
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "unauthenticated"
    assert httpx.get(f"{gateway.url}/healthz").json() == {"ok": True}


def test_alice_submits_waits_and_downloads_her_image_through_its_url(
    gateway: Gateway, alice: str, redis_client: redis.Redis
) -> None:
    jobs = [{"prompt": f"a moth on bark, study {i}", "seed": i, "dataset": "alice-moths", **JOB} for i in range(2)]
    with gateway.client(alice) as http:
        sent = http.post("/v1/jobs", json=jobs)
        assert sent.status_code == 202, sent.text
        body = sent.json()
        assert body["enqueued"] == 2 and body["already_stored"] == body["already_waiting"] == 0
        ids = [ref["job_id"] for ref in body["jobs"]]
        for job_id in ids:
            view = http.get(f"/v1/jobs/{job_id}", params={"dataset": "alice-moths", "wait": WAIT_S}).json()
            assert view["state"] == "done", view
            assert view["result"]["job_id"] == job_id and view["result"]["quant"] == "Q8_0"
            png = httpx.get(view["image_url"], timeout=30)
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")
        # Alice's jobs went through her own queue, which the worker consumes in turn with other tokens'.
        assert "render.any.t.alice" in registered_queues(redis_client)
        again = http.post("/v1/jobs", json=jobs[0]).json()
        assert (again["enqueued"], again["already_stored"]) == (0, 1) and again["jobs"][0]["job_id"] == ids[0]
        # A worker stores a result before it records the job done: the record follows within moments.
        wait_until(lambda: http.get("/v1/datasets/alice-moths").json()["done"] == 2, 10, "the record to count both")
        record = http.get("/v1/datasets/alice-moths").json()
        assert record["done"] == 2 and record["queued"] == record["running"] == 0 and record["eta_s"] == 0
        assert http.get("/v1/datasets/alice-none").status_code == 404
        assert http.get(f"/v1/jobs/{'0' * 32}", params={"dataset": "alice-moths"}).status_code == 404
    lines = gateway.log.read_text().splitlines()
    logged = [json.loads(line.split("fluxfarm.audit: ", 1)[1]) for line in lines if "fluxfarm.audit: " in line]
    assert any(entry["action"] == "submit" and entry["token"] == "alice" for entry in logged), logged
    assert alice not in gateway.log.read_text()
    kept = [json.loads(fields[b"entry"]) for _, fields in redis_client.xrange("fluxfarm:audit")]
    assert {"action": "token-create", "token": "alice"}.items() <= kept[0].items()
    assert kept[0]["grant"]["datasets"] == ["alice-*"]
    assert any(entry["action"] == "submit" and entry["datasets"] == {"alice-moths": 2} for entry in kept)
    assert not [entry for entry in kept if alice in json.dumps(entry)]


def test_bob_may_not_touch_alice_s_datasets_nor_jump_the_queue(gateway: Gateway, bob: str) -> None:
    with gateway.client(bob) as http:
        for answer in (
            http.get("/v1/datasets/alice-moths"),
            http.post("/v1/datasets/alice-moths/cancel"),
            http.get("/v1/datasets/alice-moths/results"),
            http.get(f"/v1/jobs/{'0' * 32}", params={"dataset": "alice-moths"}),
            http.post("/v1/jobs", json={"prompt": "mine now", "dataset": "alice-moths", **JOB}),
            http.post("/v1/jobs", json={"prompt": "me first", "dataset": "bob-x", **JOB}, params={"priority": "high"}),
        ):
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "forbidden"


def test_bob_gets_429_past_his_max_queued_and_nothing_is_sent(gateway: Gateway, bob: str) -> None:
    jobs = [{"prompt": f"too many {i}", "dataset": "bob-quota", **JOB} for i in range(3)]
    with gateway.client(bob) as http:
        refused = http.post("/v1/jobs", json=jobs)
        assert refused.status_code == 429 and "retry-after" in refused.headers
        error = refused.json()["error"]
        assert error["code"] == "quota_exceeded" and "max_queued 2" in error["message"]
        assert http.get("/v1/datasets/bob-quota").status_code == 404  # not one job of the three was sent


def test_requests_at_once_cannot_pass_a_max_queued_together(gateway: Gateway) -> None:
    """Eight single-job POSTs at once against room for three: three are sent, five get 429 (the check and
    the send hold the token's lock; checked apart, several requests saw the same room)."""
    dora = gateway.token("dora", "--datasets", "dora-*", "--max-queued", "3")
    # No worker of this farm holds Q4_0: the jobs stay queued, so the room does not free up meanwhile.
    jobs = [{"prompt": f"at once {i}", "dataset": "dora-race", "quant": "exact:Q4_0", **JOB} for i in range(8)]
    start = threading.Barrier(len(jobs))

    def post(job: dict) -> int:
        with gateway.client(dora) as http:
            start.wait()
            return http.post("/v1/jobs", json=job).status_code

    with ThreadPoolExecutor(len(jobs)) as pool:
        codes = sorted(pool.map(post, jobs))
    with gateway.client(dora) as http:
        record = http.get("/v1/datasets/dora-race").json()
        http.post("/v1/datasets/dora-race/cancel")
    assert codes == [202] * 3 + [429] * 5, codes
    assert record["queued"] == 3, record


def test_a_bad_job_is_422_naming_each_field_and_nothing_is_sent(gateway: Gateway, alice: str) -> None:
    jobs = [{"prompt": "fine", "dataset": "alice-bad", **JOB}, {"prompt": "", "width": 100, "dataset": "alice-bad"}]
    with gateway.client(alice) as http:
        refused = http.post("/v1/jobs", json=jobs)
        assert refused.status_code == 422
        problems = {problem["field"] for problem in refused.json()["error"]["problems"]}
        assert problems == {"1.prompt", "1.width"}
        bad_url = http.get("/v1/jobs/..%2Fetc", params={"dataset": "alice-moths"})
        assert bad_url.status_code in (404, 422)
        assert http.get("/v1/datasets/alice-bad").status_code == 404


def test_the_openapi_document_lists_the_v1_routes(gateway: Gateway) -> None:
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/datasets/{name}", "/v1/datasets/{name}/cancel"} <= set(
        document["paths"]
    )


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_a_file_upload_is_checked_row_by_row_then_enqueued_as_the_cli_does(gateway: Gateway, alice: str) -> None:
    rows = [
        {"prompt": "a lichen", **JOB},
        {"prompt": "a fern", "width": 100},
        {"prompt": "a leaf", "dataset": "bob-x", **JOB},
        {"prompt": "a stone", **JOB},
    ]
    url = "/v1/datasets/alice-upload/files"
    with gateway.client(alice) as http:
        refused = http.post(url, params={"format": "jsonl"}, content=_jsonl(rows))
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert "2 invalid rows; nothing was enqueued" in error["message"]
        assert [problem["field"] for problem in error["problems"]] == ["line 2", "line 3"]
        assert "not bob-x" in error["problems"][1]["reason"]

        checked = http.post(url, params={"format": "jsonl", "dry_run": True}, content=_jsonl(rows)).json()
        assert (checked["valid"], checked["invalid"], checked["enqueued"], checked["dry_run"]) == (2, 2, 0, True)
        assert http.get("/v1/datasets/alice-upload").status_code == 404  # a dry run sends nothing

        sent = http.post(url, params={"format": "jsonl", "skip_invalid": True}, content=_jsonl(rows)).json()
        assert (sent["valid"], sent["invalid"], sent["enqueued"]) == (2, 2, 2)
        txt = {"format": "txt", "seeds": 2, "defaults": json.dumps(JOB)}
        prompts = http.post(url, params=txt, content=b"a lichen\n", headers={"Content-Type": "text/plain"}).json()
        # seed 0 is the jsonl's "a lichen" again (waiting or stored by now); seed 1 is new
        assert prompts["valid"] == 2 and prompts["enqueued"] == 1
        assert prompts["already_waiting"] + prompts["already_stored"] == 1
        assert http.get("/v1/datasets/alice-upload").json()["defaults"] == {**JOB, "dataset": "alice-upload"}
        bad = http.post(url, params={**txt, "defaults": '{"steps": 0}'}, content=b"x\n")
        assert bad.status_code == 422 and bad.json()["error"]["problems"][0]["field"] == "defaults.steps"

        too_large = http.post(url, params={"format": "txt"}, content=b"a very long prompt file\n" * 4000)
        assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "too_large"

        def finished() -> bool:
            record = http.get("/v1/datasets/alice-upload").json()
            return record["queued"] + record["running"] == 0

        wait_until(finished, WAIT_S, "the uploaded dataset to finish", poll_s=0.5)
        done = http.get("/v1/datasets/alice-upload").json()["done"]
        assert done == 3  # a lichen (seeds 0 and 1) and a stone

        pages, after = [], None
        while True:
            page = http.get(
                "/v1/datasets/alice-upload/results", params={"limit": 2, **({"after": after} if after else {})}
            )
            assert page.status_code == 200, page.text
            pages.append(page.json()["results"])
            after = page.json()["next"]
            if after is None:
                break
        results = [item for page in pages for item in page]
        assert [len(page) for page in pages] == [2, 1]
        assert sorted(item["job_id"] for item in results) == [item["job_id"] for item in results]
        assert {item["result"]["job"]["prompt"] for item in results} == {"a lichen", "a stone"}
        png = httpx.get(results[-1]["image_url"], timeout=30)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_fleet_and_metrics(gateway: Gateway, alice: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    admin = gateway.token("ops", "--datasets", "*", "--admin")
    with gateway.client(alice) as http:
        fleet = http.get("/v1/fleet").json()
        assert [(w["level"], w["metrics_url"]) for w in fleet["workers"]] == [("Q8_0", None)]
        assert http.get("/metrics").status_code == 403
        http.post("/v1/jobs", json={"prompt": "counted", "dataset": "alice-metrics", **JOB})
    with gateway.client(admin) as http:
        scrape = http.get("/metrics")
    assert scrape.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scrape.text)
        for sample in family.samples
    }
    assert samples[("fluxfarm_gateway_token_jobs_submitted_total", (("token", "alice"),))] >= 1
    assert samples[("fluxfarm_gateway_token_images_total", (("token", "alice"),))] >= 2  # alice-moths' two
    assert samples[("fluxfarm_gateway_token_gpu_seconds_total", (("token", "alice"),))] > 0
    with gateway.client(alice) as http:
        (use,) = http.get("/v1/usage").json()
    assert use["token"] == "alice" and use["images"] >= 2 and use["gpu_seconds"] > 0
    posted = ("fluxfarm_gateway_requests_total", (("method", "POST"), ("route", "/v1/jobs"), ("status", "202")))
    assert samples[posted] >= 1
    assert not [labels for name, labels in samples if "alice-metrics" in str(labels)]  # templates, not paths


def test_an_export_runs_in_the_background_and_answers_with_urls(
    gateway: Gateway, alice: str, bob: str, redis_client: redis.Redis
) -> None:
    with gateway.client(alice) as http:
        started = http.post("/v1/datasets/alice-moths/exports", json={"format": "jsonl"})
        assert started.status_code == 202, started.text
        export_id = started.json()["export_id"]

        def done() -> bool:
            return http.get(f"/v1/datasets/alice-moths/exports/{export_id}").json()["state"] in ("done", "failed")

        wait_until(done, WAIT_S, "the export to finish", poll_s=0.2)
        view = http.get(f"/v1/datasets/alice-moths/exports/{export_id}").json()
        assert view["state"] == "done" and view["rows"] == 2, view
        lines = httpx.get(view["urls"][0], timeout=30).text.splitlines()
        assert sorted(json.loads(line)["job"]["prompt"] for line in lines) == [
            "a moth on bark, study 0",
            "a moth on bark, study 1",
        ]
        assert not redis_client.exists(keys.export_lease("alice-moths", export_id))  # released when it ended
        first = http.get("/v1/datasets/alice-moths/finished", params={"limit": 1}).json()
        assert len(first["jobs"]) == 1 and first["next_since"] == first["jobs"][0][1], first
        rest = http.get("/v1/datasets/alice-moths/finished", params={"since": first["next_since"]}).json()
        assert rest["next_since"] is None and len({job for job, _ in first["jobs"] + rest["jobs"]}) == 2, rest
        assert http.post("/v1/datasets/alice-moths/exports", json={"format": "gif"}).status_code == 422

        # An export whose gateway stopped half way: its state still says running, its lease has lapsed.
        stale = keys.export("alice-moths", "0123456789abcdef")
        redis_client.hset(stale, mapping={"state": "running", "format": "jsonl"})
        interrupted = http.get("/v1/datasets/alice-moths/exports/0123456789abcdef").json()
        assert interrupted["state"] == "failed" and "ask for a new one" in interrupted["error"], interrupted
        redis_client.set(keys.export_lease("alice-moths", "0123456789abcdef"), "1", ex=60)  # a live gateway's
        assert http.get("/v1/datasets/alice-moths/exports/0123456789abcdef").json()["state"] == "running"
    with gateway.client(bob) as http:
        assert http.get(f"/v1/datasets/alice-moths/exports/{export_id}").status_code == 403


def test_the_cli_submits_waits_reports_exports_and_cancels_through_the_gateway(
    gateway: Gateway, alice: str, tmp_path: Path
) -> None:
    """No Redis, no S3 credentials: only FLUXFARM_API_URL and a token (issue 19, point 4)."""
    env = {
        "FLUXFARM_API_URL": gateway.url,
        "FLUXFARM_API_TOKEN": alice,
        "FLUXFARM_BROKER_URL": "redis://unreachable.invalid:1/0",
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
    }
    size = ["--width", "256", "--height", "256", "--steps", "2"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a beetle\na wasp\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": ""}\n')

    checked = run_fluxfarm("submit", str(bad), "--dataset", "alice-cli", "--dry-run", *size, env=env)
    assert checked.returncode == 2 and f"{bad}:2" in checked.stderr and "1 invalid rows" in checked.stderr
    done = run_fluxfarm("submit", str(prompts), "--dataset", "alice-cli", *size, "--wait", env=env)
    assert done.returncode == 0, done.stderr
    assert "queued 2 jobs" in done.stderr

    one = run_fluxfarm("submit", "--prompt", "a moth", "--dataset", "alice-cli", *size, "--wait", env=env)
    assert one.returncode == 0, one.stderr
    assert one.stdout.count("\t") == 1

    status = run_fluxfarm("status", "--dataset", "alice-cli", "--json", env=env)
    assert status.returncode == 0, status.stderr
    record = json.loads(status.stdout)["datasets"][0]["record"]
    assert (record["name"], record["done"], record["queued"]) == ("alice-cli", 3, 0)
    assert record["gpu_seconds"] > 0
    (use,) = json.loads(status.stdout)["tokens"]
    assert use["token"] == "alice" and use["images"] >= 3
    listed = run_fluxfarm("status", "--json", env=env)
    names = {entry["record"]["name"] for entry in json.loads(listed.stdout)["datasets"]}
    assert "alice-cli" in names and not [name for name in names if not name.startswith("alice-")]

    waited = run_fluxfarm("wait", "--dataset", "alice-cli", "--results", "--presign", "600", env=env)
    assert waited.returncode == 0, waited.stderr
    urls = [line.split("\t")[1] for line in waited.stdout.splitlines()]
    assert len(urls) == 3 and httpx.get(urls[0], timeout=30).content.startswith(b"\x89PNG")

    exported = run_fluxfarm("export", "--dataset", "alice-cli", "--format", "jsonl", env=env)
    assert exported.returncode == 0, exported.stderr
    assert len(httpx.get(exported.stdout.split()[0], timeout=30).text.splitlines()) == 3

    cancelled = run_fluxfarm("cancel", "--dataset", "alice-cli", env=env)
    assert cancelled.returncode == 0 and "cancelled 0 queued jobs" in cancelled.stderr
    refused = run_fluxfarm("status", "--dataset", "bob-x", env=env)
    assert refused.returncode == 1 and "may not touch dataset 'bob-x'" in refused.stderr


def test_a_body_over_the_limit_is_413_whether_it_declares_its_length_or_not(gateway: Gateway, alice: str) -> None:
    jobs = [{"prompt": "x" * 500, "dataset": "alice-big", "seed": i, **JOB} for i in range(1000)]  # ~0.6 MiB
    with gateway.client(alice) as http:
        declared = http.post("/v1/jobs", json=jobs)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "too_large"
        body = json.dumps(jobs).encode()
        chunked = http.post("/v1/jobs", content=(body[i : i + 65536] for i in range(0, len(body), 65536)))
        assert chunked.status_code == 413, chunked.text
        assert http.get("/v1/datasets/alice-big").status_code == 404


def test_waiting_requests_hold_no_thread_so_the_gateway_keeps_answering(gateway: Gateway, alice: str) -> None:
    """60 long-polls on a job no worker of this farm serves (exact:bf16; the worker holds Q8_0), more than
    the thread pool's 40: each waits out its 3 s, and /healthz answers meanwhile."""
    job = {"prompt": "waits for a bf16 card", "dataset": "alice-waits", "quant": "exact:bf16", **JOB}
    with gateway.client(alice) as http:
        job_id = http.post("/v1/jobs", json=job).json()["jobs"][0]["job_id"]
    answers: list[str] = []

    def wait() -> None:
        with gateway.client(alice) as http:
            view = http.get(f"/v1/jobs/{job_id}", params={"dataset": "alice-waits", "wait": 3})
            answers.append(view.json()["state"])

    waiters = [threading.Thread(target=wait) for _ in range(60)]
    for waiter in waiters:
        waiter.start()
    time.sleep(1)
    asked = time.monotonic()
    health = httpx.get(f"{gateway.url}/healthz", timeout=5)
    # Answered while every long-poll still waits (none has come back): a gateway whose waits held its threads
    # answers /healthz only once they end. Not a time limit: a loaded test machine may take seconds to answer.
    waiting = not answers
    assert health.status_code == 200 and waiting, f"/healthz answered after the waits ({time.monotonic() - asked:.1f}s)"
    for waiter in waiters:
        waiter.join(timeout=30)
    assert answers == ["queued"] * 60
    with gateway.client(alice) as http:
        assert http.post("/v1/datasets/alice-waits/cancel").json()["cancelled"] == 1
