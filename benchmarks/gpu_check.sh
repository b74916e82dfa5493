#!/usr/bin/env bash
# The GPU check of docs/cost.md, as one script: on an SD1.5-shaped pipeline with random weights (512 px,
# 20 DDIM steps, fp16, LoRA r4), one B²-DiffuRL stage (8 prompts x 5 branches, interval 14) against one TRL
# DDPO epoch and plain diffusers at the same image count, then the speed options (interval-step stacking,
# SDPA, channels-last), then torch.compile if time is left, then an SDXL-shaped pipeline (1024 px, random
# weights): one B² stage against plain diffusers SDXL sampling, then an SD3.5-Medium-shaped one (1024 px, random
# weights, T5 included, bf16, fewer images and steps): one B² stage against plain diffusers SD3 sampling, then a
# FLUX.1-dev-shaped one (512 px, random weights, T5 included, bf16, guidance 3.5, one row per image) and a
# Qwen-Image-shaped one (512 px, random weights built in bf16, 57.7 GB with its 8.3 B text encoder; true CFG): one B²
# stage each against the family's plain diffusers sampling. Results are JSON under $OUT. All steps together take
# longer than one lent GPU's budget: GPU_CHECK_STEPS="sdxl flux" runs only the steps named.
#
# Prepare once, on a machine with network access, in the repository root (the GPU machine has torch,
# transformers, accelerate and peft, but not diffusers, trl or datasets):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl trl==0.23.1 diffusers==0.42.1 datasets==5.2.0 dill multiprocess importlib_metadata
#
# then run `bash benchmarks/gpu_check.sh` there with .whl alongside (about 13 minutes; each step has its own
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
# SD3.5 Medium at 1024 px: 8 images (2 prompts x 4 branches), 8 steps, interval 4, so that two builds of its
# 7.9 B random weights (T5 included) and the measurements fit the step's limit; bf16, the model's own precision
SD3_SIZE=(--num-steps 8 --interval 4 --prompts 2 --branches 4 --train-batch-size 2 --timesteps-per-forward 1
  --plain-batch-size 8 --mixed-precision bf16)
# FLUX.1-dev at 512 px (Flow-GRPO's training size): its 16.9 B random weights (11.9 B transformer, T5 included)
# are built twice as well; 8 images, 6 steps (Flow-GRPO's), interval 3; bf16 (FLUX gives no valid images in fp16)
FLUX_SIZE=(--resolution 512 --num-steps 6 --interval 3 --prompts 2 --branches 4 --train-batch-size 2
  --timesteps-per-forward 1 --plain-batch-size 8 --mixed-precision bf16)
# Qwen-Image at 512 px: 8 images, 8 steps, interval 4, one sample per training call (two calls with true CFG), so
# that the 28.8 B weights (57.7 GB in bf16) and the activations of LoRA training fit an 80 GB GPU
QWEN_SIZE=(--num-steps 8 --interval 4 --prompts 2 --branches 4 --train-batch-size 1 --timesteps-per-forward 1
  --plain-batch-size 4 --mixed-precision bf16 --resolution 512 --guidance-scale 4)
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  SIZE=(--tiny-width --resolution 64 --num-steps 4 --interval 2 --prompts 2 --branches 3 --train-batch-size 2)
  SD3_SIZE=()
  FLUX_SIZE=()
  QWEN_SIZE=()
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
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    return 0  # not among the steps asked for
  fi
  start=$(date +%s)
  echo "=== $name (limit ${limit} s): cost.py $*" >> "$LOG"
  timeout "$limit" $PY benchmarks/cost.py "${SIZE[@]}" "$@" --out "$OUT/$name.json" >> "$LOG" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit\": $limit}" \
    | tee -a "$OUT/steps.jsonl"
  # the step's table (or its error) in the command's output, too
  sed -n "/=== $name /,\$p" "$LOG" | grep -v '^measuring' | tail -45
}

step cost 180 --sd15-random --methods b2 ddpo plain
step optimisations 100 --sd15-random --methods --optimisations stacking sdpa channels_last --opt-repeats 2
step compile 100 --sd15-random --methods --optimisations compile --opt-repeats 2 --compile-kwargs "$COMPILE"
step sdxl 170 --sdxl-random --methods b2 plain
step sd3 100 --sd3-random --methods b2 plain "${SD3_SIZE[@]}"
step flux 200 --flux-random --methods b2 plain "${FLUX_SIZE[@]}"
step qwenimage 240 --qwenimage-random --methods b2 plain "${QWEN_SIZE[@]}"
echo "done; results in $OUT"
