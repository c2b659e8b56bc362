#!/usr/bin/env bash
# The whole benchmark matrix of benchmarks/README.md in one command, on the machine it measures:
#
#   bash benchmarks/matrix.sh RESULT.json [ENGINE_DIR]
#
#   1. export random:base + random:refiner (full size, fp32 reference files) to ENGINE_DIR unless it holds one
#   2. `sdxl-trt optimize` (fused fp16 files for ort-cuda; components in parallel)
#   3. `sdxl-trt bench`: every sweep, sdxl-trt on ort-cuda and diffusers eager side by side in one process, FLOP/s
#      from results/unet-flops.json, cold start
#   4. `sdxl-trt bench --resume` again with diffusers' UNet as a torch CUDA graph and torch.compile on the batch
#      sweep (their setup per shape — capture, compilation — is long; compile's time is recorded)
#   5. charts and the Markdown table (benchmarks/charts.py) if matplotlib is installed
#
# Environment: PY (the Python with sdxl-trt importable, default python), GIT (the commit, where the tree has no .git),
# BACKEND (default ort-cuda), SWEEPS (default all), RUNS / WARMUP (default 5 / 1), CONTENDERS (step 3, default
# diffusers-eager), EXTRA_CONTENDERS (step 4, default "diffusers-cudagraph diffusers-compile"; empty skips the step),
# COMPILE_LIMIT (s, default 600).
# Every step can be re-run: export is skipped when the directory exists, optimize skips what is up to date and
# `--resume` keeps the cases RESULT.json already holds, so a matrix cut short (device time) is finished by running
# the same command again.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,22p "$0"; exit 2; }
result=$1
engine=${2:-$(dirname "$result")/engine}
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python}
cli() { "$PY" -m sdxl_trt.runtime.cli "$@"; }
git_args=(); [ -n "${GIT:-}" ] && git_args=(--git "$GIT")
t0=$(date +%s)
say() { echo "[matrix $(( $(date +%s) - t0 ))s] $*"; }

if [ ! -f "$engine/manifest.json" ]; then
  say "export random:base + random:refiner → $engine"
  cli export --model random:base --refiner random:refiner \
    --components clip_l clip_g unet unet_refiner vae_decoder --precision fp32 --out "$engine"
fi
say "optimize"
cli optimize "$engine" --jobs 5
common=(--backend "${BACKEND:-ort-cuda}" --flops "$here/results/unet-flops.json" --runs "${RUNS:-5}" --warmup "${WARMUP:-1}"
        --resume --out "$result" "${git_args[@]}")
say "bench: every sweep"
# shellcheck disable=SC2086
cli bench "$engine" --sweeps ${SWEEPS:-resolution batch steps cfg refiner throughput overhead} \
  --contenders ${CONTENDERS-diffusers-eager} --cold-start "${common[@]}"
if [ -n "${EXTRA_CONTENDERS-diffusers-cudagraph diffusers-compile}" ]; then
  say "bench: ${EXTRA_CONTENDERS-diffusers-cudagraph diffusers-compile} on the batch sweep"
  # shellcheck disable=SC2086
  cli bench "$engine" --sweeps batch --contenders ${EXTRA_CONTENDERS-diffusers-cudagraph diffusers-compile} \
    --compile-limit "${COMPILE_LIMIT:-600}" "${common[@]}"
fi
if "$PY" -c "import matplotlib" 2>/dev/null; then
  say "charts"
  "$PY" "$here/charts.py" "$result"
else
  say "no matplotlib here: run  python benchmarks/charts.py $result  where it is installed"
fi
say "done"
