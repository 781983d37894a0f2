"""The HTTP gateway: the one service a shared farm's producers talk to (`fluxfarm gateway`).

It alone holds the producer-side Redis and S3 credentials; people and programs hold bearer tokens
(tokens.py) scoped to dataset prefixes, with quotas. FastAPI and uvicorn come with the `[gateway]`
extra; tokens.py needs neither, so `fluxfarm token` runs on a client-only install."""
