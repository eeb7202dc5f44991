"""The router's core: feature maps, exact streaming class statistics, the shrunk discriminant."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_cl.core.router import (
    ClassStatistics,
    PixelFeatures,
    RandomConvFeatures,
    experience_log_posterior,
)


def _random_classes(seed: int, num_classes: int, num_features: int, per_class: int):
    """Gaussian classes with different means and a shared correlated covariance, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(num_classes, num_features, generator=generator, dtype=torch.float64)
    mixing = torch.randn(num_features, num_features, generator=generator, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), num_features, generator=generator, dtype=torch.float64)
    features = means[labels] + noise @ mixing
    order = torch.randperm(len(labels), generator=generator)
    return features[order], labels[order]


def test_hand_computed_two_classes_in_two_dimensions():
    # Class 0: (0, 0), (2, 2); class 1: (4, 0), (6, 0); class 2 never seen.
    # Means (1, 1) and (5, 0); pooled scatter [[4, 2], [2, 2]]; N - K_seen = 2, so with shrinkage
    # 1 the covariance is [[3, 1], [1, 2]], its inverse [[2, -1], [-1, 3]] / 5.
    statistics = ClassStatistics(3, 2, shrinkage=1.0)
    statistics.update(torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 2.0], [6.0, 0.0]]),
                      torch.tensor([0, 1, 0, 1]))
    wide = torch.float64
    torch.testing.assert_close(statistics.counts, torch.tensor([2.0, 2.0, 0.0], dtype=wide))
    torch.testing.assert_close(
        statistics.means, torch.tensor([[1.0, 1.0], [5.0, 0.0], [0.0, 0.0]], dtype=wide))
    torch.testing.assert_close(
        statistics.scatter, torch.tensor([[4.0, 2.0], [2.0, 2.0]], dtype=wide))
    # W_0 = (0.2, 0.4), b_0 = -0.3; W_1 = (2, -1), b_1 = -5. At x = (1, 2): 0.7 and -5.
    scores = statistics.log_likelihoods(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    expected = torch.tensor([[0.7, -5.0, -math.inf], [-0.3, -5.0, -math.inf]])
    torch.testing.assert_close(scores, expected)


def test_relative_shrinkage_scales_with_the_mean_diagonal():
    # The hand-computed case above: covariance [[2, 1], [1, 1]], mean diagonal 1.5, so a
    # relative shrinkage of 2/3 is the absolute shrinkage 1 there.
    features = torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 2.0], [6.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    relative = ClassStatistics(3, 2, shrinkage=2 / 3, relative_shrinkage=True)
    absolute = ClassStatistics(3, 2, shrinkage=1.0)
    for statistics in (relative, absolute):
        statistics.update(features, labels)
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(relative.log_likelihoods(x), absolute.log_likelihoods(x))
    empty = ClassStatistics(3, 2, shrinkage=0.1, relative_shrinkage=True)  # no spread yet
    assert torch.isneginf(empty.log_likelihoods(x)).all()


def test_one_dimension_two_batches():
    # Class 0: 0, 2 (mean 1); class 1: 4, 6, 8 (mean 6); scatter 2 + 8 = 10 over 5 - 2 = 3
    # degrees of freedom; shrinkage 2/3 makes the variance 4. W = (1/4, 3/2), b = (-1/8, -9/2).
    statistics = ClassStatistics(2, 1, shrinkage=2 / 3)
    statistics.update(torch.tensor([[0.0], [4.0]]), torch.tensor([0, 1]))
    statistics.update(torch.tensor([[8.0], [2.0], [6.0]]), torch.tensor([1, 0, 1]))
    assert statistics.scatter.item() == pytest.approx(10.0)
    scores = statistics.log_likelihoods(torch.tensor([[3.0]]))
    torch.testing.assert_close(scores, torch.tensor([[0.625, 0.0]]))


def test_scores_match_sklearn_linear_discriminant_analysis():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    num_classes, num_features, per_class = 4, 6, 50
    features, labels = _random_classes(0, num_classes, num_features, per_class)
    statistics = ClassStatistics(num_classes, num_features, shrinkage=1e-12)
    statistics.update(features, labels)
    test_features, _ = _random_classes(1, num_classes, num_features, 10)
    ours = statistics.log_likelihoods(test_features).double().numpy()

    priors = np.full(num_classes, 1 / num_classes)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=None, priors=priors)
    lda.fit(features.numpy(), labels.numpy())
    np.testing.assert_array_equal(ours.argmax(1), lda.predict(test_features.numpy()))
    # With equal class sizes sklearn's covariance is S / N, ours S / (N - K): scores scale by
    # (N - K) / N, and sklearn adds log(prior).
    total = num_classes * per_class
    theirs = lda.decision_function(test_features.numpy())
    np.testing.assert_allclose(ours * total / (total - num_classes) + np.log(priors), theirs,
                               rtol=1e-4, atol=1e-3)


