"""`fluxfarm token create | list | revoke`: the gateway's tokens, made by an operator who holds the
producer-side Redis credentials (the gateway's own, or an admin's)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fluxfarm.producer.cli import err, out
from fluxfarm.producer.gateway.audit import audit
from fluxfarm.producer.gateway.tokens import TokenBook
from fluxfarm.producer.gateway.usage import TokenUsage
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.redis_conn import open_redis

tokens = typer.Typer(help="Make, list and revoke the gateway's bearer tokens.", no_args_is_help=True)


def _book() -> TokenBook:
    return TokenBook(open_redis(ProducerSettings()))


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@tokens.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who holds it: a person, a team or a program.")],
    datasets: Annotated[
        str, typer.Option(help="Datasets it sees and touches, comma-separated: names, or prefixes ending in '*'.")
    ],
    max_queued: Annotated[int | None, typer.Option(help="Jobs it may have queued or running at once.")] = None,
    priorities: Annotated[str, typer.Option(help="Priorities it may use, comma-separated.")] = "normal,low",
    admin: Annotated[bool, typer.Option("--admin", help="Sees the whole farm and manages tokens.")] = False,
) -> None:
    """Make a token and print it: the only time it is shown (Redis keeps its hash)."""
    grant = {"datasets": _items(datasets), "max_queued": max_queued, "priorities": _items(priorities), "admin": admin}
    book = _book()
    token = book.create(name, grant)
    audit(book.redis, "token-create", name, grant=grant)
    out.print(token, highlight=False)


@tokens.command("list")
def list_tokens() -> None:
    """The live tokens: name, datasets, quotas, priorities, when made, and what each has used (jobs sent,
    images rendered of its datasets, GPU hours). Never the tokens themselves."""
    book = _book()
    usage = TokenUsage(book.redis, DatasetBook(book.redis))
    for record in book.records():
        grant, use = record.grant, usage.usage(record.name)
        quota = f"max {grant.max_queued} queued" if grant.max_queued else "no queue limit"
        role = " admin" if grant.admin else ""
        out.print(
            escape(
                f"{record.name}{role}: {','.join(grant.datasets)}; {quota}; {','.join(grant.priorities)}; "
                f"made {record.created_at:%Y-%m-%d %H:%M} UTC; {use.jobs_submitted:,} jobs sent, {use.images:,} "
                f"images, {use.gpu_seconds / 3600:.2f} GPU hours"
            ),
            highlight=False,
        )


@tokens.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token: every request that presents it from now on is refused."""
    book = _book()
    book.revoke(name)
    audit(book.redis, "token-revoke", name)
    err.print(f"revoked {escape(name)}", highlight=False)


def gateway(
    host: Annotated[
        str, typer.Option(help="Address to listen on; a reverse proxy in front terminates TLS.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM), where no proxy is in front.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key (PEM).")] = None,
) -> None:
    """Serve the HTTP gateway: the one service a shared farm's producers talk to, with bearer tokens
    (`fluxfarm token create`). It holds the producer-side Redis and S3 credentials; nobody else needs them."""
    try:
        import uvicorn

        from fluxfarm.producer.gateway.app import create_app
        from fluxfarm.producer.gateway.settings import GatewaySettings
    except ImportError as error:
        raise FarmError(f"the gateway needs the [gateway] extra: pip install 'fluxfarm[gateway]' ({error})") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise FarmError("--tls-cert and --tls-key go together")
    uvicorn.run(
        create_app(GatewaySettings()),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )
