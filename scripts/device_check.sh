#!/usr/bin/env bash
# The prepared GPU check: one call of the device tool (a single H200 lent for 15 minutes in all, 10 per command).
#
#   bash scripts/device_check.sh pack     # here, first: the cached stage-0 models and tiny backbones -> .carry/
#   # then, through the device tool:  run(command="bash scripts/device_check.sh", carry=[".carry"], timeout_s=570)
#
# On the device, in order, each part under its own time limit so a slow part cannot eat the next:
#   1. versions and nvidia-smi                                   -> $OUT/env.txt
#   2. benchmarks/bench_device.py (SmolLM2-135M shape, LoRA, bf16;
#      the tiny preset): tokens/s, peak memory, MFU              -> $OUT/bench_device.json, bench_device.log
#   3. the sweep lines PLAN/ONLY name, WORKERS at once on the GPU,
#      until SWEEP_S seconds; finished runs write results/*.json -> $OUT/results.tgz, $OUT/sweep-logs.tgz
# Every figure comes back in $OUT (8 files at most), and nothing else survives the call. Defaults below;
# override with environment variables on the command line, e.g. "ONLY='s47-pccot-4800-s[12]$' bash ..."
# (ONLY empty, the default: no sweep; BENCH_ARGS=--quick: the benchmark's CPU smoke size).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "pack" ]; then
    src="${KAVA_LAB_CACHE:-$HOME/.cache/kava_lab}"
    rm -rf .carry && mkdir -p .carry/cache
    for d in "$src"/stage0-*/model; do
        name=$(basename "$(dirname "$d")")
        mkdir -p ".carry/cache/$name" && cp -r "$d" ".carry/cache/$name/model"
    done
    for d in "$src"/tiny-*; do [ -f "$d/config.json" ] && cp -r "$d" .carry/cache/; done
    du -sh .carry && ls .carry/cache
    exit 0
fi

OUT="${OUT:-/tmp/device-out}"
PLAN="${PLAN:-sweeps/shuffled-4-7.txt}"
ONLY="${ONLY:-}"               # a regular expression over the plan's run names; empty: no sweep
WORKERS="${WORKERS:-6}"
BENCH_S="${BENCH_S:-150}"
SWEEP_S="${SWEEP_S:-330}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KAVA_LAB_CACHE="$PWD/.carry/cache" TOKENIZERS_PARALLELISM=false
[ -d .carry/cache ] || echo "no .carry/cache: stage 0 would be rebuilt on the device (bash scripts/device_check.sh pack)"

{ date -u; nvidia-smi 2>&1 | head -15
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate',
accelerate.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout "$BENCH_S" python3 benchmarks/bench_device.py ${BENCH_ARGS:-} --json "$OUT/bench_device.json" 2>&1 \
    | grep -v -e Warning -e warnings.warn -e "Writing model" -e "Loading weights" | tee "$OUT/bench_device.log"

[ -n "$ONLY" ] || { echo "ONLY is empty: no sweep"; exit 0; }
start=$(date +%s)
timeout "$SWEEP_S" python3 scripts/sweep.py "$PLAN" --only "$ONLY" --workers "$WORKERS" --threads "${THREADS:-2}" 2>&1 \
    | tee "$OUT/sweep.log"
echo "sweep: $(( $(date +%s) - start )) s"
find results -name '*.json' -newermt "@$start" -print0 | tar czf "$OUT/results.tgz" --null -T -
tar czf "$OUT/sweep-logs.tgz" runs/sweep-logs 2>/dev/null
tar tzf "$OUT/results.tgz"
