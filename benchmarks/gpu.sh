#!/usr/bin/env bash
# Speed of cnc-vitl14-336 (random weights) on one GPU (made for one H200), in under 8 minutes: training images/s
# in bf16 at batch 8 and 32 with and without the feature cache, predict images/s, peak GPU memory, and the ratios
# of benchmarks/speed.py; also whether the machine holds any CLIP weights. Prints; never asserts.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run       # the same steps on the CPU with the tiny preset and tiny batches
#   bash benchmarks/gpu.sh --fetch-wheels  # here (with PyPI): wheels of the runtime packages the GPU image lacks
#
# Outputs go to "$OUT" if set, else ./gpu_out: env.txt, speed_{b8,b32,predict_fp32}.{log,json}, weights.txt,
# large_safetensors.txt, summary.txt. The GPU machine has no network: the packages its image lacks (open_clip_torch,
# ftfy, wcwidth on the 'cuda' image) travel as wheels in .whl/ (--fetch-wheels; with the device tool, carry ".whl"),
# installed to /tmp/site with --no-index; the project is installed with --no-deps (or put on PYTHONPATH), so nothing
# is downloaded there.
set -euo pipefail

MODE=gpu
case "${1:-}" in
  --dry-run | --cpu) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
START=$SECONDS
log() { echo "[gpu.sh +$((SECONDS - START))s] $*" | tee -a "$OUT/summary.txt"; }

# Runtime packages the project imports that the GPU image ('cuda', see .library/device/KINDS.md) does not hold.
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

if [[ $MODE == fetch ]]; then
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

# ---------------------------------------------------------------------------------------------- environment
: > "$OUT/summary.txt"
log "mode=$MODE python=$(command -v "$PY")"
if ! $PY -c 'import torch' 2>/dev/null; then
  log "torch is not importable by $PY; this script installs no torch (set PYTHON=...)"; exit 1
fi
if ! $PY -c 'import open_clip, ftfy, timm' 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    log "installing the wheels in .whl/ to /tmp/site (no index)"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    log "open_clip/ftfy/timm missing and no .whl/ folder; run 'bash benchmarks/gpu.sh --fetch-wheels' with PyPI"
    exit 1
  fi
fi
if ! $PY -c 'import cnc_ad' 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip_install.log" 2>&1; then
    log "pip install --no-deps -e . failed (see pip_install.log); using PYTHONPATH=src"
  fi
  $PY -c 'import cnc_ad' 2>/dev/null || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
{
  echo "date: $(date -u +%FT%TZ)"; uname -a; nproc
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY - << 'EOF'
import sys, torch, open_clip, timm, cnc_ad
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "open_clip", open_clip.__version__, "timm", timm.__version__, "cnc_ad", cnc_ad.__version__)
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---------------------------------------------------------------------------------------------- speed
if [[ $MODE == gpu ]]; then
  if ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    log "no CUDA device visible to torch; run with --dry-run for the CPU check"; exit 1
  fi
  COMMON=(--presets cnc-vitl14-336 --device cuda --amp bf16 --warmup 3)
  RUN_B8=(--batch-size 8 --images 64 --steps 20 --repeats 5)
  RUN_B32=(--batch-size 32 --images 128 --steps 10 --repeats 3)
  RUN_FP32=(--amp off --no-train --batch-size 32 --images 128 --repeats 3)
  LIMIT=150  # seconds per run at most
else
  COMMON=(--presets tiny --device cpu --amp bf16 --warmup 1)
  RUN_B8=(--batch-size 2 --images 4 --steps 2 --repeats 1)
  RUN_B32=(--batch-size 4 --images 8 --steps 2 --repeats 1)
  RUN_FP32=(--amp off --no-train --batch-size 4 --images 8 --repeats 1)
  LIMIT=120
fi
export PYTHONUNBUFFERED=1
SPEED_DEADLINE=380  # seconds from the start for setup + speed runs; the weights search takes 75 s at most: < 8 min
run_speed() {  # run_speed NAME ARGS...: one speed.py run under the time limit, its last lines into the summary
  local name=$1 status=0 limit=$((SPEED_DEADLINE - (SECONDS - START)))
  shift
  ((limit > LIMIT)) && limit=$LIMIT
  if ((limit < 20)); then
    log "speed $name skipped: the ${SPEED_DEADLINE}s budget of the speed runs is spent"
    return
  fi
  log "speed $name: benchmarks/speed.py ${COMMON[*]} $*"
  timeout "$limit" $PY benchmarks/speed.py "${COMMON[@]}" "$@" --out-json "$OUT/speed_$name.json" \
    > "$OUT/speed_$name.log" 2>&1 || status=$?
  if [[ $status == 0 ]]; then
    tail -n 6 "$OUT/speed_$name.log" | tee -a "$OUT/summary.txt"
  else
    log "speed $name failed or ran past ${limit}s (exit $status); the end of its log:"
    tail -n 30 "$OUT/speed_$name.log" | tee -a "$OUT/summary.txt"
  fi
}
run_speed b8 "${RUN_B8[@]}"
run_speed b32 "${RUN_B32[@]}"
run_speed predict_fp32 "${RUN_FP32[@]}"  # inference as cnc predict / cnc eval run it today: float32, no autocast

# ---------------------------------------------------------------------------------------------- CLIP weights
SKIP=(\( -path /proc -o -path /sys -o -path /dev \) -prune -o)
{
  echo "# *.safetensors over 100 MB anywhere but /proc, /sys, /dev (50 s limit)"
  timeout 50 find / "${SKIP[@]}" -name "*.safetensors" -size +100M -print 2> /dev/null \
    | tee "$OUT/large_safetensors.txt" || true
  echo "# other weight files over 100 MB whose path mentions clip (25 s limit)"
  timeout 25 find / "${SKIP[@]}" \( -iname "*clip*.pt" -o -iname "*clip*.bin" -o -ipath "*clip*.safetensors" \) \
    -size +100M -print 2> /dev/null || true
  for dir in "${HF_HOME:-$HOME/.cache/huggingface}" "${TORCH_HOME:-$HOME/.cache/torch}" "$HOME/.cache/clip" \
    "$HOME/.cache/open_clip"; do
    echo "# cache $dir"
    if [[ -d $dir ]]; then
      du -sh "$dir" 2> /dev/null || true
      find "$dir" -maxdepth 4 2> /dev/null | head -n 50
    else
      echo "(absent)"
    fi
  done
} > "$OUT/weights.txt" 2>&1
log "large *.safetensors files found: $(wc -l < "$OUT/large_safetensors.txt") (weights.txt lists them and the caches)"
log "done in $((SECONDS - START)) s; outputs in $OUT"
