#!/usr/bin/env bash
# One-shot GPU check of moe-cl for the lent GPU machine (the device tool's nvidia-h100-x1 or
# nvidia-h200: python3 is Python 3.12 with its own torch 2.11 + CUDA, torchvision 0.26, numpy,
# matplotlib, tensorboard, torchmetrics, tqdm, scipy, scikit-learn, ... and NO package registry).
#
#   device run: carry [".whl", ".fmnist"], timeout_s 600, command `bash scripts/gpu_check.sh`
#   here:       bash scripts/gpu_check.sh --cpu-test     (the same steps, tiny sizes, device cpu)
#
# Correctness first, then timings, each step under its own time limit; the limits add up to
# 535 s (GPU_CHECK_BUDGET_S, default 540, caps them: a step that would not fit is recorded as
# skipped), so a 600 s call ends with everything written:
#   install             the carried wheels and moe-cl (from this working tree) into $WORK/site,
#                       with --no-index --no-deps: the image's torch, torchvision and numpy stay
#                       (wheels of them in .whl/ are refused); an import-only stand-in for wandb;
#                       then what python3 imports from where, the GPU, bf16 support
#   routed_tiny         benchmark=tiny strategy=routed on CUDA (router statistics, experts per
#                       experience)
#   distilled_tiny      benchmark=tiny strategy=distilled on CUDA (distilled_copy, top-k gate)
#   ewc_resume          benchmark=tiny strategy=ewc on CUDA, killed (SIGKILL) once its first
#                       checkpoint exists, then resumed (resume=true): EWC's saved
#                       importances must land on the parameters' device
#   torchrun_tiny       torchrun --standalone --nproc_per_node=1 -m moe_cl.run benchmark=tiny
#                       strategy=attentive_ls device=cuda (NCCL for the model, gloo agreements)
#   torchrun_distilled  the same launch with paper_fmnist (BatchNorm -> SyncBatchNorm), 2,048
#                       samples, strategy=distilled: deep copies of a model holding the group
#   router_bf16         split_fmnist's routed router (random conv, 3,456 features) fitted on
#                       two experiences; its class posterior on their 4,000 test samples in
#                       fp32 against bf16 autocast with tf32 on: max |difference| (nats) and
#                       disagreements (passes under 0.01 nats)
#   paper_fmnist        the paper's setting (20 epochs, batch 512, M = 5, attentive + L_s) end
#                       to end through `python -m moe_cl.run` (target < 30 s on an H200)
#   bench_fp32,         `python -m moe_cl.bench --only gpu --gpu-variants fp32` (then bf16):
#   bench_bf16          the CIFAR-100 mixture (M = 20, 50,000 CIFAR-shaped synthetic samples,
#                       2 epochs; samples/s of epoch 2) and 1 epoch of paper_fmnist; the
#                       target bf16 >= 1.5x fp32 samples/s (its equal-test-error half needs
#                       full-length runs on real CIFAR-100: not here)
#   compile_bf16        the same with bf16+compile, last (torch.compile's first epochs are
#                       long; compared with bench_bf16)
#
# What comes back (the device returns at most 8 files, at most 2 folders down): five files
# directly under $OUT, each rewritten or appended as every step finishes, so a run cut off
# still returns what finished:
#   results.jsonl   one JSON line per step: step, rc, status (ok | failed | timeout | skipped),
#                   seconds, limit_s, and its key numbers (a run's accuracy, router_error,
#                   wall_time_s; the bench's samples/s, epoch times, peak CUDA memory, targets;
#                   the router check; the versions), the first line being the start
#   logs.txt        the last 40 lines of every step's log
#   runs.tar.gz     every step's whole log and its small outputs (each run's config.yaml,
#                   results.json and CSV logs; the bench and check JSONs), no checkpoints
#   env.txt         nvidia-smi, pip's output
#   summary.txt     at the end: each step's status and seconds, the targets
# Everything else stays under $WORK (default: a fresh /tmp/gpu_check.XXXXXX).
#
# Preparing the carried folders, here (they are .gitignored; never commit them):
#
#   rm -rf .whl && mkdir .whl
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#     --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 \
#     avalanche-lib==0.6.0 omegaconf==2.4.0 pytorchcv==0.0.74 gdown==6.5.1 \
#     beautifulsoup4==4.15.0 soupsieve==4.1.4 dill==0.4.1 qpsolvers==4.13.0 quadprog==0.1.14
#   python3 -m pip wheel --no-deps -w .whl gputil==1.4.0   # an sdist only: a py3-none-any wheel
#
#   That is every package that `import avalanche.training` and moe_cl's imports need and the
#   image lacks (KINDS.md's list; checked by importing moe_cl's modules in a Python 3.12 venv
#   holding torch 2.11, torchvision 0.26 and the image's other packages): 10 wheels, 2.9 MB.
#   wandb (imported by Avalanche, unused here; 20 MB with its own dependencies) gets an
#   import-only stand-in instead. The versions are constraints.txt's.
#
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .fmnist/   # 30 MB
#
#   Real Fashion-MNIST: torchrun_distilled, router_bf16 and paper_fmnist need it (the machine
#   cannot download); the bench falls back to synthetic tensors without it. 33 MB in all with
#   .whl, of the 64 MiB a call carries.
#
# Environment: PYTHON (interpreter; default python3, or .venv/bin/python with --cpu-test),
# OUT (default $WORK/out), GPU_CHECK_WORK (default a fresh /tmp/gpu_check.XXXXXX),
# GPU_CHECK_BUDGET_S (default 540; 2400 with --cpu-test), DATA_ROOT (default $WORK/data).
# Exit status 0 when every step that ran passed (--cpu-test skips compile_bf16 by design).

