"""docs/deploy/multi-host.md, run as written: its certificate commands make the CA and the server
certificate, Redis starts with `infra/compose.tls.yml`'s own command (TLS, ACL users), S3 answers over
HTTPS with that certificate, and the guide's connect, worker and producer blocks render a job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
import yaml

from fluxfarm.producer.local_stack import find_redis_server, free_port
from fluxfarm.shared.ladder import QuantLevel
from tests.compose_files import interpolate

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "deploy" / "multi-host.md"
TLS_OVERRIDE = ROOT / "infra" / "compose.tls.yml"
REDIS_PASSWORD = "multi-host-pw-1f3a"
"""The worker user's (the guide's GPU host connects as `worker`)."""
REDIS_PASSWORDS = {
    f"REDIS_{user}_PASSWORD": f"{user.lower()}-pw-{index}"
    for index, user in enumerate(("ADMIN", "PRODUCER", "GATEWAY", "EXPORTER", "FLOWER"))
} | {"REDIS_WORKER_PASSWORD": REDIS_PASSWORD}
BUCKET = "farm-multi-host"


def guide_blocks() -> dict[str, str]:
    """The guide's tested blocks: `<!-- run: NAME -->` and the bash fence under it."""
    text = GUIDE.read_text()
    blocks = dict(re.findall(r"<!-- run: ([\w-]+) -->\n```bash\n(.*?)```", text, flags=re.DOTALL))
    assert set(blocks) == {"certificates", "connect", "worker", "producer"}, sorted(blocks)
    return blocks


def bash(script: str, env: dict[str, str], cwd: Path, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd, text=True, start_new_session=True, **popen
    )


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The central host's checkout folder, after the guide's certificate block ran in it."""
    home = tmp_path_factory.mktemp("central")
    env = {"PATH": os.environ["PATH"], "FARM_HOST": "localhost", "HOME": str(home)}
    done = bash(guide_blocks()["certificates"], env, home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = done.communicate(timeout=120)
    assert done.returncode == 0, output
    return home


def compose_redis_command(tls_dir: Path, data_dir: Path, tls_port: int) -> list[str]:
    """infra/compose.tls.yml's Redis command (infra/redis/start.sh and its options) with this machine's
    paths and port."""
    command = interpolate(yaml.safe_load(TLS_OVERRIDE.read_text())["services"]["redis"]["command"], {})
    assert command[0] == "/etc/fluxfarm/redis/start.sh"
    args = [arg.replace("/tls/", f"{tls_dir}/") for arg in command[1:]]
    args[args.index("--tls-port") + 1] = str(tls_port)
    # Plain port off, loopback, a private data folder: what the container's network and volume give.
    start = ROOT / "infra" / "redis" / "start.sh"
    return [str(start), *args, "--port", "0", "--bind", "127.0.0.1", "--dir", str(data_dir)]


@pytest.fixture(scope="module")
def tls_redis(central: Path) -> Iterator[int]:
    port = free_port()
    data = central / "redis-data"
    data.mkdir()
    env = {
        **os.environ,
        **REDIS_PASSWORDS,
        "REDIS_ACL_FILE": str(data / "users.acl"),
        "PATH": f"{Path(find_redis_server()).parent}{os.pathsep}{os.environ['PATH']}",
    }
    process = subprocess.Popen(
        compose_redis_command(central / "infra" / "tls", data, port),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 15
    import redis

    client = redis.Redis(
        host="localhost",
        port=port,
        username="worker",
        password=REDIS_PASSWORD,
        ssl=True,
        ssl_ca_certs=str(central / "infra/tls/ca.crt"),
    )
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None:
                pytest.skip(f"this redis-server cannot serve TLS: {(process.stdout.read() if process.stdout else '')}")
            assert time.monotonic() < deadline, "TLS redis-server did not come up"
            time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def https_s3(central: Path) -> Iterator[int]:
    """moto's S3 over HTTPS with the farm's server certificate (ThreadedMotoServer speaks plain HTTP)."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    tls = central / "infra" / "tls"
    port = free_port()
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        "127.0.0.1", port, app, threaded=True, ssl_context=(str(tls / "server.crt"), str(tls / "server.key"))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s3 = boto3.client("s3", endpoint_url=f"https://localhost:{port}", verify=str(tls / "ca.crt"))
    s3.create_bucket(Bucket=BUCKET)
    yield port
    server.shutdown()


def host_env(central: Path, redis_port: int, s3_port: int, tiny_model: Path, home: Path) -> dict[str, str]:
    """What the guide's "say where the farm is" block exports, for this machine."""
    from fluxfarm.worker.tools.tiny_model import gguf_path

    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "FARM_HOST": "localhost",
        "FARM_REDIS_PORT": str(redis_port),
        "FARM_S3_PORT": str(s3_port),
        "FARM_REDIS_USER": "worker",
        "REDIS_PASSWORD": REDIS_PASSWORD,
        "FARM_S3_USER": os.environ["AWS_ACCESS_KEY_ID"],
        "S3_PASSWORD": os.environ["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "FLUXFARM_CA": str(central / "infra" / "tls" / "ca.crt"),
        "FLUXFARM_BUCKET": BUCKET,
        "FLUXFARM_MODEL": str(tiny_model),
        # This machine has no GPU and the tiny model's level is a GGUF file beside it.
        "FLUXFARM_TRANSFORMER": str(gguf_path(tiny_model, QuantLevel.Q8_0)),
        "FLUXFARM_CACHE_DIR": str(home / "cache"),
        "FLUXFARM_METRICS_PORT": "0",
        "COLUMNS": "200",
    }