def test_statistics_do_not_depend_on_order_or_batch_split():
    features, labels = _random_classes(2, 5, 7, 40)
    whole = ClassStatistics(5, 7)
    whole.update(features, labels)

    pieces = ClassStatistics(5, 7)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    rest = order[150:]
    one_class_each = [rest[labels[rest] == k] for k in (4, 0, 2, 1, 3)]
    for indices in (*order[:150].split([1, 2, 60, 87]), *one_class_each):
        pieces.update(features[indices], labels[indices])
    pieces.update(features[:0], labels[:0])  # an empty batch changes nothing

    for name in ("counts", "means", "scatter"):
        torch.testing.assert_close(getattr(pieces, name), getattr(whole, name),
                                   rtol=1e-12, atol=1e-10)
    # Both equal the two-pass definition.
    means = torch.stack([features[labels == k].mean(0) for k in range(5)])
    centred = features - means[labels]
    torch.testing.assert_close(whole.means, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.scatter, centred.T @ centred, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(pieces.log_likelihoods(features), whole.log_likelihoods(features))


def test_cached_discriminant_follows_updates():
    features, labels = _random_classes(4, 3, 4, 30)
    statistics = ClassStatistics(3, 4)
    statistics.update(features[:40], labels[:40])
    before = statistics.log_likelihoods(features)
    statistics.update(features[40:], labels[40:])
    fresh = ClassStatistics(3, 4)
    fresh.update(features, labels)
    after = statistics.log_likelihoods(features)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh.log_likelihoods(features))


def test_constant_features_and_one_sample_per_class_stay_finite():
    features, labels = _random_classes(5, 3, 4, 20)
    features[:, 1] = 0.0  # e.g. a ReLU that never fires
    features[:, 3] = 7.5
    statistics = ClassStatistics(4, 4)
    statistics.update(features, labels)
    scores = statistics.log_likelihoods(features)
    assert torch.isfinite(scores[:, :3]).all()
    assert (scores.argmax(1) == labels).float().mean() > 0.5

    single = ClassStatistics(2, 3)  # N = K_seen: no within-class scatter at all
    single.update(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 4.0]]), torch.tensor([0, 1]))
    assert torch.isfinite(single.log_likelihoods(torch.ones(2, 3))).all()


def test_unseen_classes_score_minus_infinity():
    statistics = ClassStatistics(4, 2)
    assert not statistics.seen_classes.any()
    statistics.update(torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]), torch.tensor([2, 0, 2]))
    assert statistics.seen_classes.tolist() == [True, False, True, False]
    scores = statistics.log_likelihoods(torch.randn(5, 2))
    assert torch.isfinite(scores[:, [0, 2]]).all()
    assert (scores[:, [1, 3]] == -math.inf).all()


