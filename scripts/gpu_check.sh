#!/usr/bin/env bash
# The prepared check for a CUDA machine (about 5-6 minutes on an H200 once .venv exists; a bare machine first pays
# for scripts/setup.sh, which downloads torch's CUDA wheels):
#   1. the device: nvidia-smi -L, torch sees CUDA (else stop: a CPU build of torch is installed), label-efficient doctor
#   2. the device-dependent tests on CUDA: pytest -m cuda (tests/test_cuda.py and every test marked cuda), then the
#      precision and provenance tests as they are on this host
#   3. a short BCP run on ACDC (recipes/acdc_bcp.yaml at 256², precision auto, 200 + 400 steps) and what it measured:
#      it/s per stage (steps / stage seconds, validation included), the precision used, peak GPU memory
#      (torch.cuda.max_memory_allocated, from metrics.json's provenance), Dice of the selected and last checkpoints
#
#   bash scripts/gpu_check.sh                       # run it
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh       # print the commands; run only what is safe without a GPU
#                                                   # (data lookup, the BCP recipe parsed with its overrides)
#   GPU_CHECK_SUMMARY=<run folder> bash scripts/gpu_check.sh   # only print the summary of a finished run
# Settings (environment): GPU_CHECK_OUT (run folder; default $OUT/gpu_check when $OUT is set, else
# outputs/gpu_check), GPU_CHECK_PRE / GPU_CHECK_SELF (steps of the two BCP stages), GPU_CHECK_VAL_EVERY,
# GPU_CHECK_WORKERS (data-loader workers), LABEL_EFFICIENT_DATA (else ../shared/data or shared/data).
# Nothing is downloaded at run time; setup.sh needs the package registry only.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_CHECK_DRY:-0}
PRE=${GPU_CHECK_PRE:-200}
SELF=${GPU_CHECK_SELF:-400}
VAL_EVERY=${GPU_CHECK_VAL_EVERY:-100}
WORKERS=${GPU_CHECK_WORKERS:-2}
RUN=${GPU_CHECK_OUT:-${OUT:+$OUT/gpu_check}}
RUN=${RUN:-outputs/gpu_check}
PY=.venv/bin/python
T0=$(date +%s)

phase() { echo; echo "=== $1  (+$(( $(date +%s) - T0 )) s)"; }
run() {  # print a command, then run it (not in a dry run)
  echo "+ $*"
  if [ "$DRY" != 1 ]; then "$@"; fi
}

summary() {  # what the BCP run measured, from its metrics.json
  "$PY" - "$1" <<'PYEOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
m = json.loads((run / "metrics.json").read_text())
p = m.get("provenance") or {}
dev = p.get("device") or {}
print(f"run: {run}")
print(f"device: {dev.get('name') or dev.get('type')}  precision: {p.get('precision')} "
      f"(requested {p.get('precision_requested')})  torch {p.get('versions', {}).get('torch')}  "
      f"test evaluated on: {p.get('evaluated_on')}")
for s in m["stages"]:
    its = s["steps"] / s["seconds"] if s.get("seconds") else float("nan")
    print(f"stage {s['stage']} ({s['strategy']}): {s['steps']} steps in {s['seconds']:.1f} s = {its:.2f} it/s "
          f"(validation included); selected {s['best']} (val score {s['best_score']})")
print(f"train seconds {m['train_seconds']:.1f}, wall seconds {p.get('wall_seconds')}")
print(f"peak GPU memory allocated {p.get('peak_cuda_allocated_mb')} MB (reserved {p.get('peak_cuda_reserved_mb')} MB), "
      f"peak RSS {p.get('peak_rss_mb')} MB")
last = m.get("last_checkpoint") or {}
print(f"test Dice {m['mean_dice']:.4f} HD95 {m.get('mean_hd95', float('nan')):.2f} (selected checkpoint); "
      f"last.ckpt Dice {last.get('mean_dice')} HD95 {last.get('mean_hd95')}")
PYEOF
}

if [ -n "${GPU_CHECK_SUMMARY:-}" ]; then
  summary "$GPU_CHECK_SUMMARY"
  exit 0
fi

phase "data"
DATA=""
for d in "${LABEL_EFFICIENT_DATA:-}" ../shared/data shared/data; do
  if [ -n "$d" ] && [ -f "$d/acdc/split.csv" ]; then DATA=$(cd "$d" && pwd); break; fi
done
if [ -z "$DATA" ]; then
  echo "no ACDC data: set LABEL_EFFICIENT_DATA, or put it at ../shared/data/acdc or shared/data/acdc" >&2
  exit 2
fi
export LABEL_EFFICIENT_DATA=$DATA
echo "LABEL_EFFICIENT_DATA=$DATA"

phase "setup"
if [ -x "$PY" ]; then
  echo ".venv exists: installing nothing"
else
  run bash scripts/setup.sh
fi

phase "device"
run nvidia-smi -L
run "$PY" -c "
import sys, torch
print('torch', torch.__version__, 'CUDA build', torch.version.cuda, 'available', torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit('torch sees no CUDA GPU (a CPU build of torch, or no driver): nothing below would use the GPU')
print('GPU', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0),
      'bf16', torch.cuda.is_bf16_supported())"
run .venv/bin/label-efficient doctor

phase "tests on CUDA"
run timeout 240 env OMP_NUM_THREADS=4 "$PY" -m pytest -q -rs -m cuda tests/
run timeout 120 env OMP_NUM_THREADS=4 "$PY" -m pytest -q -rs tests/test_precision.py tests/test_provenance.py

phase "BCP on ACDC at 256², precision auto"
SETS=(--set "data.image_size=[256,256]" --set "data.num_workers=$WORKERS" --set "trainer.precision=auto"
      --set "stages.0.steps=$PRE" --set "stages.0.val_every=$VAL_EVERY"
      --set "stages.1.steps=$SELF" --set "stages.1.val_every=$VAL_EVERY")
# the recipe with its overrides, parsed here (no GPU needed): a typo stops the check before any device time
"$PY" -c "
import sys
from label_efficient.recipe import load_recipe
sets = [a for a in sys.argv[1:] if a != '--set']
r = load_recipe('recipes/acdc_bcp.yaml', sets)
print('recipe ok:', r.data.image_size, [(s.strategy, s.steps, s.val_every) for s in r.stages], r.trainer.precision)
" "${SETS[@]}"
if [ "$DRY" != 1 ] && [ -e "$RUN" ]; then
  echo "$RUN exists: removing it (a fresh timing)"
  rm -rf "$RUN"
fi
run timeout 420 env OMP_NUM_THREADS=8 .venv/bin/label-efficient run recipes/acdc_bcp.yaml --out "$RUN" "${SETS[@]}"

phase "summary"
if [ "$DRY" = 1 ]; then
  echo "+ summary $RUN   (dry run: GPU_CHECK_SUMMARY=<a run folder> prints one)"
else
  summary "$RUN"
fi
phase "done"
