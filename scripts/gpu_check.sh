#!/usr/bin/env bash
# One-shot GPU check of moe-cl, for a lent GPU machine that has no network.
#
# What it does (every result lands under $OUT, default ./gpu_out):
#   1. makes Avalanche importable: when python3 lacks it, installs the wheels carried in .whl/
#      into /tmp/site; packages Avalanche imports but this run never uses (wandb, qpsolvers)
#      get import-only stand-ins when they are absent (keeps .whl small: see below).
#   2. gpu_train.json: `python -m moe_cl.bench --only gpu`: 20 epochs of paper_fmnist through
#      MoEStrategy's fast path (whole training set resident on the GPU), its test accuracy, then
#      one epoch of paper_cifar100 (synthetic CIFAR-shaped tensors when the real files are
#      absent). Wall times, per-epoch times, samples/s, peak CUDA memory.
#   3. bench_quick.json: `python -m moe_cl.bench --quick`: the side-by-side sections (all but
#      gpu: bank, layers, ls, epoch, topk, memory) on the GPU. Skip with GPU_CHECK_BENCH=0.
#   Logs: *.log, env.txt, nvidia-smi.txt.
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
#   Optional, real Fashion-MNIST (30 MB; without it the run uses synthetic tensors):
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .fmnist/
#
# Neither folder may be committed: add `.whl/` and `.fmnist/` to .gitignore, then run on the
# lent machine with carry [".whl", ".fmnist"] (26 MB + 30 MB of the 64 MiB limit) and a
# timeout_s of about 600 (steps 2 and 3 stop themselves after 300 s and 240 s):
#   bash scripts/gpu_check.sh                      (expected 2-5 minutes once the machine is up)
# Rehearse here on the CPU (tiny sizes, device cpu, the installed environment):
#   bash scripts/gpu_check.sh --cpu-test
# Environment: OUT (results folder), PYTHON (interpreter, default python3 or .venv/bin/python
# in --cpu-test), GPU_CHECK_BENCH=0 (skip step 3), GPU_EPOCHS (default 20).

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=gpu
if [[ "${1:-}" == "--cpu-test" ]]; then
  MODE=cpu
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--cpu-test]" >&2
  exit 2
fi

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ $MODE == cpu && -z "${PYTHON:-}" && -x .venv/bin/python ]]; then
  PYTHON=.venv/bin/python
fi
read -r -a PY <<<"${PYTHON:-python3}"
DATA_ROOT=${DATA_ROOT:-/tmp/moe_cl_data}
SITE=/tmp/site
STUBS=/tmp/moe_cl_import_stubs

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

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
    2>&1 | tee -a "$OUT/pip.log" | tail -n 5
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

{
  echo "mode: $MODE"
  echo "python: ${PY[*]}"
  "${PY[@]}" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "${PY[@]}" -c "import avalanche; print('avalanche', avalanche.__version__)"
  echo "PYTHONPATH=$PYTHONPATH"
  echo "MOE_CL_DEBIAN_FMNIST=${MOE_CL_DEBIAN_FMNIST:-}"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

if [[ $MODE == gpu ]]; then
  DEVICE=(--device cuda)
  SIZE=()
  QUICK=(--quick)
  TRAIN_LIMIT=300
  BENCH_LIMIT=240
else
  DEVICE=(--device cpu)
  SIZE=(--tiny)
  QUICK=(--tiny)
  TRAIN_LIMIT=300
  BENCH_LIMIT=300
fi

# -- 2. paper-length training run -------------------------------------------------------------
status=0
log "step 2: paper_fmnist ${GPU_EPOCHS:-20} epochs + paper_cifar100 1 epoch"
timeout "$TRAIN_LIMIT" "${PY[@]}" -m moe_cl.bench --only gpu "${DEVICE[@]}" "${SIZE[@]}" \
  --gpu-epochs "${GPU_EPOCHS:-$([[ $MODE == gpu ]] && echo 20 || echo 1)}" \
  --data-root "$DATA_ROOT" --json "$OUT/gpu_train.json" 2>&1 | tee "$OUT/gpu_train.log"
rc=${PIPESTATUS[0]}
log "step 2 exit status $rc"
[[ $rc -ne 0 ]] && status=$rc

# -- 3. side-by-side sections on this device --------------------------------------------------
if [[ "${GPU_CHECK_BENCH:-1}" != 0 ]]; then
  log "step 3: python -m moe_cl.bench ${QUICK[*]} ${DEVICE[*]}"
  timeout "$BENCH_LIMIT" "${PY[@]}" -m moe_cl.bench "${QUICK[@]}" "${DEVICE[@]}" \
    --data-root "$DATA_ROOT" --json "$OUT/bench_quick.json" 2>&1 | tee "$OUT/bench_quick.log"
  rc=${PIPESTATUS[0]}
  log "step 3 exit status $rc"
  [[ $rc -ne 0 ]] && status=$rc
fi

log "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$status"
