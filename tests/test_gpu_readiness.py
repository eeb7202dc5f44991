"""CPU tests of what a GPU run needs (issue 23): models with torchrun's SyncBatchNorm can be
copied, the router's arithmetic does not follow autocast, the NaN-loss checks read the device
once per step, the process group ends with the run, and no method mixes devices (fake CUDA
tensors)."""

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_cl.errors import NonFiniteLossError
from moe_cl.run.builders import build_benchmark, build_model
from moe_cl.run.config import compose
from moe_cl.training.methods import METHODS
from moe_cl.training.models import MixtureOfExperts
from moe_cl.training.options import ExpertPolicy, RouterOptions
from moe_cl.training.plugins import DataParallel, NonFiniteLossGuard
from moe_cl.training.plugins.data_parallel import _synchronise_batch_norm
from moe_cl.training.ranks import Ranks, start_process_group
from moe_cl.training.routed import RoutedMixture
from tests.helpers import moe_strategy, tiny


@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo process group of one rank (this process), ended after the test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    start_process_group(0, 1)
    yield dist.new_group(backend="gloo")
    if dist.is_initialized():
        dist.destroy_process_group()


# -- 1. copies of models whose BatchNorm is SyncBatchNorm


def _sync_batch_norms(model: nn.Module) -> list[nn.SyncBatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]


def test_models_with_sync_batch_norm_are_distilled_and_reused(one_rank_group):
    """What DataParallel does on GPUs, then the three copies of a run: the distilled student
    (its bank copied by the zoo) and a reused expert group's frozen teacher. Each copy holds
    the same process group, not a copy of it (which cannot be made)."""
    torch.manual_seed(0)
    mixture = MixtureOfExperts(architecture="cifar100", num_experts=1)
    _synchronise_batch_norm(mixture, one_rank_group)
    student = mixture.distilled_copy()
    assert _sync_batch_norms(student)
    assert all(m.process_group is one_rank_group for m in _sync_batch_norms(student))

    routed = RoutedMixture(architecture="cifar100", num_experts=1,
                           policy=ExpertPolicy("grow", per_experience=1),
                           router=RouterOptions(feature="pixels"))
    _synchronise_batch_norm(routed, one_rank_group)
    routed.start_reuse(0)
    teacher = routed.reuse_teacher
    assert _sync_batch_norms(teacher)
    assert all(m.process_group is one_rank_group for m in _sync_batch_norms(teacher))
    assert all(not p.requires_grad for p in teacher.parameters())


# -- 4. the process group's end


def test_a_finished_rank_ends_its_process_group(one_rank_group):
    ranks = Ranks.__new__(Ranks)  # without the failure watcher, which a test need not start
    ranks._stopping, ranks.group = False, one_rank_group
    ranks.done()
    assert not dist.is_initialized() and ranks.group is None


# -- 3. the routed router under bf16 autocast


@pytest.mark.parametrize("feature", ["random_conv", "gate_trunk"])
def test_the_router_posterior_under_bf16_autocast_is_the_float32_one(feature):
    """Autocast would run the random convolution (or the gate's trunk) and the class scores
    in bfloat16, against statistics built in float32; the router keeps float32 instead."""
    torch.manual_seed(0)
    bundle, arch = tiny(2)
    model = RoutedMixture(architecture=arch, num_experts=2, router=RouterOptions(feature=feature),
                          policy=ExpertPolicy("grow", per_experience=2))
    model.eval()
    model.update_router(bundle.benchmark.train_stream[0])
    x = torch.randn(64, *arch.input_shape) * 4

    def posterior() -> torch.Tensor:
        return model.statistics.log_likelihoods(model.router_features(x)).log_softmax(-1)

    exact = posterior()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = posterior()
    assert under_autocast.dtype == torch.float32
    seen = model.statistics.seen_classes
    torch.testing.assert_close(under_autocast[:, seen], exact[:, seen], atol=1e-4, rtol=1e-4)


