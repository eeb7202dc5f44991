"""The batched expert bank against the plain per-expert path."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from moe_cl.core.bank import ExpertBank, ExpertGroup, count_parameters
from moe_cl.core.layouts import (
    CHANNELS_LAST_MIN,
    LAYOUTS,
    NARROW_CHANNELS_LAST_MIN,
    CpuLayouts,
    LayoutConv2d,
    LayoutMaxPool2d,
    use_layouts,
)
from moe_cl.core.zoo import ARCHITECTURES, build_mixture, mlp_architecture


def _reference_outputs(group: ExpertGroup, x: torch.Tensor):
    experts = [group.export_reference(i) for i in range(group.num_experts)]
    outs = [e(x) for e in experts]
    return experts, torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)


# cifar100 with 8 experts: 64 stacked channels, the CPU's channels-last path.
@pytest.mark.parametrize(("name", "m"), [("mnist", 3), ("fmnist", 3), ("cifar100", 3),
                                         ("cifar100", 8)])
def test_batched_bank_matches_reference_outputs_and_gradients(name, m):
    torch.manual_seed(0)
    arch = ARCHITECTURES[name]
    group = ExpertGroup(arch.expert, m)
    assert (arch.expert.layers[0].out_channels * m >= CHANNELS_LAST_MIN) == (m == 8)
    x = torch.randn(6, *arch.input_shape)
    experts, ref_logits, ref_hidden = _reference_outputs(group, x)
    logits, hidden = group(x)
    assert logits.shape == (6, m, arch.num_classes)
    assert hidden.shape == (6, m, arch.hidden_size)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)

    weights = torch.randn_like(logits)
    ((logits * weights).sum() + hidden.square().sum()).backward()
    ((ref_logits * weights).sum() + ref_hidden.square().sum()).backward()
    # The gradient of every stacked tensor equals the stacked gradients of the references.
    for name_p, p in group.named_parameters():
        assert p.grad is not None, name_p
    for i, expert in enumerate(experts):
        for idx, layer in enumerate(group.layers):
            ref_layer = expert.layers[idx]
            if getattr(ref_layer, "weight", None) is None:
                continue
            g = layer.weight.grad
            if g.dim() == 3:  # linear [m, in, out]
                torch.testing.assert_close(g[i].t(), ref_layer.weight.grad, atol=1e-5, rtol=1e-4)
            else:  # conv / batch norm stacked along dim 0 (other summation order: atol 5e-5)
                rows = ref_layer.weight.shape[0]
                torch.testing.assert_close(
                    g[i * rows : (i + 1) * rows], ref_layer.weight.grad, atol=5e-5, rtol=1e-4
                )


def test_batchnorm_statistics_stay_per_expert():
    torch.manual_seed(1)
    arch = ARCHITECTURES["cifar100"]
    group = ExpertGroup(arch.expert, 2).train()
    x = torch.randn(8, 3, 32, 32)
    experts = [group.export_reference(i).train() for i in range(2)]
    group(x)
    for e in experts:
        e(x)
    group.eval()
    ref = torch.stack([e.eval()(x)[0] for e in experts], 1)
    torch.testing.assert_close(group(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_bank_growth_appends_group_and_keeps_parameters():
    arch = ARCHITECTURES["mnist"]
    bank = ExpertBank(arch.expert, 2)
    before = [id(p) for p in bank.parameters()]
    bank.add_experts(3)
    assert bank.num_experts == 5
    assert [id(p) for p in bank.parameters()][: len(before)] == before
    logits, hidden = bank(torch.randn(4, 1, 28, 28))
    assert logits.shape == (4, 5, 10) and hidden.shape == (4, 5, 32)


def test_frozen_group_is_constant_in_training():
    torch.manual_seed(2)
    arch = ARCHITECTURES["cifar100"]
    bank = ExpertBank(arch.expert, 2)
    bank.freeze_existing()
    bank.add_experts(1)
    bank.train()
    x = torch.randn(5, 3, 32, 32)
    before = bank(x)[0][:, :2].clone()
    for _ in range(3):  # BatchNorm running stats of frozen experts must not move
        bank(torch.randn(5, 3, 32, 32) * 3 + 1)
    assert not bank.groups[0].training and bank.groups[1].training
    assert all(not p.requires_grad for p in bank.groups[0].parameters())
    assert torch.equal(bank(x)[0][:, :2], before)


def test_forward_selected_computes_only_selected_experts():
    torch.manual_seed(3)
    arch = mlp_architecture((1, 4, 4), 3, num_experts=4)
    bank = ExpertBank(arch.expert, 4).eval()
    x = torch.randn(6, 1, 4, 4)
    dense, _ = bank(x)
    # Poison experts 1 and 3: any use of them would produce NaN.
    with torch.no_grad():
        for layer in bank.groups[0].layers:
            if hasattr(layer, "weight") and layer.weight is not None:
                layer.weight[1] = float("nan")
                layer.weight[3] = float("nan")
    samples = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    experts = torch.tensor([0, 2, 2, 0, 2, 0, 2])
    got = bank.forward_selected(x, samples, experts)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, dense[samples, experts], atol=1e-5, rtol=1e-5)


def test_forward_selected_across_groups_with_conv_and_batchnorm():
    torch.manual_seed(4)
    arch = ARCHITECTURES["cifar100"]
    bank = ExpertBank(arch.expert, 2)
    bank.add_experts(2)
    bank.eval()
    x = torch.randn(5, 3, 32, 32)
    dense, _ = bank(x)
    samples = torch.tensor([0, 1, 2, 3, 4, 4])
    experts = torch.tensor([3, 0, 3, 1, 2, 0])
    got = bank.forward_selected(x, samples, experts)
    torch.testing.assert_close(got, dense[samples, experts], atol=1e-5, rtol=1e-5)
    bank.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        bank.forward_selected(x, samples, experts)


def test_bad_input_shape_and_expert_count_raise_value_error():
    arch = ARCHITECTURES["mnist"]
    with pytest.raises(ValueError, match="num_experts"):
        ExpertBank(arch.expert, 0)
    with pytest.raises(ValueError, match="num_experts"):
        build_mixture(arch, num_experts=0)
    bank = ExpertBank(arch.expert, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 1, 28, 28\]"):
        bank(torch.randn(4, 3, 28, 28))
    model = build_mixture(arch, gate="attentive")
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(torch.randn(4, 784))


def test_parameter_counts_of_the_paper_architectures():
    mnist = ARCHITECTURES["mnist"]
    assert count_parameters(mnist.expert.build_reference()) == 1382
    softmax = build_mixture(mnist, gate="softmax")
    assert count_parameters(softmax.gate) == 26063
    attentive = build_mixture(mnist, gate="attentive")
    assert count_parameters(attentive.gate.query) + count_parameters(attentive.gate.key) == 2048
    # The batched bank holds exactly M copies of the expert's parameters.
    assert count_parameters(softmax.bank) == 5 * 1382
    # FashionMNIST: hand-computed from PAPER.md section 4.
    fmnist = ARCHITECTURES["fmnist"]
    expert = 10 + 169 * 64 + 64 + 64 * 32 + 32 + 330
    assert count_parameters(fmnist.expert.build_reference()) == expert
    gate = build_mixture(fmnist, gate="softmax").gate
    assert count_parameters(gate) == 80 + 16 + 1352 * 512 + 512 + 512 * 32 + 32 + 32 * 5 + 5
    # CIFAR-100, f = 8: convs (bias only without BN) + BN + linears.
    cifar = ARCHITECTURES["cifar100"]
    expected = (3 * 8 * 9 + 8) + (8 * 16 * 9 + 32) + (16 * 32 * 9 + 32) + (32 * 64 * 9 + 128)
    expected += 256 * 128 + 128 + 128 * 64 + 64 + 64 * 100 + 100
    assert count_parameters(cifar.expert.build_reference()) == expected
    assert cifar.num_experts == 20 and cifar.hidden_size == 64
    assert ARCHITECTURES["cifar100_h256"].hidden_size == 256


def _paper_order(modules: list) -> list:
    """The paper's order: every (max-pool, ReLU) pair back to (ReLU, max-pool)."""
    modules = list(modules)
    for i in range(len(modules) - 1):
        pool, relu = modules[i], modules[i + 1]
        if isinstance(pool, torch.nn.MaxPool2d) and isinstance(relu, torch.nn.ReLU):
            modules[i], modules[i + 1] = relu, pool
    return modules


