"""`fluxfarm bench-fleet --replay`: the jobs/s one Redis sustains for the farm's own command mix (issue 21, 5).

`bench-fleet` cannot show it on a small machine: its producer, workers and Redis share the cores, and the
Python around each command costs more than Redis' work on it (0.25-0.33 ms of Redis CPU a job against
~5 ms of worker CPU). So the mix is recorded and replayed by clients that cost next to nothing:
1. capture: a private redis-server, render-free workers (`fluxfarm worker` with FLUXFARM_RENDER_FREE), and
   a dataset of `jobs` sent and drained, every command the farm sends recorded by `MONITOR` (the commands a
   Lua script runs inside are not replayed on their own: the script call is). This tool's own polls and
   the `MONITOR` connection are left out;
2. the recording is written `rounds` times, each round with the job ids, task ids and delivery tags in it
   renamed, so each round is new jobs in the same dataset (its sets grow as a real dataset's do), split
   into `clients` streams of whole rounds;
3. replay: a fresh redis-server gets the recorded `SCRIPT LOAD`s, then `clients` `redis-cli` processes (C)
   send their streams at once, each command a round trip of its own (`redis-cli` reading commands from its
   input waits for each reply: stricter than the farm, which pipelines some). jobs/s is the jobs replayed
   over the wall time until the last stream is answered; Redis' own CPU over the same span beside it.
A blocking `BRPOP` becomes `LMPOP ... RIGHT` over the same lists (the same pop, never a wait on a list
another stream has not filled yet). On this project's 2-core machine the clients and Redis share the
cores, so the rate is a floor; Redis' CPU a job says what one core of it would sustain alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from pydantic import BaseModel

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.fleet_bench import (
    DATASET,
    bench_jobs,
    bench_settings,
    redis_cpu_s,
    start_workers,
    wait_drained,
)
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared import keys
from fluxfarm.shared.datasets import JobState
from fluxfarm.shared.errors import FarmError

_IDS = re.compile(
    rb"(?<![0-9a-f])(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})(?![0-9a-f])"
)
"""Task ids and delivery tags (UUIDs) and job ids (32 hex digits, not a script's 40-digit SHA1): renamed
in each round."""
_LEFT_OUT = {b"MONITOR", b"INFO", b"CLIENT", b"HELLO", b"PING", b"SELECT", b"QUIT", b"RESET"}
"""Connection chatter, not the farm's work."""
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("a"): 7, ord("b"): 8, ord('"'): 34, ord("\\"): 92}


class ReplayResult(BaseModel):
    jobs_captured: int
    rounds: int
    clients: int
    jobs: int
    commands: int
    commands_per_job: float
    wall_s: float
    jobs_per_s: float
    redis_cpu_s: float
    redis_cpu_ms_per_job: float
    replay_errors: int
    """Error replies during the replay (a renamed id the recording depended on would show here)."""
    jobs_recorded_done: int
    """The replayed dataset's done count afterwards: the replay did each job's moves, not no-ops."""
    cores: int | None


def parse_monitor_line(line: bytes) -> tuple[bool, list[bytes]]:
    """(run inside a Lua script, arguments) of one `MONITOR` line: `<time> [<db> <client>] "CMD" "arg" ...`."""
    head, _, rest = line.partition(b"] ")
    args: list[bytes] = []
    i = 0
    while i < len(rest):
        if rest[i] != ord('"'):
            i += 1
            continue
        i += 1
        arg = bytearray()
        while rest[i] != ord('"'):
            if rest[i] == ord("\\"):
                nxt = rest[i + 1]
                if nxt == ord("x"):
                    arg.append(int(rest[i + 2 : i + 4], 16))
                    i += 4
                    continue
                arg.append(_ESCAPES.get(nxt, nxt))
                i += 2
                continue
            arg.append(rest[i])
            i += 1
        args.append(bytes(arg))
        i += 1
    return head.endswith(b" lua"), args


def _client_of(line: bytes) -> bytes:
    return line.partition(b"[")[2].partition(b"]")[0].split(b" ")[-1]


_PLAIN = set(range(0x20, 0x7F)) - {ord('"'), ord("\\")}
_ERROR_REPLY = re.compile(rb"^(?:ERR|NOSCRIPT|WRONGTYPE|NOPERM|NOAUTH|OOM|BUSY|EXECABORT|MISCONF) ", re.MULTILINE)


def _quoted(arg: bytes) -> bytes:
    return b'"' + b"".join(bytes([c]) if c in _PLAIN else b"\\x%02x" % c for c in arg) + b'"'


def _line(args: list[bytes]) -> bytes:
    """One command as `redis-cli` reads it from its input: quoted arguments, every other byte as \\xHH."""
    return b" ".join(_quoted(a) for a in args) + b"\n"


