#!/usr/bin/env bash
# The GPU checks, as one non-interactive script for a CUDA host without a package registry.
#
# On the host, from the project root, after `../shared/gpu/stage` was run here and `.gpu/` and a
# sample-data folder travelled with the tree:
#     source .gpu/bootstrap.sh && MRIFACE_DATA=$PWD/.gpudata bash benchmarks/gpu_check.sh [smoke|full]
# `smoke` runs every GPU test and each benchmark's --small variant on CUDA (a few minutes);
# `short` the GPU tests, the study's size sequential and streaming, the face models and the adversarial
# defacing method (one short lease); `full` runs the GPU tests and the study-size benchmarks; `render` the GPU tests, the gallery and the study. Each step has its own time limit and a
# failing step does not stop the others. JSON results and one log (gpu.log) go to $OUT
# (or benchmarks/out).
set -u
mode=${1:-full}
dev=${DEVICE:-cuda}  # DEVICE=cpu checks the script itself on a machine without CUDA
dest=${OUT:-benchmarks/out}
mkdir -p benchmarks/out "$dest"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s)" | tee -a "$dest/gpu.log"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee -a "$dest/gpu.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$dest/gpu.log"
}
step gpu-tests 80 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests
if [ "$mode" = short ]; then  # one short lease (~8 min): study size sequential vs streaming, models, adversarial
  step study-streaming 140 python3 -m benchmarks.bench_study --device $dev --random-weights --skip-per-scan \
    --study-heads pycortex --workers "$(nproc)" --json benchmarks/out/study-streaming.json
  step study-sequential 120 python3 -m benchmarks.bench_study --device $dev --random-weights --skip-per-scan \
    --study-heads pycortex --workers 1 --json benchmarks/out/study-sequential.json
  step models 45 python3 -m benchmarks.bench_models --device $dev --random-weights facenet arcface-mbf sface \
    --repeat 2 --renders 0 --out benchmarks/out/models-gpu.json
elif [ "$mode" = render ]; then  # the renderer's gallery and the study that uses it
  step render 120 python3 -m benchmarks.bench_render --device $dev --part gallery
  step study 150 python3 -m benchmarks.bench_study --device $dev --random-weights --heads pycortex --study-heads pycortex
elif [ "$mode" = smoke ]; then
  step surface 60 python3 -m benchmarks.bench_surface --small --device $dev --part speed
  step render 90 python3 -m benchmarks.bench_render --small --device $dev --part gallery
  step recognition 90 python3 -m benchmarks.bench_recognition --small --device $dev --random-weights
  step study 90 python3 -m benchmarks.bench_study --small --device $dev --random-weights --skip-per-scan
else
  step surface 60 python3 -m benchmarks.bench_surface --device $dev --part speed
  step render 120 python3 -m benchmarks.bench_render --device $dev --part gallery
  step recognition 100 python3 -m benchmarks.bench_recognition --device $dev --random-weights --peer-fraction 0.25
  step study 150 python3 -m benchmarks.bench_study --device $dev --random-weights --heads pycortex --study-heads pycortex
  # issue 11: the study's size with the streaming executor (surfaces in $(nproc) worker processes while the
  # device renders, aligns and embeds); prints per-stage busy time and the overlap
  step study-streaming 150 python3 -m benchmarks.bench_study --device $dev --random-weights --skip-per-scan \
    --study-heads pycortex --workers "$(nproc)" --json benchmarks/out/study-streaming.json
fi
# issue 9: the adversarial defacing method on the 2 mm head (FaceNet with random weights: the only model that
# travels; stand-in face region if the templates did not travel); its per-step time is the figure
step deface-adversarial 100 python3 -m benchmarks.bench_deface_adversarial --device $dev --model facenet \
  --random-weights --steps 12 --json benchmarks/out/deface-adversarial-gpu.json
cp benchmarks/out/*.json "$dest/" 2>/dev/null
ls -la "$dest"
