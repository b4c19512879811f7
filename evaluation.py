"""Evaluation of trained models on the test set.

- `reconstruction_errors` scores an MAE's pixel predictions on hidden patches
  next to two baselines computed on exactly the same masks: predicting zeros,
  and filling each hidden patch with the mean of that image's visible pixels.
- `extract_features`, `linear_probe` and `knn_accuracy` measure how useful a
  frozen encoder's features are: a linear classifier and a weighted k-nearest
  neighbour vote are trained on the training split's features and scored on
  the test split's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from classes import normalize_patches
from data import iterate_batches
from training import autocast


@torch.no_grad()
def reconstruction_errors(model, images, masking_ratio=None, seed=0, batch_size=1024):
    """Return the masked-patch MSE of the MAE and of two baselines on the same masks, in pixel units.

    images: (N, C, H, W) in [0, 1]. For each image the same random mask (from a
    generator seeded with `seed`) is used by the model and by both baselines:
    "zeros" predicts 0 for every hidden pixel, and "visible_mean" predicts the
    mean of the image's visible pixels. Returns a dict with the keys "mae",
    "zeros" and "visible_mean".

    For a model trained with `norm_pix_loss`, the predictions are mapped back to
    pixels with each hidden patch's true mean and standard deviation, which the
    baselines never see, so its "mae" error is then optimistic.
    """
    ratio = model.masking_ratio if masking_ratio is None else masking_ratio
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    sums = {"mae": 0.0, "zeros": 0.0, "visible_mean": 0.0}
    hidden_count = 0.0
    try:
        for batch, _ in iterate_batches(images, None, batch_size):
            batch = batch.to(device=device, dtype=torch.float32)
            output = model(batch, masking_ratio=ratio, generator=generator)
            patches = model.encoder.patchify(batch)  # [B, N, P]
            hidden = output.mask  # [B, N]
            predictions = output.predictions.float()
            if model.norm_pix_loss:
                _, mean, std = normalize_patches(patches)
                predictions = predictions * std + mean

            visible = (1 - hidden).unsqueeze(-1)  # [B, N, 1]
            visible_mean = (patches * visible).sum(dim=(1, 2)) / (visible.sum(dim=(1, 2)) * patches.shape[-1])

            candidates = {
                "mae": predictions,
                "zeros": torch.zeros_like(patches),
                "visible_mean": visible_mean.view(-1, 1, 1).expand_as(patches),
            }
            for name, prediction in candidates.items():
                per_patch = (prediction - patches).pow(2).mean(dim=-1)  # [B, N]
                sums[name] += (per_patch * hidden).sum().item()
            hidden_count += hidden.sum().item()
    finally:
        model.train(was_training)
    return {name: total / max(hidden_count, 1.0) for name, total in sums.items()}


@torch.no_grad()
def extract_features(encoder, images, pool="mean", batch_size=1024, autocast_dtype=None):
    """Return frozen features of `images` from a `ViT` encoder: (N, C, H, W) -> (N, D), float32 on the CPU.

    The encoder runs in eval mode without gradients, in batches, on its own
    device. The last layer's tokens become one vector per image:

    - `pool="mean"`: the mean of the patch tokens, (N, D);
    - `pool="cls"`: the cls token, (N, D), for encoders that have one;
    - `pool="grid"`: the means over a 2x2 grid of image regions, concatenated
      (N, 4 * D), which keeps a coarse layout;
    - `pool="tokens"`: every patch token, flattened (N, num_patches * D).
    """
    if pool not in ("mean", "cls", "grid", "tokens"):
        raise ValueError(f"pool must be 'mean', 'cls', 'grid' or 'tokens'; got {pool!r}")
    if pool == "cls" and encoder.cls_token is None:
        raise ValueError("pool='cls' needs an encoder with a cls token; use pool='mean'")
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    chunks = []
    try:
        for batch, _ in iterate_batches(images, None, batch_size):
            batch = batch.to(device=device, dtype=torch.float32)
            with autocast(device, autocast_dtype):
                tokens = encoder.forward_features(batch)  # [B, (1 +) N, D]
            tokens = tokens.float()
            if pool == "cls":
                features = tokens[:, 0]
            else:
                patch_tokens = tokens[:, 1:] if encoder.cls_token is not None else tokens  # [B, N, D]
                if pool == "mean":
                    features = patch_tokens.mean(dim=1)
                elif pool == "grid":
                    grid = rearrange(patch_tokens, "b (h w) d -> b d h w", h=encoder.grid_size[0])
                    features = F.adaptive_avg_pool2d(grid, 2).flatten(1)  # [B, D * 4]
                else:
                    features = patch_tokens.flatten(1)
            chunks.append(features.cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(chunks)


@dataclass
class ProbeConfig:
    """Recipe of the linear probe. The defaults are the recipe every number in this project uses."""

    epochs: int = 30  # passes over the training features
    batch_size: int = 256  # feature vectors per step
    lr: float = 1e-3  # peak AdamW learning rate, decayed to 0 by a cosine
    weight_decay: float = 1e-4  # AdamW weight decay of the linear layer
    seed: int = 0  # seeds the initial weights and the shuffling


@dataclass
class ProbeResult:
    """Outcome of `linear_probe`: accuracies as fractions in [0, 1] and the test predictions."""

    test_accuracy: float
    train_accuracy: float
    predictions: torch.Tensor


def linear_probe(train_features, train_labels, test_features, test_labels, config=None):
    """Train a linear classifier on frozen features and return its test accuracy as a `ProbeResult`.

    The classifier is a BatchNorm without affine parameters (it standardises
    every feature with the training statistics) followed by one linear layer,
    trained with cross-entropy and AdamW under a cosine learning-rate decay.
    Features are (N, D) tensors; the encoder that made them is never touched.
    """
    config = config or ProbeConfig()
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError(
            f"features and labels differ in length: train {len(train_features)} vs "
            f"{len(train_labels)}, test {len(test_features)} vs {len(test_labels)}"
        )
    train_features, test_features = train_features.float().cpu(), test_features.float().cpu()
    train_labels, test_labels = train_labels.cpu(), test_labels.cpu()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    generator = torch.Generator().manual_seed(config.seed)
    classifier = nn.Sequential(
        nn.BatchNorm1d(train_features.shape[1], affine=False),
        nn.Linear(train_features.shape[1], num_classes),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        classifier[1].reset_parameters()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * math.ceil(len(train_features) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    classifier.train()
    for _ in range(config.epochs):
        for features, labels in iterate_batches(train_features, train_labels, config.batch_size, generator):
            if len(features) < 2:
                continue  # BatchNorm needs two samples to estimate a variance
            loss = F.cross_entropy(classifier(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

    classifier.eval()
    with torch.no_grad():
        train_predictions = classifier(train_features).argmax(dim=1)
        test_predictions = classifier(test_features).argmax(dim=1)
    return ProbeResult(
        test_accuracy=(test_predictions == test_labels).float().mean().item(),
        train_accuracy=(train_predictions == train_labels).float().mean().item(),
        predictions=test_predictions,
    )


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, k=20, temperature=0.07, batch_size=1024):
    """Classify test features by a weighted vote of their k nearest training features.

    Similarity is the cosine between L2-normalised features. Each of the k
    neighbours votes for its class with weight exp(similarity / temperature),
    the weighting of Wu et al. 2018 ("Unsupervised Feature Learning via
    Non-Parametric Instance Discrimination"). Returns (N_test,) class indices.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    train = F.normalize(train_features.float().cpu(), dim=1)
    test = F.normalize(test_features.float().cpu(), dim=1)
    train_labels = train_labels.cpu()
    num_classes = int(train_labels.max()) + 1
    k = min(k, len(train))

    predictions = []
    for start in range(0, len(test), batch_size):
        similarity = test[start : start + batch_size] @ train.T  # [b, N_train]
        top_similarity, top_indices = similarity.topk(k, dim=1)  # [b, k]
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(len(top_indices), num_classes)
        votes.scatter_add_(1, train_labels[top_indices], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07):
    """Return the accuracy (a fraction in [0, 1]) of `knn_predict` on the test features."""
    predictions = knn_predict(train_features, train_labels, test_features, k, temperature)
    return (predictions == test_labels.cpu()).float().mean().item()


def confusion_matrix(labels, predictions, num_classes):
    """Return counts (num_classes, num_classes): row = true class, column = predicted class."""
    labels, predictions = labels.cpu().long(), predictions.cpu().long()
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def project_2d(features):
    """Project features (N, D) onto their first two principal components: (N, 2)."""
    centered = features.float() - features.float().mean(dim=0)
    _, _, components = torch.linalg.svd(centered, full_matrices=False)
    return centered @ components[:2].T


@dataclass
class RepresentationScore:
    """Linear-probe and k-NN accuracy of one kind of frozen features, with what it cost to learn them."""

    name: str
    features: str
    probe_accuracy: float
    knn_accuracy: float
    pretraining_seconds: float
    hardware: str
    probe: ProbeResult
    test_features: torch.Tensor


def score_representation(name, train_features, train_labels, test_features, test_labels, features="",
                         pretraining_seconds=0.0, hardware="", probe_config=None):
    """Run the linear probe and the k-NN classifier on one set of features and return a `RepresentationScore`."""
    probe = linear_probe(train_features, train_labels, test_features, test_labels, probe_config)
    knn = knn_accuracy(train_features, train_labels, test_features, test_labels)
    return RepresentationScore(name, features, probe.test_accuracy, knn, pretraining_seconds, hardware, probe,
                               test_features)


def results_table(scores):
    """Format scores as a Markdown table with one row per method and a probe and a k-NN column per kind of features.

    Scores of the same method (same `name`) share a row; the pretraining time
    and hardware come from the first score of the method.
    """
    kinds = list(dict.fromkeys(score.features for score in scores))
    methods = list(dict.fromkeys(score.name for score in scores))
    by_key = {(score.name, score.features): score for score in scores}

    header = ["method"]
    for kind in kinds:
        suffix = f" ({kind})" if kind else ""
        header += [f"linear probe{suffix}", f"k-NN{suffix}"]
    header += ["pretraining time", "hardware"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    for method in methods:
        first = next(score for score in scores if score.name == method)
        cells = [method]
        for kind in kinds:
            score = by_key.get((method, kind))
            if score is None:
                cells += ["-", "-"]
            else:
                cells += [f"{100 * score.probe_accuracy:.2f} %", f"{100 * score.knn_accuracy:.2f} %"]
        minutes = f"{first.pretraining_seconds / 60:.1f} min" if first.pretraining_seconds else "none"
        cells += [minutes, first.hardware or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
