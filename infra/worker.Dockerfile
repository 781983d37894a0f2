# GPU worker: CUDA runtime with PyTorch, plus fluxfarm[gpu]. One container per GPU.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# expandable_segments: a tight VRAM budget keeps the memory that fragmentation would strand.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    HF_HOME=/cache/huggingface \
    FLUXFARM_CACHE_DIR=/cache/fluxfarm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fluxfarm ./fluxfarm
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
# The image's torch satisfies the [gpu] extra's torch requirement, so pip keeps its CUDA build.
RUN pip install '.[gpu]' \
    && useradd --create-home --uid 10001 fluxfarm \
    && mkdir -p /cache && chown fluxfarm /cache

USER fluxfarm
VOLUME ["/cache"]
# Prometheus /metrics (FLUXFARM_METRICS_PORT)
EXPOSE 9464
ENTRYPOINT ["fluxfarm", "worker"]