def test_state_dict_round_trip_restores_statistics_and_scores():
    features, labels = _random_classes(6, 3, 5, 20)
    saved = ClassStatistics(3, 5)
    saved.update(features, labels)
    state = saved.state_dict()
    assert set(state) == {"counts", "means", "scatter"}
    assert saved.nbytes == 8 * (3 + 3 * 5 + 5 * 5)

    loaded = ClassStatistics(3, 5)
    loaded.update(features[:7], labels[:7])
    loaded.log_likelihoods(features)  # a cached discriminant the load must invalidate
    loaded.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(loaded, name), getattr(saved, name))
    torch.testing.assert_close(loaded.log_likelihoods(features), saved.log_likelihoods(features))


def test_bad_input_is_refused():
    statistics = ClassStatistics(3, 2)
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        statistics.update(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        statistics.update(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shrinkage"):
        ClassStatistics(3, 2, shrinkage=0.0)


@pytest.mark.parametrize(("input_shape", "expected"), [((1, 28, 28), 2304), ((3, 32, 32), 3136)])
def test_feature_maps_out_features(input_shape, expected):
    x = torch.randn(2, *input_shape)
    conv = RandomConvFeatures(input_shape[0])
    assert conv.out_features(input_shape) == expected == conv(x).shape[1]
    assert (conv(x) >= 0).all()
    pixels = PixelFeatures()
    assert pixels.out_features(input_shape) == math.prod(input_shape) == pixels(x).shape[1]


@pytest.mark.parametrize("in_channels", [1, 3])
def test_random_conv_features_are_conv_pool_relu_in_nchw(in_channels):
    """The channels-last layouts on the CPU change the convolution's summation order only."""
    x = torch.randn(8, in_channels, 28, 28)
    x[..., :10] = 0.5  # ties in the pooling windows
    features = RandomConvFeatures(in_channels, channels=96, kernel=5, pool=4)
    expected = F.relu(F.max_pool2d(F.conv2d(x, features.weight), 4)).flatten(1)
    torch.testing.assert_close(features(x), expected, rtol=1e-5, atol=1e-5)


def test_random_conv_is_rebuilt_from_its_seed_and_saves_no_weights():
    x = torch.randn(3, 1, 12, 12)
    original = RandomConvFeatures(1, channels=4, seed=7)
    rebuilt = RandomConvFeatures(1, channels=4, seed=7)
    drawn = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(original.weight, drawn / 5)  # N(0, 1) / kernel, no bias
    assert torch.equal(original.weight, rebuilt.weight)
    assert torch.equal(original(x), rebuilt(x))
    assert not torch.equal(original.weight, RandomConvFeatures(1, channels=4, seed=8).weight)
    assert list(original.parameters()) == []

    state = original.state_dict()
    assert list(state) == ["_extra_state"]
    rebuilt.load_state_dict(state)
    with pytest.raises(ValueError, match="saved as"):
        RandomConvFeatures(1, channels=4, seed=8).load_state_dict(state)


def test_experience_posterior_hand_example():
    class_probability = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    posterior = experience_log_posterior(class_probability.log(), torch.tensor([1, 0, 1, 0]), 3)
    torch.testing.assert_close(posterior.exp(), torch.tensor([[0.6, 0.4, 0.0]]))


def test_experience_posterior_from_class_scores_sums_to_one():
    features, labels = _random_classes(7, 6, 4, 15)
    seen = labels != 4  # class 4 not seen yet; class 6 has no samples at all
    statistics = ClassStatistics(7, 4)
    statistics.update(features[seen], labels[seen])
    class_experience = torch.tensor([0, 0, 1, 1, -1, 2, -1])
    scores = statistics.log_likelihoods(features)
    posterior = experience_log_posterior(scores, class_experience, 4)
    assert posterior.shape == (len(labels), 4)
    torch.testing.assert_close(posterior.exp().sum(1), torch.ones(len(labels)))
    assert (posterior[:, 3] == -math.inf).all()
    # Normalising the classes first gives the same experience posterior.
    normalised = experience_log_posterior(torch.log_softmax(scores, 1), class_experience, 4)
    torch.testing.assert_close(normalised, posterior)
    with pytest.raises(ValueError, match="class_experience must be in"):
        experience_log_posterior(scores, class_experience, 2)
