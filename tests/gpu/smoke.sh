#!/usr/bin/env bash
# GPU smoke run (issue 2, acceptance 6): on a CUDA machine, `fluxfarm demo` renders through a private
# Redis with a worker on cuda:0 (tiny FLUX, GGUF Q8_0 transformer), then prints the stored metadata.
# On the device tool, after installing the carried wheels (../shared/device/wheels.sh header):
#   bash tests/gpu/smoke.sh "$OUT/smoke"
set -euo pipefail
out=${1:-fluxfarm-gpu-smoke}
python3 -c 'import torch; assert torch.cuda.is_available(); print("torch", torch.__version__, torch.cuda.get_device_name(0))'
FLUXFARM_DEVICE=cuda:0 python3 -m producer.cli demo --jobs 4 --out-dir "$out"
python3 - "$out" <<'PY'
import json, pathlib, sys
metas = sorted(pathlib.Path(sys.argv[1], "output", "demo").glob("*.json"))
assert len(metas) == 4, metas
for path in metas:
    meta = json.loads(path.read_text())
    assert meta["worker"]["device"] == "cuda:0" and meta["quant"] == "Q8_0", meta
    seconds = {k: round(v, 3) for k, v in meta["timings"].items() if k.endswith("_s")}
    print(meta["job_id"], meta["quant"], meta["worker"]["gpu_name"], meta["worker"]["vram_gib"], seconds)
print(json.dumps(json.loads(metas[0].read_text()), indent=2))
PY
