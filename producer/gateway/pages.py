"""The gateway's web page (`/ui`): log in with a token, see its datasets' progress, page through a
dataset's gallery (thumbnails the gateway makes once and keeps beside the dataset) with each image's
metadata, its dead letters, and the fleet. Server-rendered, no script; a page costs one result page's
listing however large the dataset.

The token rides in an HttpOnly, SameSite=Strict cookie scoped to /ui: no script can read it, and no other
site's page can make a browser send it."""

from __future__ import annotations

import io
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from PIL import Image

from fluxfarm.producer.gateway.auth import check_datasets
from fluxfarm.producer.gateway.page_templates import STYLE, pages
from fluxfarm.producer.gateway.state import farm_client
from fluxfarm.producer.gateway.tokens import TokenBook, TokenRecord
from fluxfarm.shared.errors import FarmError, ObjectNotFound
from fluxfarm.shared.jobs import parse_dataset_name, parse_job_id
from fluxfarm.shared.metadata import gpu_seconds

COOKIE = "fluxfarm_token"
PAGE = 48
THUMB_PX = 256
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


class LoginNeeded(Exception):
    """No token cookie, or one the book no longer knows: the page sends the browser to log in."""


def _html(name: str, status: int = 200, **values: Any) -> HTMLResponse:
    return HTMLResponse(pages.get_template(name).render(**values), status_code=status, headers=SECURITY_HEADERS)


def page_caller(request: Request) -> TokenRecord:
    token = request.cookies.get(COOKIE)
    book: TokenBook = request.app.state.tokens
    record = book.find(token) if token else None
    if record is None:
        raise LoginNeeded
    return record


PageCaller = Annotated[TokenRecord, Depends(page_caller)]


@router.get("/style.css")
def style() -> Response:
    return Response(STYLE, media_type="text/css", headers={"Cache-Control": "max-age=3600"})


@router.get("/login")
def login_form() -> HTMLResponse:
    return _html("login", token=None)


@router.post("/login")
async def login(request: Request) -> Response:
    """The form's token (a urlencoded body, bounded like every body): a cookie on success."""
    fields = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (fields.get("token") or [""])[0].strip()
    book: TokenBook = request.app.state.tokens
    if book.find(token) is None:
        return _html("login", status=401, token=None, error="unknown or revoked token")
    response = RedirectResponse("/ui/", status_code=303)
    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure, path="/ui")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("/")
def datasets(request: Request, record: PageCaller) -> HTMLResponse:
    client = farm_client(request)
    names = [name for name in client.dataset_names() if record.grant.allows(name)]
    return _html("datasets", token=record.name, records=[client.dataset_record(name) for name in names])


@router.get("/datasets/{name}")
def dataset(
    request: Request, record: PageCaller, name: str, after: Annotated[str | None, Query()] = None
) -> HTMLResponse:
    dataset_name = parse_dataset_name(name)
    check_datasets(record, [dataset_name])
    if after is not None:
        parse_job_id(after)
    client = farm_client(request)
    ids = client.store.stored_job_page(dataset_name, after, PAGE)

    def item(job_id: str) -> dict[str, Any] | None:
        result = client.dataset_result(dataset_name, job_id)
        if result is None:
            return None
        return {
            "job_id": job_id,
            "result": result,
            "url": client.image_url(result),
            "gpu_s": gpu_seconds(result.timings),
        }

    items = [entry for entry in request.app.state.pool.map(item, ids) if entry is not None]
    return _html(
        "dataset",
        token=record.name,
        r=client.dataset_record(dataset_name),
        results=items,
        after=after,
        next=ids[-1] if len(ids) == PAGE else None,
        letters=client.datasets.dead_letters(20, dataset_name),
    )


@router.get("/thumbs/{name}/{job_id}.webp")
def thumbnail(request: Request, record: PageCaller, name: str, job_id: str) -> Response:
    """A result's thumbnail, made from its PNG on first sight and kept in storage beside the dataset."""
    dataset_name = parse_dataset_name(name)
    check_datasets(record, [dataset_name])
    parse_job_id(job_id)
    client = farm_client(request)
    key = client.store.thumbnail_key(dataset_name, job_id)
    try:
        data = client.store.get(key)
    except ObjectNotFound:
        result = client.dataset_result(dataset_name, job_id)
        if result is None:
            raise FarmError(f"dataset {dataset_name}: no stored job {job_id}") from None
        with Image.open(io.BytesIO(client.store.get(result.image.key))) as image:
            image.thumbnail((THUMB_PX, THUMB_PX))
            out = io.BytesIO()
            image.convert("RGB").save(out, format="WEBP", quality=80)
        data = out.getvalue()
        client.store.put(key, data, "image/webp")
    return Response(data, media_type="image/webp", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/fleet")
def fleet(request: Request, record: PageCaller) -> HTMLResponse:
    return _html("fleet", token=record.name, fleet=farm_client(request).fleet())
