"""The gateway's own costs on this machine (issue 19, acceptance 4), on a private redis-server and a local
storage folder, through `fluxfarm gateway` as a process and real HTTP:

- a 100,000-row `.jsonl` uploaded to POST /v1/datasets/{name}/files: jobs enqueued per second, end to end
  (the upload, the gateway's row-by-row check, and the submit into Redis);
- a single-job POST /v1/jobs: the median and 95th percentile of 300, each a new job, into a new dataset
  and into one of 100,000 stored results;
- GET /v1/datasets/{name}/results of a dataset with 100,000 stored results: one 50-result page's time;
- the web page's gallery of that dataset (/ui/datasets/{name}): one 48-image page's time.

    .venv/bin/python -m tests.measure_gateway [--rows 100000]

Prints one JSON line per figure; docs/benchmarks.md keeps them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from fluxfarm.producer.local_stack import RedisServer
from tests.gateway_process import running_gateway
from tests.host_settings import HostSettings

JOB = {"width": 512, "height": 512, "steps": 4}


def upload_rate(http: httpx.Client, folder: Path, rows: int) -> dict[str, float]:
    path = folder / "prompts.jsonl"
    with path.open("w") as lines:
        for row in range(rows):
            lines.write(json.dumps({"prompt": f"a study of moths, plate {row}", "seed": row, **JOB}) + "\n")
    start = time.perf_counter()
    with path.open("rb") as body:
        answer = http.post("/v1/datasets/bench-upload/files", params={"format": "jsonl"}, content=body)
    seconds = time.perf_counter() - start
    assert answer.status_code == 200, answer.text
    enqueued = answer.json()["enqueued"]
    assert enqueued == rows, answer.json()
    return {"rows": rows, "seconds": round(seconds, 2), "jobs_per_s": round(enqueued / seconds)}


def post_latency(http: httpx.Client, posts: int, dataset: str = "bench-post") -> dict[str, float]:
    times = []
    for index in range(posts):
        job = {"prompt": f"one heron, number {index}", "dataset": dataset, **JOB}
        start = time.perf_counter()
        answer = http.post("/v1/jobs", json=job)
        times.append((time.perf_counter() - start) * 1000)
        assert answer.status_code == 202, answer.text
    times.sort()
    return {
        "posts": posts,
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[int(0.95 * posts)], 2),
    }


def results_page(http: httpx.Client, storage: Path, stored: int) -> dict[str, float]:
    """A dataset folder with `stored` results (a tiny PNG and its metadata, as a worker writes them)."""
    folder = storage / "bench-gallery"
    folder.mkdir(parents=True)
    sample = (Path(__file__).parent / "fixtures" / "results-0.1.0").rglob("*.json")
    metadata = json.loads(next(iter(sample)).read_text())
    for index in range(stored):
        job_id = f"img-{index:07d}"  # a named job: its metadata stays valid with the dataset changed
        (folder / f"{job_id}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        (folder / f"{job_id}.json").write_text(
            json.dumps(
                {**metadata, "job_id": job_id, "job": {**metadata["job"], "dataset": "bench-gallery", "job_id": job_id}}
            )
        )
    times = []
    after = None
    for _ in range(20):
        start = time.perf_counter()
        page = http.get(
            "/v1/datasets/bench-gallery/results", params={"limit": 50, **({"after": after} if after else {})}
        )
        times.append((time.perf_counter() - start) * 1000)
        assert page.status_code == 200 and len(page.json()["results"]) == 50, page.text[:300]
        assert all(item["result"] is not None for item in page.json()["results"]), "every result read"
        after = page.json()["next"]
    return {
        "stored": stored,
        "page": 50,
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
    }


def gallery_page(url: str, token: str, stored: int) -> dict[str, float]:
    """The web page's gallery of the same dataset (48 results a page, their metadata and the record), as a
    logged-in browser asks for it; thumbnails are requests of their own, made lazily."""
    with httpx.Client(base_url=url, timeout=60) as browser:
        assert browser.post("/ui/login", data={"token": token}).status_code == 303
        times = []
        after = None
        for _ in range(20):
            start = time.perf_counter()
            page = browser.get("/ui/datasets/bench-gallery", params={"after": after} if after else {})
            times.append((time.perf_counter() - start) * 1000)
            assert page.status_code == 200 and page.text.count("<figure>") == 48, page.text[:300]
            after = page.text.split('id="next" href="/ui/datasets/bench-gallery?after=')[1].split('"')[0]
    median, worst = statistics.median(times), max(times)
    return {"stored": stored, "page": 48, "median_ms": round(median, 1), "max_ms": round(worst, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--posts", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fluxfarm-gateway-bench-") as work:
        folder = Path(work)
        with RedisServer(folder / "redis") as server:
            storage = folder / "out"
            settings = HostSettings(broker_url=server.url, storage_url=f"file://{storage}", cache_dir=folder / "cache")
            with running_gateway(settings, folder / "gateway.log", {"FLUXFARM_GATEWAY_MAX_UPLOAD_MIB": "4096"}) as gw:
                token = gw.token("bench", "--datasets", "bench-*")
                with gw.client(token) as http:
                    http.timeout = httpx.Timeout(600)
                    print(json.dumps({"figure": "upload", **upload_rate(http, folder, args.rows)}), flush=True)
                    print(json.dumps({"figure": "single_post", **post_latency(http, args.posts)}), flush=True)
                    print(json.dumps({"figure": "results_page", **results_page(http, storage, args.rows)}), flush=True)
                    # The same POST into the dataset of 100,000 stored results: it looks up its job, not the dataset.
                    big = post_latency(http, args.posts, "bench-gallery")
                    print(json.dumps({"figure": "single_post_into_stored_dataset", **big}), flush=True)
                print(json.dumps({"figure": "gallery_page", **gallery_page(gw.url, token, args.rows)}), flush=True)


if __name__ == "__main__":
    main()
