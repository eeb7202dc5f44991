#!/usr/bin/env bash
# One-shot GPU check of moe-cl, for a lent GPU machine that has no network. Everything it
# measures lands in ONE file, $OUT/gpu_check.json (default OUT=./gpu_out), logs beside it.
#
# What it does, each step with its own time limit and all of them within GPU_CHECK_BUDGET_S
# (default 570 s from the start; a step that would not fit is recorded as skipped):
#   1. environment: when python3 lacks Avalanche, installs the wheels carried in .whl/ into
#      /tmp/site; wandb and qpsolvers (imported by Avalanche, unused here) get import-only
#      stand-ins when absent (keeps .whl small: see below).
#   2. paper_fmnist, the paper's full setting (20 epochs, batch 512, M = 5, attentive + L_s),
#      end to end through `python -m moe_cl.run` (imports, data, training, evaluation): the
#      target is < 30 s on an H200. Needs the carried .fmnist/ (real Fashion-MNIST).
#   3. `python -m moe_cl.bench --only gpu` in each variant fp32, tf32, bf16, fp32+compile:
#      paper_fmnist (3 epochs) and the CIFAR-100 mixture (M = 20, 2 epochs of 50,000 synthetic
#      CIFAR-shaped samples, or the real ones if present), per-epoch times, samples/s, peak CUDA
#      memory; the target bf16 >= 1.5x fp32 on the CIFAR-100 mixture (its test error must match
#      within 0.5 points too, which needs full-length runs: not measured here).
#   4. split_fmnist with the paper's mixture (strategy=attentive_ls: 5 experiences, batch 128,
#      growth) end to end with train.precision=fp32, tf32, bf16 and with train.compile=true.
#   5. split_fmnist with its default strategy=routed (the routed mixture), fp32.
#   6. step 2's run through torchrun (one run data-parallel, moe_cl.training.ranks) on 1 rank
#      and, when the machine has 2 GPUs or more, on 2 ranks (NCCL, SyncBatchNorm).
#   7. only with GPU_CHECK_BENCH=1: `python -m moe_cl.bench --quick` on the GPU (all sections
#      but gpu; about 4 minutes, outside the budget above: give the machine more time).
#
# Preparing the carried folders, on a machine with network, from the repository root
# (Python 3.12 wheels for the GPU machine's python3; versions are the ones tested here):
#
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#     --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 \
#     avalanche-lib==0.6.0 absl-py==2.5.1 beautifulsoup4==4.15.0 certifi cycler==0.12.1 \
#     dill==0.4.1 fonttools==4.68.0 gdown==6.5.1 idna kiwisolver==1.5.1 \
#     lightning-utilities==0.15.3 matplotlib==3.11.2 packaging protobuf==7.36.2 \
#     psutil==7.2.2 pyparsing==3.3.3 python-dateutil==4.0.0 pytorchcv==0.0.74 requests \
#     tensorboard==2.21.0 torchmetrics==1.9.0 tqdm urllib3
#   python3 -m pip wheel --no-deps gputil==1.4.0 -w .whl     # published as an sdist only
#
#   That is every package `import avalanche.training` (and the modules moe_cl imports) needs
#   beyond torch, torchvision, numpy and pillow, found by importing in an interpreter that had
#   only those (about 26 MB). wandb (20 MB, plus opentelemetry and pydantic) and qpsolvers
#   (which needs scipy, 35 MB) are left out on purpose: see step 1.
#
#   Real Fashion-MNIST (30 MB; steps 2, 4 and 5 need it, step 3 falls back to synthetic data):
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .fmnist/
#
# Neither folder may be committed (.gitignore has them); run on the lent machine with carry
# [".whl", ".fmnist"] (26 MB + 30 MB of the 64 MiB limit) and a timeout_s of about 600:
#   bash scripts/gpu_check.sh
# Rehearse here on the CPU (tiny sizes, device cpu, fp32 and bf16 only, no compile):
#   bash scripts/gpu_check.sh --cpu-test
# Environment: OUT (results folder), PYTHON (interpreter, default python3, or .venv/bin/python
# in --cpu-test), GPU_CHECK_BUDGET_S (default 570; 900 in --cpu-test), GPU_CHECK_BENCH=1
# (step 7), DATA_ROOT (where data sets are prepared, default /tmp/moe_cl_data).

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)

MODE=gpu
if [[ "${1:-}" == "--cpu-test" ]]; then
  MODE=cpu
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--cpu-test]" >&2
  exit 2
fi

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
STEPS=$LOGS/steps.tsv  # name, exit status, seconds, log file, output folder or JSON
: >"$STEPS"
if [[ $MODE == cpu && -z "${PYTHON:-}" && -x .venv/bin/python ]]; then
  PYTHON=.venv/bin/python
