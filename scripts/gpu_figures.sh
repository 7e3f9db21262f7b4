#!/usr/bin/env bash
# One device run (one H100/H200, see the `device` tool): the GPU figures of docs/metrics.md's ROAD and
# suite cost sections, then the CPU-against-GPU maps of every method (scripts/check_cuda.py) while
# time is left. Everything printed goes to $OUT/gpu_figures.log too.
#   bash scripts/gpu_figures.sh            (on the device: python3 there holds PyTorch; carry .whl for captum)
#   PY=.venv/bin/python QUICK=1 bash scripts/gpu_figures.sh   (a small dry run on a CPU)
#   STAGES=vitb_suite,embedded_road bash scripts/gpu_figures.sh   (some stages only; names below)
set -u
OUT=${OUT:-/tmp/gpu_figures}
mkdir -p "$OUT"
LOG=$OUT/gpu_figures.log
PY=${PY:-python3}
DEV=cuda
if ls .whl/*.whl >/dev/null 2>&1 && [ -z "${QUICK:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$(date +%s)
if [ -n "${QUICK:-}" ]; then DEV=cpu; S224=32; S112=24; N=1; R=1; else S224=224; S112=112; N=8; R=3; fi
step() {  # step SECONDS ARGS...: one script under a time limit, logged
  local limit=$1; shift
  echo "== [$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"
  timeout "$limit" "$PY" "$@" 2>&1 | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; "$PY" -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee -a "$LOG"
# default: what the last device session left unmeasured (the counter-based noise drawn on the GPU:
# its agreement with the CPU, then the noisy metrics and the suites); the other stages by name
want() { [[ ",${STAGES:-road_noise_check,vitb_noisy,embedded_suite,vitb_suite,check_cuda}," == *",$1,"* ]]; }
if want imputer; then
  step 120 scripts/bench_road_imputer.py --size $S224 --images 4 --device $DEV --methods block,mg,mg:w2,mg:w0,cg
  step 60 scripts/bench_road_imputer.py --size $S224 --images 4 --device $DEV --methods mg,block --dtype float32
  step 60 scripts/bench_road_imputer.py --size $S112 --images $N --device $DEV --methods block,mg,mg:w2
fi
if want road_noise_check; then  # ROAD's imputed inputs with noise: the GPU (mg, noise drawn in the background) against the CPU
  echo "== [$(( $(date +%s) - START )) s] ROAD inputs, $DEV against cpu" | tee -a "$LOG"
  DEV=$DEV "$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import os, torch
from transexplain.evaluation.metrics import curves, road
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
maps = curves.gaussian_blur(torch.rand(3, 1, 64, 64, generator=g, dtype=torch.float64), 9, 3.0)[:, 0]
from transexplain import rng
def gens():
    return [torch.Generator().manual_seed(10 + i) for i in range(3)]
def streams():
    return [rng.Stream(10 + i) for i in range(3)]
for name, make in (("torch.Generator (drawn on the host)", gens), ("rng.Stream (drawn on the device)", streams)):
    cpu = road.road_inputs(x, maps, generator=make())
    dev = road.road_inputs(x.to(os.environ["DEV"]), maps.to(os.environ["DEV"]), generator=make()).cpu()
    print(f"{name}: max |difference| {float((cpu - dev).abs().max()):.2e} (noise 0.01: a different draw would differ by ~0.01)")
z = rng.draw([rng.Stream(5), rng.Stream(6)], (2, 3, 224, 224))
zd = rng.draw([rng.Stream(5), rng.Stream(6)], (2, 3, 224, 224), device=os.environ["DEV"]).cpu()
u = rng.draw([rng.Stream(7)], (1, 3, 224, 224), "rand")
ud = rng.draw([rng.Stream(7)], (1, 3, 224, 224), "rand", device=os.environ["DEV"]).cpu()
print(f"rng.draw {os.environ['DEV']} against cpu: normals max |difference| {float((z - zd).abs().max()):.2e}, "
      f"{int((z != zd).sum())} of {z.numel()} differ; uniforms equal: {torch.equal(u, ud)}")
import time
for dev in ("cpu", os.environ["DEV"]):
    rng.draw(rng.Stream(1), (1000,), device=dev)
    if dev != "cpu": torch.cuda.synchronize()
    t = time.perf_counter()
    rng.draw([rng.Stream(i) for i in range(72)], (72, 3, 224, 224), device=dev)
    if dev != "cpu": torch.cuda.synchronize()
    print(f"rng.draw 10.8 M normals on {dev}: {1000 * (time.perf_counter() - t):.1f} ms")
PYEOF
fi
want imputer224 && step 60 scripts/bench_road_imputer.py --size $S224 --images 4 --device $DEV --methods block,mg
if want vitb_noisy && [ -z "${QUICK:-}" ]; then  # the metrics with CPU noise draws or CPU-side work, ViT-B
  step 120 scripts/bench_metrics.py --device $DEV --model vit_base_patch16_224 --random-weights --precision float32 \
    --metrics road_morf,road_lerf,infidelity,max_sensitivity,randomisation --batch-size $N --repeats $R
fi
want embedded_road && step 90 scripts/bench_metrics.py --device $DEV --metrics road_morf,road_lerf --batch-size $N --repeats $R
if want vitb_road && [ -z "${QUICK:-}" ]; then
  for prec in float32 float64; do
    step 120 scripts/bench_metrics.py --device $DEV --model vit_base_patch16_224 --random-weights --precision $prec \
      --metrics road_morf,road_lerf --batch-size $N --repeats $R
  done
fi
want embedded_suite && step 150 scripts/bench_metrics.py --device $DEV --metrics all --batch-size $N --repeats $R
if want vitb_suite && [ -z "${QUICK:-}" ]; then
  step 200 scripts/bench_metrics.py --device $DEV --model vit_base_patch16_224 --random-weights --precision float32 \
    --metrics all --batch-size $N --repeats $R
fi
if want check_cuda && [ -z "${QUICK:-}" ] && [ $(( $(date +%s) - START )) -lt 260 ]; then
  step 150 scripts/check_cuda.py --n 4
fi
echo "== done in $(( $(date +%s) - START )) s" | tee -a "$LOG"
