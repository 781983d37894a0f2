"""Gateway tokens on a real Redis, made, listed and revoked through `fluxfarm token` as an operator does."""

from __future__ import annotations

import pytest
import redis

from fluxfarm.producer.gateway.tokens import TOKEN_PREFIX, TokenBook, TokenError, TokenGrant
from fluxfarm.producer.local_stack import RedisServer
from tests.conftest import run_fluxfarm


@pytest.fixture
def book(redis_client: redis.Redis) -> TokenBook:
    redis_client.flushdb()
    return TokenBook(redis_client)


def _every_byte_in(client: redis.Redis) -> bytes:
    """All keys and values of the Redis, as one blob to search."""
    blob = b""
    for key in client.scan_iter():
        if client.type(key) == b"stream":
            fields = [item for _, entry in client.xrange(key) for pair in entry.items() for item in pair]
        else:
            fields = [item for pair in client.hgetall(key).items() for item in pair]
        blob += key + b"".join(fields)
    return blob


def test_the_cli_prints_a_token_once_and_redis_keeps_only_its_hash(
    redis_server: RedisServer, redis_client: redis.Redis, book: TokenBook
) -> None:
    env = {"FLUXFARM_BROKER_URL": redis_server.url}
    made = run_fluxfarm("token", "create", "alice", "--datasets", "alice-*,shared", "--max-queued", "50", env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    assert token.encode() not in _every_byte_in(redis_client)

    record = book.find(token)
    assert record is not None and record.name == "alice"
    assert record.grant.max_queued == 50 and record.grant.priorities == ["normal", "low"] and not record.grant.admin
    assert book.find(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert book.find("Bearer " + token) is None

    listed = run_fluxfarm("token", "list", env=env)
    assert listed.returncode == 0 and "alice: alice-*,shared; max 50 queued; normal,low" in listed.stdout
    assert "0 jobs sent, 0 images, 0.00 GPU hours" in listed.stdout
    assert token not in listed.stdout + listed.stderr

    again = run_fluxfarm("token", "create", "alice", "--datasets", "x", env=env)
    assert again.returncode == 1 and "a token named 'alice' exists" in again.stderr

    revoked = run_fluxfarm("token", "revoke", "alice", env=env)
    assert revoked.returncode == 0 and book.find(token) is None and book.records() == []
    unknown = run_fluxfarm("token", "revoke", "alice", env=env)
    assert unknown.returncode == 1 and "no token named 'alice'" in unknown.stderr


@pytest.mark.parametrize(
    ("scopes", "inside", "outside"),
    [
        (["alice-*"], ["alice-", "alice-moths", "alice-a.b"], ["alice", "bob-moths", "xalice-moths"]),
        (["shared"], ["shared"], ["shared-2", "share"]),
        (["*"], ["anything", "bob"], []),
    ],
)
def test_a_scope_is_a_name_or_a_prefix_as_text(scopes: list[str], inside: list[str], outside: list[str]) -> None:
    grant = TokenGrant(datasets=scopes)
    assert all(grant.allows(name) for name in inside)
    assert not any(grant.allows(name) for name in outside)
    assert TokenGrant(datasets=["x"], admin=True).allows("bob-moths")


@pytest.mark.parametrize(
    ("name", "grant", "reason"),
    [
        ("a b", {"datasets": ["x"]}, "name: "),
        ("carol", {"datasets": []}, "datasets: List should have at least 1 item"),
        ("carol", {"datasets": ["../etc*"]}, "datasets.0: "),
        ("carol", {"datasets": ["a.*b"]}, "datasets.0: "),
        ("carol", {"datasets": ["x"], "priorities": ["urgent"]}, "priorities.0: Input should be"),
        ("carol", {"datasets": ["x"], "max_queued": 0}, "max_queued: Input should be greater than or equal to 1"),
        ("carol", {"datasets": ["x"], "role": "root"}, "role: unknown field"),
    ],
)
def test_a_bad_token_request_is_refused_with_its_field(book: TokenBook, name: str, grant: dict, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        book.create(name, grant)
    assert book.records() == []
