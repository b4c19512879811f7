"""Tests of the evaluation helpers: reconstruction baselines, frozen features, linear probe and k-NN."""

import pytest
import torch

from classes import ViT
from evaluation import (
    confusion_matrix,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    project_2d,
    reconstruction_errors,
    results_table,
    score_representation,
)
from test_classes import small_mae


def separable_problem(samples=6000, dims=20, classes=4, seed=0):
    """Gaussian clusters around well-separated class means: linearly separable with margin.

    The class means are the same for every seed; the seed draws the points around them.
    """
    centers = torch.randn(classes, dims, generator=torch.Generator().manual_seed(100)) * 6
    labels = torch.arange(samples) % classes
    noise = torch.randn(samples, dims, generator=torch.Generator().manual_seed(seed))
    features = centers[labels] + noise
    return features, labels


def small_vit(**overrides):
    config = dict(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)
    config.update(overrides)
    return ViT(**config)


def test_probe_separates_separable_classes():
    train_features, train_labels = separable_problem(seed=0)
    test_features, test_labels = separable_problem(seed=1)
    result = linear_probe(train_features, train_labels, test_features, test_labels)
    assert result.test_accuracy >= 0.98
    assert result.predictions.shape == (6000,)


def shuffled(labels, seed):
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_probe_is_at_chance_on_shuffled_labels():
    train_features, train_labels = separable_problem(seed=0)
    test_features, test_labels = separable_problem(seed=1)
    result = linear_probe(train_features, shuffled(train_labels, 2), test_features, shuffled(test_labels, 3))
    assert abs(result.test_accuracy - 0.25) < 0.04


def test_knn_separates_separable_classes():
    train_features, train_labels = separable_problem(seed=0)
    test_features, test_labels = separable_problem(seed=1)
    assert knn_accuracy(train_features, train_labels, test_features, test_labels) >= 0.98


def test_knn_is_at_chance_on_shuffled_labels():
    train_features, train_labels = separable_problem(seed=0)
    test_features, test_labels = separable_problem(seed=1)
    accuracy = knn_accuracy(train_features, shuffled(train_labels, 2), test_features, shuffled(test_labels, 3))
    assert abs(accuracy - 0.25) < 0.04


def test_knn_weights_votes_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    # the single nearest neighbour decides with k=1; with k=3 the two class-1 points outvote it
    query = torch.tensor([[1.0, 0.3]])
    assert knn_predict(train, labels, query, k=1).item() == 0
    assert knn_predict(train, labels, query, k=3, temperature=10.0).item() == 1


def test_knn_rejects_k_zero():
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2), k=0)


@pytest.mark.parametrize("pool, size", [("mean", 32), ("cls", 32), ("grid", 128), ("tokens", 49 * 32)])
def test_features_have_expected_shape(pool, size):
    features = extract_features(small_vit(), torch.rand(10, 1, 28, 28), pool=pool, batch_size=4)
    assert features.shape == (10, size)
    assert features.dtype == torch.float32


def test_features_identical_in_two_calls():
    encoder = small_vit(dropout=0.1).train()
    images = torch.rand(6, 1, 28, 28)
    first = extract_features(encoder, images)
    second = extract_features(encoder, images)
    assert torch.equal(first, second)
    assert encoder.training


def test_mean_pool_excludes_cls_token():
    encoder = small_vit()
    images = torch.rand(3, 1, 28, 28)
    tokens = encoder.forward_features(images)
    torch.testing.assert_close(extract_features(encoder, images, pool="mean"), tokens[:, 1:].mean(dim=1))


def test_cls_pool_needs_cls_token():
    with pytest.raises(ValueError, match="cls token"):
        extract_features(small_vit(use_cls_token=False), torch.rand(2, 1, 28, 28), pool="cls")


def test_unknown_pool_raises():
    with pytest.raises(ValueError, match="pool must be"):
        extract_features(small_vit(), torch.rand(2, 1, 28, 28), pool="max")


def test_probing_never_updates_the_encoder():
    encoder = small_vit()
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    images = torch.rand(64, 1, 28, 28)
    labels = torch.arange(64) % 4
    features = extract_features(encoder, images)
    score_representation("encoder", features, labels, features, labels)
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(parameter.grad is None for parameter in encoder.parameters())


def test_probe_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(torch.zeros(5, 2), torch.zeros(4, dtype=torch.int64), torch.zeros(3, 2),
                     torch.zeros(3, dtype=torch.int64))


def test_reconstruction_baselines_on_known_images():
    model = small_mae()
    images = torch.zeros(4, 1, 28, 28)
    errors = reconstruction_errors(model, images)
    assert errors["zeros"] == 0.0
    assert errors["visible_mean"] == 0.0
    assert errors["mae"] >= 0.0


def test_reconstruction_baselines_use_the_same_masks():
    model = small_mae()
    images = torch.rand(8, 1, 28, 28)
    first = reconstruction_errors(model, images, seed=3)
    second = reconstruction_errors(model, images, seed=3)
    assert first == second
    ones = torch.ones(8, 1, 28, 28)
    assert reconstruction_errors(model, ones)["zeros"] == pytest.approx(1.0)


def test_confusion_matrix_counts():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(labels, predictions, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_project_2d_keeps_the_widest_direction():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=generator) * torch.tensor([10.0, 1.0, 0.1, 0.1, 0.1])
    points = project_2d(features)
    assert points.shape == (200, 2)
    assert points[:, 0].std() > 5 * points[:, 1].std()


def test_results_table_lists_every_method():
    features, labels = separable_problem()
    scores = [score_representation(name, features, labels, features, labels) for name in ("a", "b")]
    table = results_table(scores)
    assert table.count("\n") == 3
    assert "| a |" in table
    assert "| b |" in table


def test_results_table_has_columns_per_kind_of_features():
    features, labels = separable_problem()
    scores = [
        score_representation("a", features, labels, features, labels, features="mean", pretraining_seconds=120),
        score_representation("a", features, labels, features, labels, features="tokens"),
        score_representation("b", features, labels, features, labels, features="mean"),
    ]
    lines = results_table(scores).splitlines()
    assert lines[0].count("linear probe") == 2
    assert "k-NN (tokens)" in lines[0]
    assert len(lines) == 4
    assert "2.0 min" in lines[2]
    cells_of_b = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert cells_of_b[3:5] == ["-", "-"]