def test_the_guide_s_commands_connect_a_worker_host_and_a_producer_over_tls(
    central: Path, tls_redis: int, https_s3: int, tiny_model: Path, tmp_path: Path
) -> None:
    blocks = guide_blocks()
    env = host_env(central, tls_redis, https_s3, tiny_model, tmp_path)
    log_path = tmp_path / "worker-host.log"
    with log_path.open("w") as log:
        worker = bash(blocks["connect"] + blocks["worker"], env, tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while " ready." not in log_path.read_text(errors="replace"):
            assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "worker host did not become ready"
            time.sleep(0.5)
        host_log = log_path.read_text(errors="replace")
        assert "0 workers" in host_log  # `fluxfarm status` answered over TLS before the worker started
        with gateway_over_tls(central, env, tmp_path) as (gateway_port, token):
            # The producer's machine: the guide's exports and nothing else of the farm's secrets.
            as_producer = {name: env[name] for name in ("PATH", "HOME", "FARM_HOST", "FLUXFARM_CA", "COLUMNS")} | {
                "FARM_GATEWAY_PORT": str(gateway_port),
                "FARM_TOKEN": token,
            }
            producer = bash(blocks["producer"], as_producer, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            output, _ = producer.communicate(timeout=300)
        assert producer.returncode == 0, output
        assert f"s3://{BUCKET}/renders/multi-host/" in output
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=120)
    s3 = boto3.client(
        "s3", endpoint_url=f"https://localhost:{https_s3}", verify=str(central / "infra" / "tls" / "ca.crt")
    )
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="renders/multi-host/")["Contents"]]
    assert len([key for key in keys if key.endswith(".png")]) == 1
    assert len([key for key in keys if key.endswith(".json")]) == 1


@contextmanager
def gateway_over_tls(central: Path, host: dict[str, str], work: Path) -> Iterator[tuple[int, str]]:
    """The central host's gateway on its own Redis user, serving HTTPS with the farm's certificate (Caddy's
    part in compose), and a token made as the guide makes one: (its port, the token)."""
    tls = central / "infra" / "tls"
    port = free_port()
    env = {
        **host,
        "FLUXFARM_BROKER_URL": (
            f"rediss://gateway:{REDIS_PASSWORDS['REDIS_GATEWAY_PASSWORD']}@localhost:{host['FARM_REDIS_PORT']}/0"
        ),
        "FLUXFARM_STORAGE_URL": f"s3://{BUCKET}/renders",
        "FLUXFARM_S3_ENDPOINT_URL": f"https://localhost:{host['FARM_S3_PORT']}",
        "FLUXFARM_TLS_CA_FILE": str(tls / "ca.crt"),
        "AWS_ACCESS_KEY_ID": host["FARM_S3_USER"],
        "AWS_SECRET_ACCESS_KEY": host["S3_PASSWORD"],
    }
    made = subprocess.run(
        ["fluxfarm", "token", "create", "multi-host", "--datasets", "multi-*"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    command = ["fluxfarm", "gateway", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--tls-cert", str(tls / "server.crt"), "--tls-key", str(tls / "server.key")]
    with (work / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"Uvicorn running" not in (work / "gateway.log").read_bytes():
            assert gateway.poll() is None and time.monotonic() < deadline, (work / "gateway.log").read_text()
            time.sleep(0.2)
        yield port, made.stdout.strip()
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


def test_a_worker_host_refuses_a_redis_whose_certificate_its_ca_did_not_sign_and_its_worker_exits(
    central: Path, tls_redis: int, https_s3: int, tiny_model: Path, tmp_path: Path
) -> None:
    """Without the farm's CA, the system CAs are used and the connection is refused, not trusted."""
    env = host_env(central, tls_redis, https_s3, tiny_model, tmp_path)
    env["FLUXFARM_CA"] = ""  # the connect block then sets no CA file
    blocks = guide_blocks()
    done = bash(blocks["connect"], env, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = done.communicate(timeout=60)
    assert done.returncode != 0
    assert "certificate verify failed" in output
    assert REDIS_PASSWORD not in output
    # The worker block on the same exports: a certificate that does not verify will not verify on a later try,
    # so the worker exits with one line where waiting for Redis (the wait for a Redis not up yet) would loop.
    exports = blocks["connect"].replace("fluxfarm status\n", "")
    assert exports != blocks["connect"]
    worker = bash(exports + blocks["worker"], env, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode != 0, output[-3000:]
    assert "Redis refused this worker" in output and "certificate verify failed" in output, output[-3000:]
    assert "Redis unreachable" not in output and "Traceback" not in output, output[-3000:]
    assert REDIS_PASSWORD not in output