set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
ROOT=$PWD

# -- mode, folders, settings (shared with the script's internal calls of itself) -------------
INTERNAL=
case "${1:-}" in
  "") MODE=${GPU_CHECK_MODE:-gpu} ;;
  --cpu-test) MODE=cpu ;;
  --_internal) MODE=${GPU_CHECK_MODE:?}; INTERNAL=${2:?}; shift 2 ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--cpu-test]" >&2; exit 2 ;;
esac
export GPU_CHECK_MODE=$MODE

if [[ $MODE == cpu && -z "${PYTHON:-}" && -x .venv/bin/python ]]; then
  PYTHON=$ROOT/.venv/bin/python
fi
read -r -a PY <<<"${PYTHON:-python3}"
if [[ -z $INTERNAL ]]; then
  WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
  mkdir -p "$WORK"
  WORK=$(cd "$WORK" && pwd)
  OUT=${OUT:-$WORK/out}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  export GPU_CHECK_WORK=$WORK OUT
else
  WORK=${GPU_CHECK_WORK:?}
fi
SITE=$WORK/site
STUBS=$WORK/stubs
LOGS=$WORK/logs
RUNS=$WORK/runs
DATA_ROOT=${DATA_ROOT:-$WORK/data}
mkdir -p "$SITE" "$STUBS" "$LOGS" "$RUNS" "$DATA_ROOT"
export PYTHONPATH="$SITE:$ROOT:$STUBS${PYTHONPATH:+:$PYTHONPATH}"  # SITE's moe_cl first
export PYTHONUNBUFFERED=1 MOE_CL_OFFLINE=1  # no network there: a missing data set fails at once
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ -d .fmnist ]]; then
  export MOE_CL_DEBIAN_FMNIST=$ROOT/.fmnist  # read, decompressed into DATA_ROOT
elif [[ $MODE == cpu && -d /usr/share/datasets/fashion-mnist ]]; then
  export MOE_CL_DEBIAN_FMNIST=/usr/share/datasets/fashion-mnist
fi

if [[ $MODE == gpu ]]; then
  DEVICE=cuda
  BUDGET=${GPU_CHECK_BUDGET_S:-540}
  SCALE=1
  SMALL=(data.max_train_samples=2048 data.max_test_samples=1024)  # torchrun_distilled
  PAPER=()                                                        # the paper's full setting
  ROUTER_SAMPLES=all
  BENCH=(--gpu-epochs 1 --gpu-cifar-epochs 2)
  EWC_EPOCHS=100
else
  DEVICE=cpu
  BUDGET=${GPU_CHECK_BUDGET_S:-2400}
  SCALE=4  # 2 shared cores: imports alone take seconds
  SMALL=(data.max_train_samples=512 data.max_test_samples=256)
  PAPER=(data.max_train_samples=1024 data.max_test_samples=512 train.epochs=1)
  ROUTER_SAMPLES=2000
  BENCH=(--tiny --gpu-epochs 1 --gpu-cifar-epochs 2)
  EWC_EPOCHS=60
