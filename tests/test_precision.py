"""train.precision (fp32 | tf32 | bf16) and train.compile: what the device refuses, what stays
float32 under bf16 autocast, and bf16 routing metrics against fp32 ones.

The compile test runs only with MOE_CL_TEST_COMPILE=1 (torch.compile takes a minute or more on
a small CPU): ``MOE_CL_TEST_COMPILE=1 .venv/bin/python -m pytest -q tests/test_precision.py``.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from moe_cl.core.metrics import RoutingAccumulator
from moe_cl.core.zoo import ARCHITECTURES, build_mixture
from moe_cl.data.tensors import dataset_tensors
from moe_cl.run.cli import main
from moe_cl.training import precision
from moe_cl.training.strategies import MoEStrategy, cuda_tf32
from tests.helpers import moe_strategy, one_error_line, tiny

FAST = ["benchmark=tiny", "logging.interactive=false", "logging.tensorboard=false",
        "logging.figures=false"]
# Routing metrics of bf16 and fp32 runs of the tiny stream may differ by this much (bits, and
# accuracy as a fraction): bf16 keeps 8 bits of mantissa in the networks, and three experiences
# of training let such differences grow (measured: at most 0.03 bits, no accuracy change).
END_TO_END_TOLERANCE = {"average_accuracy": 0.05, "H_s": 0.1, "H_u": 0.1, "MI": 0.1,
                        "MI_pred": 0.1}


def _run(tmp_path: Path, *args: str, name: str = "run") -> tuple[int, Path]:
    out = tmp_path / name
    return main([*FAST, *args, f"out_dir={out}"]), out


# ----------------------------------------------------------------------------- the device


def test_a_cpu_without_native_bfloat16_is_told_so(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 fma avx512f\n")
    assert not precision.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
    assert precision.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("processor : 0\nFeatures : fp asimd bf16\n")  # Arm
    assert precision.cpu_has_native_bf16(cpuinfo)
    assert not precision.cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize(("setting", "device", "native", "message"), [
    ("fp32", "cpu", False, None),
    ("bf16", "cpu", True, None),
    ("bf16", "cpu", False, "this CPU has no native bfloat16"),
    ("bf16", "cuda", False, None),
    ("tf32", "cuda", False, None),
    ("tf32", "cpu", True, "needs a CUDA device"),
    ("fp16", "cpu", True, "must be one of fp32, tf32, bf16"),
])
def test_precision_problems(monkeypatch, setting, device, native, message):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    problem = precision.precision_problem(setting, device)
    assert problem is None if message is None else message in problem


@pytest.mark.parametrize(("setting", "message"), [
    ("tf32", "train.precision=tf32 needs a CUDA device"),
    ("bf16", "train.precision=bf16: this CPU has no native bfloat16"),
])
def test_a_precision_the_cpu_lacks_is_a_usage_error(tmp_path, monkeypatch, capsys, setting,
                                                    message):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    code, out = _run(tmp_path, "device=cpu", f"train.precision={setting}")
    assert code == 2
    assert one_error_line(capsys).startswith(f"error: {message}")
    assert not out.exists()


def test_the_strategy_refuses_a_precision_its_device_lacks():
    bundle, arch = tiny()
    from moe_cl.training.models import MixtureOfExperts

    with pytest.raises(ValueError, match="needs a CUDA device"):
        moe_strategy(MixtureOfExperts(architecture=arch), precision="tf32")


def test_tf32_settings_hold_inside_the_block_only():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    for enabled in (True, False):
        with cuda_tf32(enabled):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (enabled, enabled)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == before


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("gate", ["softmax", "attentive"])
@pytest.mark.parametrize("output", ["expectation", "stochastic"])
def test_under_bf16_autocast_what_the_losses_and_metrics_read_stays_float32(gate, output):
    torch.manual_seed(0)
    arch = ARCHITECTURES["fmnist"]
    core = build_mixture(arch, gate=gate, num_experts=3, output=output)
    x = torch.randn(8, *arch.input_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, hidden = core.bank(x)
        scores = core.gate.scores(x, hidden)
        out = core(x)
        assert core.gate.network(x).dtype == torch.bfloat16  # the networks do run in bf16
    for value in (logits, hidden, scores, out.log_probs, out.gate, out.expert_log_probs,
                  out.hidden):
        assert value.dtype == torch.float32
    out.log_probs.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in core.parameters() if p.grad is not None)


def test_top_k_under_bf16_autocast_stays_float32():
    torch.manual_seed(0)
    arch = ARCHITECTURES["mnist"]
    core = build_mixture(arch, gate="softmax", num_experts=4).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = core.forward_top_k(torch.randn(8, *arch.input_shape), 2)
    assert out.log_probs.dtype == out.gate.dtype == out.selected_log_probs.dtype == torch.float32


def _routing_metrics(core, x, y, autocast: bool) -> dict:
    accumulator = RoutingAccumulator(num_classes=int(y.max()) + 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = core(x)
    accumulator.update(out.gate, y, log_probs=out.log_probs,
                       expert_prediction=out.selected_expert_prediction())
    return accumulator.compute()


def test_bf16_routing_metrics_of_one_model_match_fp32():
    """The same weights evaluated in bf16 and fp32: routing metrics within 0.02 bits, errors
    within 2 points (bf16's 8-bit mantissa moves a few gate values across their argmax)."""
    bundle, arch = tiny()
    torch.manual_seed(0)
    from moe_cl.training.models import MixtureOfExperts

    model = MixtureOfExperts(architecture=arch, num_experts=3)
    moe_strategy(model, epochs=2).train(bundle.benchmark.train_stream[0])
    model.eval()
    tensors = [dataset_tensors(e.dataset) for e in bundle.benchmark.test_stream]
    x, y = torch.cat([t[0] for t in tensors]), torch.cat([t[1] for t in tensors])
    fp32, bf16 = (_routing_metrics(model.core, x, y, autocast) for autocast in (False, True))
    for key in ("H_s", "H_u", "MI", "MI_pred"):
        assert abs(fp32[key] - bf16[key]) < 0.02, key
    assert abs(fp32["error"] - bf16["error"]) < 0.02


def test_a_bf16_run_reaches_the_routing_of_an_fp32_run(tmp_path, monkeypatch):
    """End to end on the tiny stream (emulated bf16 where the CPU lacks it: the check that would
    refuse it is patched); tolerances in END_TO_END_TOLERANCE."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    results = {}
    for setting in ("fp32", "bf16"):
        code, out = _run(tmp_path, "device=cpu", "train.epochs=1", f"train.precision={setting}",
                         name=setting)
        assert code == 0
        results[setting] = json.loads((out / "results.json").read_text())
    assert results["bf16"]["config"]["train"]["precision"] == "bf16"
    for key, tolerance in END_TO_END_TOLERANCE.items():
        assert abs(results["fp32"][key] - results["bf16"][key]) <= tolerance, key


# ----------------------------------------------------------------------------- compile


@pytest.mark.skipif(os.environ.get("MOE_CL_TEST_COMPILE") != "1",
                    reason="torch.compile takes minutes on a small CPU: MOE_CL_TEST_COMPILE=1")
def test_a_compiled_mixture_trains_and_grows_like_the_eager_one():
    bundle, arch = tiny()
    from moe_cl.training.models import ExpertPolicy, MixtureOfExperts

    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MixtureOfExperts(architecture=arch, num_experts=2,
                                 policy=ExpertPolicy("grow", per_experience=1))
        strategy = moe_strategy(model, epochs=1, compile_model=compiled)
        for experience in bundle.benchmark.train_stream[:2]:  # the second one grows
            strategy.train(experience)
        assert model.num_experts == 3
        losses[compiled] = [float(p.detach().sum()) for p in model.parameters()]
        names = list(model.state_dict())
    assert isinstance(strategy, MoEStrategy) and not any("_orig_mod" in n for n in names)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-4)