def _non_blocking(args: list[bytes]) -> list[bytes]:
    """`BRPOP k1 .. kn timeout` as `LMPOP n k1 .. kn RIGHT`: the same pop, without the wait."""
    if args[0].upper() == b"BRPOP":
        lists = args[1:-1]
        return [b"LMPOP", str(len(lists)).encode(), *lists, b"RIGHT"]
    return args


def _renamed(args: list[bytes], round_no: int) -> list[bytes]:
    """Every id of the recording, its last five hex digits replaced by the round's: new jobs, same shapes."""
    suffix = b"%05x" % round_no
    return [_IDS.sub(lambda m: m.group(0)[:-5] + suffix, a) for a in args]


def capture(
    folder: Path, workers: int, jobs: int, timeout_s: float = 600.0
) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """(SCRIPT LOADs, every other command in order) that the farm sent to drain `jobs` jobs."""
    with RedisServer(folder / "redis-capture") as server:
        store = folder / "store"
        started = start_workers(workers, server.url, store, folder)
        lines: list[bytes] = []
        try:
            broker = redis.Redis.from_url(server.url)
            own = {str(broker.client_info()["addr"]).encode()}
            monitor = redis.Redis.from_url(server.url).connection_pool.get_connection("MONITOR")
            monitor.send_command("MONITOR")
            monitor.read_response()  # OK
            begin = time.perf_counter()
            with FarmClient(bench_settings(server.url, store)) as farm:
                farm.submit_stream(bench_jobs(jobs))
            wait_drained(broker, jobs, begin, timeout_s)
            marker = b"fluxfarm-replay-end"
            broker.echo(marker)
            while True:
                line = monitor.read_response(disable_decoding=True)
                if marker in line:
                    break
                lines.append(line)
            monitor.disconnect()
            broker.close()
        finally:
            for worker in started:
                worker.stop()
    loads: list[list[bytes]] = []
    commands: list[list[bytes]] = []
    for line in lines:
        if _client_of(line) in own:
            continue
        in_script, args = parse_monitor_line(line)
        if in_script or not args or args[0].upper() in _LEFT_OUT:
            continue
        if args[0].upper() == b"SCRIPT":
            loads.append(args)
        else:
            commands.append(_non_blocking(args))
    return loads, commands


def _streams(commands: list[list[bytes]], rounds: int, clients: int, folder: Path) -> list[Path]:
    paths = [folder / f"stream-{i}.txt" for i in range(clients)]
    handles = [path.open("wb") for path in paths]
    try:
        for round_no in range(rounds):
            handle = handles[round_no % clients]
            handle.write(b"".join(_line(_renamed(args, round_no)) for args in commands))
    finally:
        for handle in handles:
            handle.close()
    return paths


def run_replay(
    jobs: int = 300, rounds: int = 100, clients: int = 8, workers: int = 2, redis_cli: str = "redis-cli"
) -> ReplayResult:
    """Capture `jobs` jobs' commands from a live render-free farm, replay them `rounds` times from `clients`
    pipelined streams at once on a fresh Redis; see the module's docstring."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        loads, commands = capture(folder, workers, jobs)
        paths = _streams(commands, rounds, clients, folder)
        with RedisServer(folder / "redis-replay") as server:
            target = redis.Redis.from_url(server.url)
            for args in loads:
                target.execute_command(*args)
            cpu = redis_cpu_s(target)
            begin = time.perf_counter()
            replies = [path.with_suffix(".out") for path in paths]
            processes = [
                subprocess.Popen(
                    [redis_cli, "-p", str(server.port)],
                    stdin=path.open("rb"),
                    stdout=reply.open("wb"),
                    stderr=subprocess.STDOUT,
                )
                for path, reply in zip(paths, replies, strict=True)
            ]
            failed = [process.args for process in processes if process.wait() != 0]
            wall = time.perf_counter() - begin
            redis_cpu = redis_cpu_s(target) - cpu
            done = int(target.scard(keys.dataset(DATASET, JobState.DONE)))
            target.close()
            if failed:
                raise FarmError(f"bench-fleet --replay: redis-cli failed: {failed[0]!r}")
            errors = sum(len(_ERROR_REPLY.findall(reply.read_bytes())) for reply in replies)
    replayed = jobs * rounds
    return ReplayResult(
        jobs_captured=jobs,
        rounds=rounds,
        clients=clients,
        jobs=replayed,
        commands=len(commands) * rounds,
        commands_per_job=len(commands) / jobs,
        wall_s=wall,
        jobs_per_s=replayed / wall,
        redis_cpu_s=redis_cpu,
        redis_cpu_ms_per_job=redis_cpu / replayed * 1000,
        replay_errors=errors,
        jobs_recorded_done=done,
        cores=os.cpu_count(),
    )