@pytest.mark.parametrize("name", ["mnist", "fmnist", "cifar100"])
@pytest.mark.parametrize("part", ["expert", "gate"])
def test_pooling_before_relu_is_the_papers_network_bit_for_bit(name, part):
    """The zoo pools before its ReLUs (faster); outputs and gradients are exactly the paper's."""
    torch.manual_seed(0)
    arch = ARCHITECTURES[name]
    if part == "expert":
        net = torch.nn.Sequential(*arch.expert.build_reference().layers)
    else:
        net = arch.gate_network("softmax")
    paper = torch.nn.Sequential(*_paper_order(list(net)))
    assert [type(m) for m in paper] != [type(m) for m in net]  # the order really differs
    paper.load_state_dict(net.state_dict())  # same parameter names
    # Images with a constant background: windows of equal values exercise tie-breaking.
    x = torch.randn(16, *arch.input_shape)
    x[:, :, :, : x.shape[-1] // 2] = 0.0
    outs = []
    for model in (net, paper):
        model.train()
        out = model(x)
        out.square().sum().backward()
        outs.append((out, [p.grad for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for ours, theirs in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- layouts


NCHW = CpuLayouts(narrow_channels_last=False)  # the layouts before issue 16


def _step(model: torch.nn.Module, x: torch.Tensor, layouts: CpuLayouts) -> tuple:
    """Output and every parameter's gradient of one forward and backward pass in ``layouts``."""
    model.zero_grad()
    use_layouts(model, layouts)
    out = model(x)
    logits = out.log_probs if hasattr(out, "log_probs") else out
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
@pytest.mark.parametrize("gate", ["softmax", "attentive"])
def test_channels_last_layouts_compute_what_nchw_computes(name, gate):
    """The CPU layouts of one-channel inputs and pooling change the summation order of the
    convolutions (not of BatchNorm, which stays NCHW): outputs and gradients agree to float
    rounding, on images with a constant half (ties in the pooling windows)."""
    torch.manual_seed(0)
    core = build_mixture(ARCHITECTURES[name], gate=gate, num_experts=5).train()
    x = torch.randn(32, 1, 28, 28)
    x[..., :14] = -0.5
    out, grads = _step(core, x, LAYOUTS)
    legacy_out, legacy_grads = _step(core, x, NCHW)
    torch.testing.assert_close(out, legacy_out, rtol=1e-5, atol=1e-5)
    for grad, legacy_grad in zip(grads, legacy_grads, strict=True):
        torch.testing.assert_close(grad, legacy_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 4, 8])
def test_max_pooling_channels_last_is_exact(channels):
    """Same maxima, and every gradient on the first maximum of its window (ties included)."""
    torch.manual_seed(0)
    x = torch.randn(4, channels, 26, 26)
    x[:, :, :, :12] = 0.25
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    pooled = LAYOUTS.max_pool(ours, partial(F.max_pool2d, kernel_size=2))
    reference = F.max_pool2d(theirs, 2)
    weights = torch.randn_like(reference)
    (pooled * weights).sum().backward()
    (reference * weights).sum().backward()
    assert torch.equal(pooled, reference) and pooled.is_contiguous()
    assert torch.equal(ours.grad, theirs.grad) and ours.grad.is_contiguous()


def test_layout_rules():
    one_channel = torch.randn(2, 1, 8, 8)
    assert LAYOUTS.conv_input(one_channel, 3) is one_channel
    viewed = LAYOUTS.conv_input(one_channel, NARROW_CHANNELS_LAST_MIN)
    assert viewed.data_ptr() == one_channel.data_ptr() and torch.equal(viewed, one_channel)
    assert F.conv2d(viewed, torch.randn(4, 1, 3, 3)).is_contiguous(
        memory_format=torch.channels_last)
    wide = torch.randn(2, 3, 8, 8)
    assert LAYOUTS.conv_input(wide, CHANNELS_LAST_MIN).is_contiguous(
        memory_format=torch.channels_last)
    assert LAYOUTS.conv_input(wide, CHANNELS_LAST_MIN - 1) is wide
    elsewhere = torch.empty(2, 1, 8, 8, device="meta")
    assert LAYOUTS.conv_input(elsewhere, 64) is elsewhere
    assert NCHW.conv_input(one_channel, 8) is one_channel
    assert NCHW.conv_input(wide, CHANNELS_LAST_MIN).is_contiguous(
        memory_format=torch.channels_last)  # the rule of wide convolutions stays


def test_a_model_takes_other_layouts_for_all_its_modules_and_later_experts():
    core = build_mixture(ARCHITECTURES["fmnist"], gate="attentive", num_experts=2)
    use_layouts(core, NCHW)
    core.bank.add_experts(1)
    chosen = [m.layouts for m in core.modules() if hasattr(m, "layouts")]
    # the bank, its two groups, the gate's convolution and pooling
    assert len(chosen) == 5 and all(layouts is NCHW for layouts in chosen)
    assert ExpertBank(ARCHITECTURES["fmnist"].expert, 1).layouts is LAYOUTS


def test_layout_modules_keep_the_parameter_names_of_torchs():
    assert LayoutConv2d(1, 8, 3).state_dict().keys() == torch.nn.Conv2d(1, 8, 3).state_dict().keys()
    assert isinstance(LayoutMaxPool2d(2), torch.nn.MaxPool2d)
    assert not LayoutMaxPool2d(2).state_dict()