fi
read -r -a PY <<<"${PYTHON:-python3}"
DATA_ROOT=${DATA_ROOT:-/tmp/moe_cl_data}
BUDGET=${GPU_CHECK_BUDGET_S:-$([[ $MODE == gpu ]] && echo 570 || echo 900)}
LIMIT_SCALE=$([[ $MODE == gpu ]] && echo 1 || echo 3)  # a shared CPU is slow to even start
SITE=/tmp/site
STUBS=/tmp/moe_cl_import_stubs

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOGS/gpu_check.log"; }

# step NAME LIMIT_S RESULT COMMAND...: run COMMAND (its output to logs/NAME.log) within
# min(LIMIT_S, what is left of the budget); RESULT names its run folder or JSON file.
step() {
  local name=$1 limit=$2 result=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 20)); then
    log "$name: skipped, ${left} s left of the ${BUDGET} s budget"
    printf '%s\tskipped\t0\t\t%s\n' "$name" "$result" >>"$STEPS"
    return
  fi
  limit=$((limit * LIMIT_SCALE))
  ((limit > left)) && limit=$left
  log "$name (limit ${limit} s): $*"
  local began rc seconds
  began=$(date +%s%N)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  seconds=$(awk "BEGIN { printf \"%.2f\", ($(date +%s%N) - $began) / 1e9 }")
  log "$name: exit status $rc after ${seconds} s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$LOGS/$name.log" "$result" >>"$STEPS"
}

# -- 1. environment ---------------------------------------------------------------------------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "${PY[@]}" -c "import avalanche" >/dev/null 2>&1; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    log "avalanche is not importable and .whl/ holds no wheels: see the top of this script"
    exit 1
  fi
  log "installing ${#wheels[@]} wheels from .whl/ into $SITE"
  "${PY[@]}" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" \
    >"$LOGS/pip.log" 2>&1
  tail -n 5 "$LOGS/pip.log"
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

# Avalanche imports wandb (confusion-matrix logging) and qpsolvers (GEM) at import time; this
# run uses neither. Where they are missing, a stand-in that fails loudly on any use is enough.
for module in wandb qpsolvers; do
  if ! "${PY[@]}" -c "import $module" >/dev/null 2>&1; then
    mkdir -p "$STUBS/$module"
    cat >"$STUBS/$module/__init__.py" <<EOF
"""Import-only stand-in for $module, written by scripts/gpu_check.sh (not installed here)."""


def __getattr__(name):
    raise ImportError("$module is not installed on this machine (import-only stand-in)")
EOF
    log "$module missing: using an import-only stand-in"
    STUB_USED=1
  fi
done
if [[ -n "${STUB_USED:-}" ]]; then
  export PYTHONPATH="$PYTHONPATH:$STUBS"
fi

if [[ -d .fmnist ]]; then
  export MOE_CL_DEBIAN_FMNIST="$ROOT/.fmnist"  # make_benchmark decompresses them into DATA_ROOT
fi
command -v nvidia-smi >/dev/null && nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
GPUS=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0)

if [[ $MODE == gpu ]]; then
  DEVICE=cuda
  PAPER=()                                       # the paper's full setting
  SPLIT=()
  BENCH_SIZE=(--gpu-epochs 3 --gpu-cifar-epochs 2)
  VARIANTS=(fp32 tf32 bf16 fp32+compile)
  SPLIT_SETTINGS=("train.precision=fp32" "train.precision=tf32" "train.precision=bf16"
                  "train.compile=true")
  QUICK=(--quick)
else
  DEVICE=cpu
  PAPER=(data.max_train_samples=1024 data.max_test_samples=512 train.epochs=1)
  SPLIT=(data.max_train_samples=1000 data.max_test_samples=500 train.epochs=1)
  BENCH_SIZE=(--tiny --gpu-epochs 2 --gpu-cifar-epochs 2)
  VARIANTS=(fp32 bf16)                           # tf32 is CUDA's; compile takes minutes here
  SPLIT_SETTINGS=("train.precision=fp32" "train.precision=bf16")
  QUICK=(--tiny)
fi
RUN_SETTINGS=("device=$DEVICE" "data.root=$DATA_ROOT" logging.interactive=false
              logging.tensorboard=false logging.figures=false)
RUN=("${PY[@]}" -m moe_cl.run "${RUN_SETTINGS[@]}")

# -- 2. paper_fmnist end to end ---------------------------------------------------------------
step paper_fmnist 120 "$OUT/runs/paper_fmnist" \
  "${RUN[@]}" benchmark=paper_fmnist strategy=attentive_ls "${PAPER[@]}" \
  "out_dir=$OUT/runs/paper_fmnist"

# -- 3. precision and compilation, per epoch --------------------------------------------------
step bench_gpu 240 "$OUT/logs/bench_gpu.json" \
  "${PY[@]}" -m moe_cl.bench --only gpu --device "$DEVICE" "${BENCH_SIZE[@]}" \
  --gpu-variants "${VARIANTS[@]}" --data-root "$DATA_ROOT" --json "$OUT/logs/bench_gpu.json"