fi
RUN_SETTINGS=("device=$DEVICE" "data.root=$DATA_ROOT" data.download=false
              logging.interactive=false logging.tensorboard=false logging.figures=false)
RUN=("${PY[@]}" -m moe_cl.run "${RUN_SETTINGS[@]}")
TORCHRUN=("${PY[@]}" -m torch.distributed.run --standalone --nproc_per_node=1)

# -- internal steps (run by `step` as `bash gpu_check.sh --_internal NAME ...`) ----------------

# The carried wheels and moe-cl into $SITE, never over the image's torch, torchvision, numpy.
internal_install() {
  local needed=(avalanche omegaconf pytorchcv gdown dill GPUtil qpsolvers quadprog bs4)
  local missing
  missing=$("${PY[@]}" - "${needed[@]}" <<'EOF'
import importlib.util
import sys

print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
  echo "python: $(command -v "${PY[0]}") $("${PY[@]}" -V 2>&1)"
  echo "missing before the install: ${missing:-none}"
  shopt -s nullglob
  local wheels=("$ROOT"/.whl/*.whl) wheel
  for wheel in "${wheels[@]}"; do
    case ${wheel##*/} in
      torch-*|torchvision-*|torchaudio-*|numpy-*|triton-*|nvidia_*)
        echo "refusing ${wheel##*/}: the image's own is used; remove it from .whl/"
        return 2 ;;
    esac
  done
  if [[ -n $missing && ${#wheels[@]} -eq 0 ]]; then
    echo "$missing missing and .whl/ holds no wheels: see the top of scripts/gpu_check.sh"
    return 3
  fi
  [[ -z $missing ]] && wheels=()  # all there (a full environment): moe-cl alone
  # moe-cl from a copy of the working tree (its build writes nothing into the checkout)
  local src=$WORK/src
  rm -rf "$src" && mkdir -p "$src"
  cp -r pyproject.toml README.md moe_cl strategies benchmarks "$src"/
  find "$src" -name __pycache__ -prune -exec rm -rf {} +
  local pip=("${PY[@]}" -m pip install --no-index --no-deps --no-compile --no-cache-dir -q
             --target "$SITE") built=0
  if ((${#wheels[@]})); then
    echo "pip install --no-index --no-deps --target $SITE: ${#wheels[@]} wheels"
    "${pip[@]}" "${wheels[@]}" || return $?
  fi
  echo "pip install --no-index --no-deps --no-build-isolation --target $SITE: moe-cl"
  # a failed build leaves the working tree's moe_cl (on PYTHONPATH after $SITE) for the steps
  "${pip[@]}" --no-build-isolation "$src" || { built=$?; echo "moe-cl not installed"; }
  # Avalanche imports wandb at import time (confusion-matrix logging), unused here
  if ! "${PY[@]}" -c "import wandb" >/dev/null 2>&1; then
    mkdir -p "$STUBS/wandb"
    cat >"$STUBS/wandb/__init__.py" <<'EOF'
"""Import-only stand-in for wandb, written by scripts/gpu_check.sh (not installed here)."""


def __getattr__(name):
    raise ImportError("wandb is not installed on this machine (import-only stand-in)")
EOF
    echo "wandb missing: an import-only stand-in in $STUBS"
  fi
  cd "$WORK" || return 1
  "${PY[@]}" - "$SITE" "$DEVICE" "$WORK/env.json" <<'EOF'
"""What python imports from where; the GPU; exit 1 if the image's torch was shadowed or CUDA
is missing where it is wanted."""
import importlib.metadata as md
import json
import platform
import sys
from pathlib import Path

site, device, out = sys.argv[1:4]
import avalanche.training  # noqa: E402,F401  (the import moe-cl needs, wandb and all)
import numpy  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import moe_cl.run.cli  # noqa: E402,F401

env = {"python": platform.python_version(), "executable": sys.executable,
       "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "torchvision": torchvision.__version__, "numpy": numpy.__version__,
       "avalanche": md.version("avalanche-lib"), "omegaconf": md.version("omegaconf"),
       "torch_from": str(Path(torch.__file__).parent),
       "moe_cl_from": str(Path(sys.modules["moe_cl"].__file__).parent),
       "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    env.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
               capability=".".join(map(str, torch.cuda.get_device_capability(0))),
               bf16=torch.cuda.is_bf16_supported())
    try:
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as err:  # noqa: BLE001  (a fact to report, not a failure)
        env["nccl"] = f"unknown: {err}"
Path(out).write_text(json.dumps(env))
print(json.dumps(env, indent=1))
shadowed = [m for m in (torch, torchvision, numpy) if m.__file__.startswith(site)]
if shadowed:
    sys.exit(f"{[m.__name__ for m in shadowed]} imported from {site}: the image's were replaced")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
EOF
  local checked=$?
  ((checked)) && return "$checked"
  return "$built"
}

# EWC on CUDA killed once its first checkpoint (end of experience 1) is written, then resumed.
internal_ewc_resume() {
  local folder=$RUNS/ewc_resume first_log=$LOGS/ewc_resume.first.log pid killed=false
  cd "$WORK" || return 1
  local command=("${RUN[@]}" benchmark=tiny strategy=ewc "train.epochs=$EWC_EPOCHS"
                 "out_dir=$folder")
  "${command[@]}" >"$first_log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [[ ! -f $folder/checkpoint.pt ]]; do sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" && killed=true
  fi
  wait "$pid"
  local first_rc=$?
  echo "first run: exit $first_rc, killed after its first checkpoint: $killed"
  tail -n 5 "$first_log"
  "${command[@]}" resume=true  # the original command, resumed
  local rc=$? at
  at=$(grep -ao 'resuming at experience [0-9]*' "$LOGS/ewc_resume.log" | head -n 1 |
       grep -o '[0-9]*$')
  printf '{"killed_after_first_checkpoint": %s, "first_rc": %s, "resume_rc": %s, ' \
    "$killed" "$first_rc" "$rc" >"$WORK/ewc_resume.json"
  printf '"resumed_at_experience": %s, "run_folder": "%s"}\n' "${at:-null}" "$folder" \
    >>"$WORK/ewc_resume.json"
  ((rc != 0)) && return "$rc"
  [[ $killed == true && -n $at ]] || { echo "the run was not interrupted and resumed"; return 1; }
}

# The routed router's class posterior in fp32 against bf16 autocast with tf32 on.
internal_router_bf16() {
  cd "$WORK" || return 1
  "${PY[@]}" - "$DEVICE" "$DATA_ROOT" "$ROUTER_SAMPLES" "$WORK/router_bf16.json" <<'EOF'
import json
import sys
from pathlib import Path

import torch

from moe_cl.data.tensors import dataset_tensors
from moe_cl.run.builders import build_benchmark, build_model, seed_everything
from moe_cl.run.config import compose

device, root, samples, out = sys.argv[1:5]
device = torch.device(device)
args = ["benchmark=split_fmnist", "strategy=routed", f"data.root={root}", "data.download=false"]
if samples != "all":
    args += [f"data.max_train_samples={samples}", f"data.max_test_samples={int(samples) // 2}"]
cfg = compose(args)
seed_everything(0)
bundle = build_benchmark(cfg)
model = build_model(cfg, bundle).to(device).eval()
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
train, test = list(bundle.benchmark.train_stream)[:2], list(bundle.benchmark.test_stream)[:2]
for experience in train:
    model.update_router(experience)
xs, ys = zip(*(dataset_tensors(e.dataset.eval())[:2] for e in test))
x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
seen = model.statistics.seen_classes


@torch.no_grad()
def posterior() -> tuple[torch.Tensor, torch.Tensor]:
    scores = [model.statistics.log_likelihoods(model.router_features(x[i:i + 1024]))
              for i in range(0, len(x), 1024)]
    scores = torch.cat(scores)
    return scores, scores.log_softmax(-1)


scores, exact = posterior()
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
with torch.autocast(device.type, dtype=torch.bfloat16):
    _, fast = posterior()
difference = (fast[:, seen] - exact[:, seen]).abs()
result = {
    "samples": len(x), "features": model.router_features(x[:1]).shape[1],
    "dtype_under_autocast": str(fast.dtype).replace("torch.", ""),
    "max_abs_score": float(scores[:, seen].abs().max()),
    "max_abs_log_posterior_difference": float(difference.max()),
    "disagreements": int((fast.argmax(-1) != exact.argmax(-1)).sum()),
    "router_error_fp32": float((exact.argmax(-1) != y).float().mean()),
    "router_error_bf16_tf32": float((fast.argmax(-1) != y).float().mean()),
}
result["passed"] = result["max_abs_log_posterior_difference"] < 0.01
Path(out).write_text(json.dumps(result))
print(json.dumps(result, indent=1))
sys.exit(0 if result["passed"] else 1)
EOF
}

if [[ -n $INTERNAL ]]; then
  "internal_$INTERNAL" "$@"
  exit $?
fi

# -- recording ---------------------------------------------------------------------------------
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
: >"$OUT/logs.txt"
START=$(date +%s)

cat >"$WORK/record.py" <<'EOF'
"""One JSON line for a finished step of scripts/gpu_check.sh: its status and key numbers."""
import json
import statistics
import sys
from pathlib import Path

name, rc, seconds, limit, result, log = sys.argv[1:7]
rc = int(rc)
status = "skipped" if rc < 0 else "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
line = {"step": name, "rc": rc, "status": status, "seconds": float(seconds), "limit_s": int(limit)}


def run_summary(folder: Path) -> dict | None:
    path = folder / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    keys = ("status", "device", "wall_time_s", "average_accuracy", "router_error", "train_error",
            "train_error_reference", "num_experts", "experiences_completed")
    summary = {k: results[k] for k in keys if results.get(k) is not None}
    train = (results.get("config") or {}).get("train") or {}
    summary.update({k: train.get(k) for k in ("epochs", "batch_size", "precision", "compile")})
    return summary


def bench_summary(bench: dict) -> dict:
    gpu = bench.get("sections", {}).get("gpu", {})
    fields = ("data", "samples_per_epoch", "epochs", "samples_per_s_steady",
              "samples_per_s_whole_call", "train_call_s", "eval_s", "test_accuracy",
              "cuda_max_allocated_mb")
    info = {}
    for case, res in gpu.get("info", {}).items():
        info[case] = {k: res.get(k) for k in fields if res.get(k) is not None}
        steady = res.get("epoch_s", [])[1:] or res.get("epoch_s", [])
        if steady:
            info[case]["epoch_s_median"] = statistics.median(steady)
    return {"runs": info, "targets": gpu.get("targets", [])}


path = Path(result) if result else None
if path is not None and path.is_dir():
    line["run"] = run_summary(path)
elif path is not None and path.suffix == ".json" and path.is_file():
    data = json.loads(path.read_text())
    if "sections" in data:
        line["bench"] = bench_summary(data)
    else:
        line["check"] = data
        if data.get("run_folder"):
            line["run"] = run_summary(Path(data["run_folder"]))
if status in ("failed", "timeout") and log and Path(log).is_file():
    lines = [t for t in Path(log).read_text(errors="replace").splitlines() if t.strip("=-# ")]
    ours = [t for t in lines if t.startswith("error:")]  # moe-cl's one-line errors
    raised = [t for t in lines if "Error" in t and not t.startswith(" ")]  # tracebacks' ends
    line["last_line"] = (ours or raised or lines or [""])[-1][-400:]  # torchrun adds a summary
print(json.dumps(line))
EOF

log() { echo "[gpu_check $(date +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }

# What comes back, refreshed after every step.
pack() {
  (cd "$WORK" && find logs runs -type f ! -name '*.pt' ! -name '*.tmp' ! -name '.lock' \
     ! -name 'events.out.*' 2>/dev/null; ls ./*.json 2>/dev/null) |
    tar -czf "$WORK/runs.tar.gz" -C "$WORK" -T - 2>/dev/null &&
    cp "$WORK/runs.tar.gz" "$OUT/runs.tar.gz"
}

# record NAME RC SECONDS LIMIT RESULT: one JSON line in results.jsonl (a plain one if python
# cannot write it), the log's tail in logs.txt.
record() {
  local name=$1 rc=$2 seconds=$3 limit=$4 result=$5 line
  line=$("${PY[@]}" "$WORK/record.py" "$name" "$rc" "$seconds" "$limit" "$result" \
         "$LOGS/$name.log" 2>>"$LOGS/record.err") ||
    line=$(printf '{"step": "%s", "rc": %s, "seconds": %s, "limit_s": %s}' \
           "$name" "$rc" "$seconds" "$limit")
  echo "$line" >>"$RESULTS"
  {
    echo "==== $name: exit $rc after $seconds s (limit $limit s)"
    [[ -f $LOGS/$name.log ]] && tail -n 40 "$LOGS/$name.log"
  } >>"$OUT/logs.txt"
  pack
}

FAILED=()
# step NAME LIMIT_S RESULT COMMAND...: run COMMAND in $WORK (output to logs/NAME.log) within
# min(LIMIT_S x SCALE, what is left of the budget); RESULT is its run folder or JSON file.
step() {
  local name=$1 limit=$2 result=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 15)); then
    log "$name: skipped, ${left} s left of the ${BUDGET} s budget"
    record "$name" -1 0 0 ""
    FAILED+=("$name(skipped)")
    return
  fi
  limit=$((limit * SCALE))
  ((limit > left)) && limit=$left
  log "$name (limit ${limit} s): $*"
  local began rc seconds
  began=$(date +%s%N)
  (cd "$WORK" && timeout -k 5 "$limit" "$@") >"$LOGS/$name.log" 2>&1
  rc=$?
  seconds=$(awk "BEGIN { printf \"%.2f\", ($(date +%s%N) - $began) / 1e9 }")
  log "$name: exit $rc after ${seconds} s"
  record "$name" "$rc" "$seconds" "$limit" "$result"
  ((rc == 0)) || FAILED+=("$name")
}

SELF_CALL=(bash "$SELF" --_internal)

printf '{"step": "start", "mode": "%s", "host": "%s", "date": "%s", "budget_s": %s, "work": "%s"}\n' \
  "$MODE" "$(hostname)" "$(date -u +%FT%TZ)" "$BUDGET" "$WORK" >>"$RESULTS"
{
  command -v nvidia-smi >/dev/null && nvidia-smi 2>&1
  echo "python: ${PY[*]}; .whl: $(ls .whl 2>/dev/null | tr '\n' ' ')"
} >"$OUT/env.txt"
log "mode $MODE, work $WORK, results $RESULTS"

# -- correctness -------------------------------------------------------------------------------
step install 40 "$WORK/env.json" "${SELF_CALL[@]}" install
cp "$LOGS/install.log" "$WORK/pip.log" 2>/dev/null && cat "$WORK/pip.log" >>"$OUT/env.txt"

step routed_tiny 30 "$RUNS/routed_tiny" \
  "${RUN[@]}" benchmark=tiny strategy=routed "out_dir=$RUNS/routed_tiny"
step distilled_tiny 30 "$RUNS/distilled_tiny" \
  "${RUN[@]}" benchmark=tiny strategy=distilled "out_dir=$RUNS/distilled_tiny"
step ewc_resume 45 "$WORK/ewc_resume.json" "${SELF_CALL[@]}" ewc_resume
step torchrun_tiny 40 "$RUNS/torchrun_tiny" \
  "${TORCHRUN[@]}" -m moe_cl.run "${RUN_SETTINGS[@]}" benchmark=tiny strategy=attentive_ls \
  "out_dir=$RUNS/torchrun_tiny"
step torchrun_distilled 45 "$RUNS/torchrun_distilled" \
  "${TORCHRUN[@]}" -m moe_cl.run "${RUN_SETTINGS[@]}" benchmark=paper_fmnist \
  strategy=distilled "${SMALL[@]}" train.epochs=1 distill.epochs=1 \
  "out_dir=$RUNS/torchrun_distilled"
step router_bf16 40 "$WORK/router_bf16.json" "${SELF_CALL[@]}" router_bf16

# -- timings -----------------------------------------------------------------------------------
step paper_fmnist 75 "$RUNS/paper_fmnist" \
  "${RUN[@]}" benchmark=paper_fmnist strategy=attentive_ls "${PAPER[@]}" \
  "out_dir=$RUNS/paper_fmnist"
# one variant per step: the bench writes its JSON whole or not at all, and a step cut short
# keeps the others' numbers
for variant in fp32 bf16; do
  step "bench_$variant" 60 "$WORK/bench_$variant.json" \
    "${PY[@]}" -m moe_cl.bench --only gpu --device "$DEVICE" "${BENCH[@]}" \
    --gpu-variants "$variant" --data-root "$DATA_ROOT" --json "$WORK/bench_$variant.json"
done
if [[ $MODE == gpu ]]; then
  step compile_bf16 70 "$WORK/compile_bf16.json" \
    "${PY[@]}" -m moe_cl.bench --only gpu --device "$DEVICE" "${BENCH[@]}" \
    --gpu-variants bf16+compile --data-root "$DATA_ROOT" --json "$WORK/compile_bf16.json"
else
  log "compile_bf16: skipped in --cpu-test (torch.compile takes minutes on 2 cores)"
  record compile_bf16 -1 0 0 ""
fi

# -- summary -----------------------------------------------------------------------------------
"${PY[@]}" - "$RESULTS" "$MODE" >"$OUT/summary.txt" 2>&1 <<'EOF'
"""Each step's status and seconds; the targets."""
import json
import sys

results, mode = sys.argv[1:3]
lines = [json.loads(t) for t in open(results) if t.strip()]
steps = {s["step"]: s for s in lines if s["step"] != "start"}
print(f"gpu_check ({mode}): {len(steps)} steps")
for name, s in steps.items():
    extra = ""
    run = s.get("run") or {}
    if run.get("average_accuracy") is not None:
        extra += f" average accuracy {run['average_accuracy']:.4f}"
    if run.get("router_error") is not None:
        extra += f", router error {run['router_error']:.4f}"
    check = s.get("check") or {}
    if "max_abs_log_posterior_difference" in check:
        extra += (f" max |log posterior fp32 - bf16/tf32| {check['max_abs_log_posterior_difference']:.2e}"
                  f" nats, {check['disagreements']} disagreements of {check['samples']}")
    if "resumed_at_experience" in check:
        extra += f" resumed at experience {check['resumed_at_experience']}"
    if "torch" in check:
        extra += f" torch {check['torch']} (cuda {check['torch_cuda']}), {check.get('gpu', 'no GPU')}"
    verdict = "PASS" if s["status"] == "ok" else s["status"].upper()
    print(f"  {verdict:8} {name:20} {s['seconds']:8.2f} s{extra}")
targets = []
paper = steps.get("paper_fmnist", {})
if mode == "gpu" and paper.get("status") == "ok":
    targets.append(("paper_fmnist 20 epochs end to end (s), want < 30", paper["seconds"],
                    paper["seconds"] < 30))
bench = {}
for key in ("bench_fp32", "bench_bf16", "compile_bf16"):
    runs = (steps.get(key, {}).get("bench") or {}).get("runs", {})
    bench.update(runs)
    for case, res in runs.items():
        print(f"  {case}: {res.get('samples_per_s_steady') or 0:,.0f} samples/s (epoch median "
              f"{res.get('epoch_s_median') or 0:.2f} s), peak CUDA "
              f"{res.get('cuda_max_allocated_mb') or 0:.0f} MB, test accuracy {res.get('test_accuracy')}")


def ratio(case: str, variant: str, baseline: str) -> float | None:
    a, b = bench.get(f"{case} {variant}"), bench.get(f"{case} {baseline}")
    if a and b and a.get("samples_per_s_steady") and b.get("samples_per_s_steady"):
        return a["samples_per_s_steady"] / b["samples_per_s_steady"]
    return None


value = ratio("paper_cifar100", "bf16", "fp32")
if value is not None:
    targets.append(("CIFAR-100 mixture bf16 / fp32 samples/s, steady epoch, want >= 1.5 (equal "
                    "test error: not measured here)", value, value >= 1.5))
for case in ("paper_cifar100", "paper_fmnist"):
    value = ratio(case, "bf16+compile", "bf16")
    if value is not None:
        print(f"  {case} bf16+compile / bf16 samples/s: {value:.2f}x")
if mode == "cpu" and targets:
    print("  (--cpu-test: tiny sizes on a CPU; these ratios are no measurement of the targets)")
for name, value, met in targets:
    print(f"  target {name}: {value:.3g} {'met' if met else 'NOT MET'}")
EOF
cat "$OUT/summary.txt"
pack
log "results: $RESULTS (and logs.txt, runs.tar.gz, env.txt, summary.txt beside it)"
if ((${#FAILED[@]})); then
  log "FAILED or skipped: ${FAILED[*]}"
  exit 1
fi
log "all steps passed"
