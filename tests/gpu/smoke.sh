#!/usr/bin/env bash
# GPU smoke run: on a CUDA machine, `fluxfarm demo` renders through a private Redis with a worker on
# cuda:0 (tiny FLUX, GGUF Q8_0 transformer), then prints the stored metadata. A second demo caps the
# worker at 16 GiB, which makes the VRAM plan swap the text encoders in per encode phase and tile the
# VAE decode: that path runs on the GPU too. On the device tool, after installing the carried wheels:
#   bash tests/gpu/smoke.sh "$OUT/smoke"
set -euo pipefail
out=${1:-fluxfarm-gpu-smoke}
python3 -c 'import torch; assert torch.cuda.is_available(); print("torch", torch.__version__, torch.cuda.get_device_name(0))'
check() {
  python3 - "$1" <<'PY'
import json, pathlib, sys
metas = sorted(pathlib.Path(sys.argv[1], "output", "demo").glob("*.json"))
assert len(metas) == 4, metas
for path in metas:
    meta = json.loads(path.read_text())
    assert meta["worker"]["device"] == "cuda:0" and meta["quant"] == "Q8_0", meta
    seconds = {k: round(v, 3) for k, v in meta["timings"].items() if k.endswith("_s")}
    print(meta["job_id"], meta["quant"], meta["worker"]["gpu_name"], meta["worker"]["vram_gib"], seconds)
PY
}
FLUXFARM_DEVICE=cuda:0 python3 -m fluxfarm demo --jobs 4 --out-dir "$out/full"
check "$out/full"
grep -m1 "plan:" "$out/full/worker.log"
FLUXFARM_DEVICE=cuda:0 FLUXFARM_VRAM_BUDGET_GIB=16 python3 -m fluxfarm demo --jobs 4 --out-dir "$out/capped"
check "$out/capped"
grep -m1 "plan:" "$out/capped/worker.log" | grep '"text_encoders":"gpu-swap"' | grep '"vae_tiling":true'
python3 -c "import json,pathlib; print(json.dumps(json.loads(sorted(pathlib.Path('$out/capped/output/demo').glob('*.json'))[0].read_text()), indent=2))"