# -- 4. split_fmnist end to end in each precision ---------------------------------------------
for setting in "${SPLIT_SETTINGS[@]}"; do
  name=split_fmnist_${setting#train.}
  name=${name//=/_}
  limit=$([[ $setting == *compile* ]] && echo 150 || echo 75)
  step "$name" "$limit" "$OUT/runs/$name" \
    "${RUN[@]}" benchmark=split_fmnist strategy=attentive_ls "${SPLIT[@]}" "$setting" \
    "out_dir=$OUT/runs/$name"
done

# -- 5. the routed mixture --------------------------------------------------------------------
step split_fmnist_routed 120 "$OUT/runs/split_fmnist_routed" \
  "${RUN[@]}" benchmark=split_fmnist strategy=routed "${SPLIT[@]}" \
  "out_dir=$OUT/runs/split_fmnist_routed"

# -- 6. one run on several GPUs (torchrun) ----------------------------------------------------
# paper_fmnist as in step 2 (the same global batch) through torchrun on 1 rank and, with 2 GPUs
# or more, on 2 ranks (NCCL, SyncBatchNorm); on a 1-GPU machine the 1-rank run still checks the
# torchrun path on CUDA. --cpu-test: 1 and 2 ranks on gloo. Compare each run's results.json
# (wall_time_s, average_accuracy) with step 2's (docs/scaling.md: what is exact under DDP).
DDP_RANKS=(1 2)
if [[ $MODE == gpu ]] && ((GPUS < 2)); then
  DDP_RANKS=(1)
  log "DDP on 2 ranks: skipped ($GPUS GPU(s))"
fi
for ranks in "${DDP_RANKS[@]}"; do
  step "paper_fmnist_ddp_$ranks" 120 "$OUT/runs/paper_fmnist_ddp_$ranks" \
    env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
    "${PY[@]}" -m torch.distributed.run --standalone --nproc_per_node "$ranks" \
    -m moe_cl.run "${RUN_SETTINGS[@]}" benchmark=paper_fmnist strategy=attentive_ls \
    "${PAPER[@]}" "out_dir=$OUT/runs/paper_fmnist_ddp_$ranks"
done

# -- 7. the side-by-side sections on this device (opt-in) -------------------------------------
if [[ "${GPU_CHECK_BENCH:-0}" == 1 ]]; then
  BUDGET=$((BUDGET + 300))
  step bench_quick 300 "$OUT/logs/bench_quick.json" \
    "${PY[@]}" -m moe_cl.bench "${QUICK[@]}" --device "$DEVICE" --data-root "$DATA_ROOT" \
    --json "$OUT/logs/bench_quick.json"
fi

# -- the one JSON -----------------------------------------------------------------------------
find "$OUT/runs" -name checkpoint.pt -delete 2>/dev/null  # results.json holds what counts
"${PY[@]}" - "$STEPS" "$OUT/gpu_check.json" "$MODE" "$GPUS" <<'EOF'
"""Gathers the steps' records, the runs' results.json and the bench's JSON into one file."""
import json
import platform
import sys
from pathlib import Path

steps_file, out_file, mode, gpus = sys.argv[1:5]
report = {"mode": mode, "gpus": int(gpus), "python": platform.python_version(), "steps": {},
          "targets": []}
try:
    import torch

    report["torch"] = torch.__version__
    report["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        report["device_name"] = torch.cuda.get_device_name(0)
except ImportError as err:
    report["torch"] = f"not importable: {err}"
for line in Path(steps_file).read_text().splitlines():
    name, status, seconds, log, result = line.split("\t")
    record = {"status": status, "seconds": float(seconds), "log": log}
    result = Path(result) if result else None
    if result is not None and result.suffix == ".json" and result.is_file():
        record["bench"] = json.loads(result.read_text())
    elif result is not None and (result / "results.json").is_file():
        results = json.loads((result / "results.json").read_text())
        record["results"] = {key: results.get(key) for key in (
            "status", "wall_time_s", "device", "average_accuracy", "train_error",
            "train_error_reference", "H_s", "H_u", "MI", "num_experts")}
        record["results"]["train"] = results.get("config", {}).get("train")
    report["steps"][name] = record
paper = report["steps"].get("paper_fmnist", {})
if mode == "gpu" and paper.get("status") == "0":
    report["targets"].append({"target": "paper_fmnist 20 epochs end to end (s)",
                              "value": paper["seconds"], "threshold": 30, "kind": "<",
                              "met": paper["seconds"] < 30})
bench = report["steps"].get("bench_gpu", {}).get("bench", {})
report["targets"] += bench.get("sections", {}).get("gpu", {}).get("targets", [])
Path(out_file).write_text(json.dumps(report, indent=1))
failed = [name for name, record in report["steps"].items() if record["status"] != "0"]
print(f"{out_file}: {len(report['steps'])} steps, failed or skipped: {failed or 'none'}")
for item in report["targets"]:
    print(f"  target {item['target']}: {item['value']:.3g} (want {item['kind']} "
          f"{item['threshold']}) {'met' if item['met'] else 'NOT MET'}")
sys.exit(1 if failed else 0)
EOF
