import math

import pytest
import torch

from moe_cl.core.experience_routing import ExperienceRoutes, mix_by_experience

# Experience 0 holds classes 0, 1 and experts 0, 1; experience 1 holds classes 2, 3 and expert
# 2, which experience 0 reuses too. Class 4 is not seen yet.
EXPERTS = [[0], [0], [0, 1]]
CLASS_EXPERIENCE = torch.tensor([0, 0, 1, 1, -1])


def _routes() -> ExperienceRoutes:
    return ExperienceRoutes.build(EXPERTS, CLASS_EXPERIENCE, num_experiences=2)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 3, generator=g)
    logits = torch.randn(3, 3, 5, generator=g)
    posterior = torch.randn(3, 5, generator=g)
    posterior[:, 4] = float("-inf")
    return scores, logits, posterior.log_softmax(-1)


def _by_hand(scores, logits, posterior, sample: int, combine: str, weight: float = 1.0):
    """p(y | x) for one sample, written out with Python loops."""
    classes = {0: [0, 1], 1: [2, 3]}
    within = {}
    for t, ys in classes.items():
        experts = [i for i, served in enumerate(EXPERTS) if t in served]
        z = sum(math.exp(scores[sample, i]) for i in experts)
        for y in ys:
            total = 0.0
            for i in experts:
                norm = sum(math.exp(logits[sample, i, c]) for c in ys)
                total += math.exp(scores[sample, i]) / z * math.exp(logits[sample, i, y]) / norm
            within[y] = total
    p = posterior[sample].exp()
    if combine == "task":
        out = {y: float(sum(p[c] for c in classes[t])) * within[y]
               for t, ys in classes.items() for y in ys}
    else:
        raw = {y: float(p[y]) * within[y] ** weight for y in within}
        out = {y: v / sum(raw.values()) for y, v in raw.items()}
    return [out.get(y, 0.0) for y in range(5)]


@pytest.mark.parametrize(("combine", "weight"), [("task", 1.0), ("product", 1.0),
                                                 ("product", 2.0)])
def test_mixture_matches_a_hand_computation(combine, weight):
    scores, logits, posterior = _inputs()
    out = mix_by_experience(scores, logits, _routes(), posterior, combine=combine,
                            expert_weight=weight)
    for sample in range(3):
        expected = torch.tensor(_by_hand(scores, logits, posterior, sample, combine, weight))
        assert torch.allclose(out.log_probs[sample].exp(), expected, atol=1e-6)
    assert torch.allclose(out.log_probs.exp().sum(-1), torch.ones(3), atol=1e-6)
    assert torch.isneginf(out.log_probs[:, 4]).all()


def test_gate_sums_experience_mass_times_gate_within_it():
    scores, logits, posterior = _inputs(1)
    out = mix_by_experience(scores, logits, _routes(), posterior, combine="task")
    p = out.log_probs.exp()
    p_t = torch.stack([p[:, :2].sum(-1), p[:, 2:4].sum(-1)], 1)
    within0 = scores.softmax(-1)  # experience 0: experts 0, 1, 2
    expected = p_t[:, :1] * within0
    expected[:, 2] += p_t[:, 1]  # experience 1 has expert 2 alone
    assert torch.allclose(out.gate, expected, atol=1e-6)
    assert torch.allclose(out.gate.sum(-1), torch.ones(3), atol=1e-6)


def test_expert_distributions_cover_the_classes_each_expert_serves():
    scores, logits, posterior = _inputs(2)
    out = mix_by_experience(scores, logits, _routes(), posterior)
    assert torch.isneginf(out.expert_log_probs[:, 0, 2:]).all()  # expert 0: classes 0, 1
    assert torch.isfinite(out.expert_log_probs[:, 2, :4]).all()  # expert 2: classes 0-3
    assert torch.allclose(out.expert_log_probs.exp().sum(-1), torch.ones(3, 3), atol=1e-6)


def test_zero_expert_weight_gives_the_router_posterior():
    scores, logits, posterior = _inputs(3)
    out = mix_by_experience(scores, logits, _routes(), posterior, expert_weight=0.0)
    assert torch.allclose(out.log_probs[:, :4], posterior[:, :4], atol=1e-6)


def test_a_given_task_keeps_the_prediction_inside_it():
    scores, logits, posterior = _inputs(4)
    task_one = posterior.clone()
    task_one[:, :2] = float("-inf")
    out = mix_by_experience(scores, logits, _routes(), task_one, combine="task")
    assert torch.isneginf(out.log_probs[:, :2]).all()
    assert torch.allclose(out.gate[:, 2], torch.ones(3))


def test_unknown_combination_is_refused():
    with pytest.raises(ValueError, match="combine"):
        mix_by_experience(*_inputs()[:2], _routes(), _inputs()[2], combine="sum")


def test_an_expert_with_a_wider_support_lowers_its_experience_where_it_expects_old_classes():
    scores, logits, posterior = _inputs(5)
    routes = _routes()
    support = routes.expert_classes(3).clone()
    narrow = mix_by_experience(scores, logits, routes, posterior, combine="task")
    support[2, :4] = True  # expert 2 (experience 1's only expert) trained over classes 0-3
    logits[:, 2, :2] = 20.0  # ... and sure these samples belong to the old classes 0, 1
    wide_routes = ExperienceRoutes(routes.experience, routes.expert, routes.classes, support)
    wide = mix_by_experience(scores, logits, wide_routes, posterior, combine="task")
    assert (wide.log_probs[:, 2:4].exp().sum(-1) < narrow.log_probs[:, 2:4].exp().sum(-1)).all()
    assert torch.allclose(wide.log_probs.exp().sum(-1), torch.ones(3), atol=1e-6)
