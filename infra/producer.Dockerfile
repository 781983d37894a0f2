# Producer / CLI: the light client, no torch; with Flower (the [monitor] extra) for the compose file's flower
# and the gateway (the [gateway] extra: FastAPI, uvicorn).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fluxfarm ./fluxfarm
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
RUN pip install ".[monitor,gateway]" && useradd --create-home --uid 10001 fluxfarm

USER fluxfarm
# `fluxfarm exporter`'s /metrics, and `fluxfarm gateway`
EXPOSE 9463 8080
ENTRYPOINT ["fluxfarm"]
CMD ["--help"]