# -- 5. the NaN-loss checks


class _AddsNaN(SupervisedPlugin):
    """A regulariser whose term is NaN."""

    def before_backward(self, strategy, **kwargs) -> None:
        strategy.loss = strategy.loss + float("nan")


def test_a_nan_term_of_a_later_plugin_stops_training_before_the_weights_change():
    """The guard sees the whole loss (with the terms added after it in the plugin list) and
    stops before the optimiser's step."""
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, num_experts=2)
    before = [p.detach().clone() for p in model.parameters()]
    strategy = moe_strategy(model, epochs=1, plugins=[NonFiniteLossGuard(), _AddsNaN()])
    with pytest.raises(NonFiniteLossError,
                       match=r"^loss is nan at training experience 0, epoch 0, iteration 0$"):
        strategy.train(bundle.benchmark.train_stream[0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class _OneRank:
    """The one rank of a run on one device: sums are the values themselves."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def sum_(self, tensors) -> None:
        return None


def _reads_from_device(monkeypatch) -> list[str]:
    """Every read of a tensor's values by the host (a sync on a GPU), by name."""
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _step(loss: float):
    """A strategy after its backward pass, as DataParallel's hook sees it."""
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    return SimpleNamespace(model=model, loss=torch.tensor(loss),
                           experience=SimpleNamespace(current_experience=1),
                           clock=SimpleNamespace(train_exp_epochs=2, train_epoch_iterations=3))


def test_data_parallel_reads_the_device_once_per_step(monkeypatch):
    plugin = DataParallel(_OneRank())
    strategy = _step(0.5)
    reads = _reads_from_device(monkeypatch)
    plugin.after_backward(strategy)
    assert len(reads) == 1, reads
    assert strategy.model.weight.grad is not None
    with pytest.raises(NonFiniteLossError, match="loss is nan on rank 0 of 1 at training "
                                                 "experience 1, epoch 2, iteration 3"):
        plugin.after_backward(_step(float("nan")))


def test_the_guard_reads_the_device_once_per_step(monkeypatch):
    strategy = _step(0.5)
    reads = _reads_from_device(monkeypatch)
    NonFiniteLossGuard().before_update(strategy)
    assert len(reads) == 1, reads


# -- 6. no method mixes devices: fake CUDA tensors


class _FakeCuda(FakeTensorMode):
    """Fake tensors (shapes, dtypes, devices; no data), CUDA ones without a GPU: an operation
    on tensors of two devices raises FakeTensorDeviceMismatchError. A read of a value by the
    host (masks' ``.any()``, ``.item()``) has no data to read: it gets a fixed stand-in."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            tensor = args[0]
            return True if tensor.dtype == torch.bool else 0.5 if tensor.is_floating_point() else 0
        return super().__torch_dispatch__(func, types, args, kwargs)


def _onto_fake_cuda(model: nn.Module, mode: FakeTensorMode) -> None:
    """Every parameter and buffer of ``model`` as a fake CUDA tensor (``model.to`` cannot
    swap a real parameter for a fake one)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(mode.from_tensor(param).to("cuda"),
                                                        requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = mode.from_tensor(buffer).to("cuda")


@pytest.mark.parametrize("method", METHODS)
def test_no_method_mixes_devices_in_a_training_step_and_an_evaluation(method):
    """Each method's model, adapted to its first experience on the CPU, then on fake CUDA:
    a training forward pass and loss, the optimiser's step (Adam's state made on the
    parameters' device), and an evaluation forward pass.

    Not covered, and why: the backward pass (torch's autograd engine needs a real CUDA device
    to run fake CUDA tensors' backward) and Avalanche's loop around the step (its datasets,
    metrics and our adaptation read values by the host, e.g. ``nonzero().tolist()``, which
    fake tensors cannot give)."""
    cfg = compose(["benchmark=tiny", f"strategy={method}", "data.n_experiences=2"])
    bundle = build_benchmark(cfg)
    model = build_model(cfg, bundle)
    model.train()
    avalanche_model_adaptation(model, bundle.benchmark.train_stream[0])
    x = torch.randn(8, *bundle.input_shape)
    y = torch.zeros(8, dtype=torch.long)
    mode = _FakeCuda()
    with mode:
        _onto_fake_cuda(model, mode)
        x, y = (mode.from_tensor(t).to("cuda") for t in (x, y))
        tasks = torch.zeros(8, dtype=torch.long, device="cuda")
        trained = [p for p in model.parameters() if p.requires_grad]
        if METHODS[method].backward and trained:
            loss = nn.functional.nll_loss(model(x, tasks), y)
            assert loss.device.type == "cuda"
            for param in trained:
                param.grad = torch.zeros_like(param)
            torch.optim.Adam(trained).step()
        model.eval()
        with torch.no_grad():
            assert model(x, tasks).device.type == "cuda"


def test_ewc_state_from_a_checkpoint_lands_on_the_parameters_device():
    """A checkpoint holds EWC's tensors on the CPU; restored for a model on another device
    (here the meta device, as a GPU would be) they must sit beside its parameters, since EWC
    subtracts them from the parameters."""
    from avalanche.training.plugins import EWCPlugin
    from avalanche.training.utils import ParamData

    from moe_cl.training.checkpoint import load_plugin_states, plugin_states
    from moe_cl.training.models import SingleExpertModel

    _, arch = tiny(2)
    model = SingleExpertModel(architecture=arch)
    ewc = EWCPlugin(ewc_lambda=1.0)
    names = [name for name, _ in model.named_parameters()]
    ewc.saved_params[0] = {n: ParamData(n, init_tensor=p.detach().clone())
                           for n, p in model.named_parameters()}
    ewc.importances[0] = {n: ParamData(n, init_tensor=torch.ones_like(p))
                          for n, p in model.named_parameters()}
    states = plugin_states([ewc])
    restored = EWCPlugin(ewc_lambda=1.0)
    load_plugin_states([restored], states, model.to("meta"))
    for table in (restored.saved_params[0], restored.importances[0]):
        assert sorted(table) == sorted(names)
        assert {p.data.device.type for p in table.values()} == {"meta"}


def test_random_states_touch_only_the_run_device(monkeypatch):
    """Saving and restoring a CPU run's random state asks no GPU (asking every GPU starts CUDA
    on each); a GPU run's state is restored onto the run's GPU, whatever its index was."""
    from moe_cl.training.checkpoint import rng_state, set_rng_state

    def no_gpu(*args, **kwargs):
        raise AssertionError("a CPU run asked CUDA for its random state")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_gpu)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_gpu)
    cpu = torch.device("cpu")
    state = rng_state(cpu)
    assert state["cuda"] == []
    set_rng_state(state, cpu)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda value, device: restored.append((value, device)))
    gpu_state = {**state, "cuda": [torch.tensor([7], dtype=torch.uint8)]}
    set_rng_state(gpu_state, torch.device("cuda:3"))
    assert len(restored) == 1 and restored[0][1] == torch.device("cuda:3")


def test_a_gpu_index_past_the_machine_is_a_usage_error(monkeypatch):
    """device=cuda:N beyond the GPUs: one line naming them, before anything starts."""
    from moe_cl.run.cli import _device_problem
    from moe_cl.training.precision import cuda_device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_device_problem("cuda:1") is None and cuda_device_problem("cuda") is None
    assert cuda_device_problem("cpu") is None
    assert cuda_device_problem("cuda:2") == "device=cuda:2 but this machine has 2 GPU(s): " \
                                           "cuda:0, cuda:1"
    assert _device_problem(compose(["benchmark=tiny", "device=cuda:5"])).startswith(
        "device=cuda:5 but this machine has 2 GPU(s)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in cuda_device_problem("cuda:0")
