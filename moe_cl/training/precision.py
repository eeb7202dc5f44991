"""The arithmetic a mixture trains and evaluates in (``train.precision``), and whether the
device offers it.

* ``fp32``: IEEE float32 throughout; on CUDA also the convolutions, which torch would otherwise
  run in TF32.
* ``tf32``: CUDA matmuls and convolutions in TensorFloat-32 (float32 tensors, products with a
  10-bit mantissa). GPU only.
* ``bf16``: the forward pass under ``torch.autocast`` in bfloat16, while the gate's softmax, the
  mixture's log-probabilities, the losses and the routing metrics stay float32. On a CPU only
  where bfloat16 is native (elsewhere torch emulates it, slower than float32).

``moe_cl.training.strategies.MoEStrategy`` applies it. This module imports nothing heavy: the
configuration offers the choices, and the command line checks them against the device before
data or Avalanche load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

CPUINFO = Path("/proc/cpuinfo")
# CPU feature flags of native bfloat16 arithmetic: x86 (AVX512-BF16, AMX) and Arm (bf16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU computes in bfloat16 natively, read from its feature flags (False where
    they cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {
        flag
        for line in text.splitlines()
        if line.startswith(("flags", "Features"))
        for flag in line.partition(":")[2].split()
    }
    return not flags.isdisjoint(NATIVE_BF16_FLAGS)


def precision_problem(precision: str, device_type: str) -> str | None:
    """Why ``precision`` cannot run on a device of type ``device_type`` (one line), or None."""
    if precision not in PRECISIONS:
        return f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "tf32" and device_type != "cuda":
        return (f"train.precision=tf32 needs a CUDA device (TensorFloat-32 is a GPU format), "
                f"this run is on {device_type}; use fp32 or bf16")
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        return (f"train.precision=bf16: this CPU has no native bfloat16 (none of "
                f"{', '.join(sorted(NATIVE_BF16_FLAGS))} in {CPUINFO}); use fp32")
    return None


def cuda_device_problem(setting: str) -> str | None:
    """What is wrong with ``device=cuda[:N]`` on this machine (one line), or None: no CUDA, or
    an index past the GPUs it has. Imports torch; other settings need nothing."""
    if not setting.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"device={setting} but no CUDA device is available (use device=auto or cpu)"
    index = int(setting.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        gpus = ", ".join(f"cuda:{i}" for i in range(count))
        return f"device={setting} but this machine has {count} GPU(s): {gpus}"
    return None
