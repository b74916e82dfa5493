#!/usr/bin/env bash
# The GPU check of docs/cost.md, as one script: on an SD1.5-shaped pipeline with random weights (512 px,
# 20 DDIM steps, fp16, LoRA r4), one B²-DiffuRL stage (8 prompts x 5 branches, interval 14) against one TRL
# DDPO epoch and plain diffusers at the same image count, then the speed options (interval-step stacking,
# SDPA, channels-last), then torch.compile if time is left, then an SDXL-shaped pipeline (1024 px, random
# weights): one B² stage against plain diffusers SDXL sampling. Results are JSON under $OUT.
#
# Prepare once, on a machine with network access, in the repository root (the GPU machine has torch,
# transformers, accelerate and peft, but not diffusers, trl or datasets):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl trl==0.23.1 diffusers==0.42.1 datasets==5.2.0 dill multiprocess importlib_metadata
#
# then run `bash benchmarks/gpu_check.sh` there with .whl alongside (about 10 minutes; each step has its own
# time limit, so a slow step cannot starve the others). GPU_CHECK_TINY=1 runs the same steps at a tiny
# size, to try the script on a CPU first.
set -u
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
fi

SIZE=()
COMPILE='{}'
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  SIZE=(--tiny-width --resolution 64 --num-steps 4 --interval 2 --prompts 2 --branches 3 --train-batch-size 2)
  COMPILE='{"backend": "eager"}'
fi

LOG="$OUT/run.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

step() {  # step NAME SECONDS ARGS...: one cost.py run (ARGS name the model), its JSON in $OUT/NAME.json
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit} s): cost.py $*" >> "$LOG"
  timeout "$limit" $PY benchmarks/cost.py "${SIZE[@]}" "$@" --out "$OUT/$name.json" >> "$LOG" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit\": $limit}" \
    | tee -a "$OUT/steps.jsonl"
  # the step's table (or its error) in the command's output, too
  sed -n "/=== $name /,\$p" "$LOG" | grep -v '^measuring' | tail -45
}

step cost 210 --sd15-random --methods b2 ddpo plain
step optimisations 110 --sd15-random --methods --optimisations stacking sdpa channels_last --opt-repeats 2
step compile 150 --sd15-random --methods --optimisations compile --opt-repeats 2 --compile-kwargs "$COMPILE"
step sdxl 180 --sdxl-random --methods b2 plain
echo "done; results in $OUT"
