"""Tests of the I-JEPA model: the target encoder, its EMA, the multi-block sampler and training."""

import pytest
import torch

from classes import JEPA, MultiBlockMaskSampler, ema_momentum
from data import ImageDataset
from training import TrainConfig, build_optimizer, seed_everything, train, train_pixel_decoder


def tiny_jepa(**overrides):
    config = dict(image_size=16, patch_size=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64,
                  predictor_dim=16, predictor_depth=1, predictor_heads=2, predictor_dim_head=8,
                  predictor_mlp_dim=32, min_context=2)
    config.update(overrides)
    return JEPA(**config)


def test_target_encoder_gets_no_gradients():
    model = tiny_jepa()
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    model(torch.rand(4, 1, 16, 16), generator=torch.Generator().manual_seed(0)).loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.context_encoder.parameters())


def test_target_encoder_not_in_optimizer():
    model = tiny_jepa()
    optimized = {id(p) for group in build_optimizer(model, TrainConfig()).param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.target_encoder.parameters())
    assert all(id(p) in optimized for p in model.context_encoder.parameters())
    assert all(id(p) in optimized for p in model.predictor.parameters())


def test_ema_update_formula():
    model = tiny_jepa()
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    online = [p.clone() for p in model.context_encoder.parameters()]
    momentum = 0.9
    model.update_target_encoder(momentum)
    for target, old, new in zip(model.target_encoder.parameters(), before, online):
        torch.testing.assert_close(target, momentum * old + (1 - momentum) * new)


def test_after_optimizer_step_uses_schedule():
    model = tiny_jepa()
    assert model.after_optimizer_step(5, 10) == pytest.approx(0.998)


@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 1), (1, 7), (3, 235), (10, 59), (100, 3)])
def test_momentum_schedule_ends_at_exactly_one(epochs, steps_per_epoch):
    total = epochs * steps_per_epoch
    values = [ema_momentum(step, total) for step in range(1, total + 1)]
    assert values[-1] == 1.0
    assert ema_momentum(0, total) == 0.996
    assert all(later >= earlier for earlier, later in zip(values, values[1:]))


def test_momentum_reaches_one_at_last_training_step():
    seen = []
    model = tiny_jepa()
    original = model.update_target_encoder

    def record(momentum):
        seen.append(momentum)
        original(momentum)

    model.update_target_encoder = record
    data = ImageDataset(torch.rand(40, 1, 16, 16), torch.zeros(40, dtype=torch.int64), ["x"], "tiny", "train")
    train(model, data, None, TrainConfig(epochs=3, batch_size=16, warmup_epochs=1, precision="float32"),
          show_progress=False)
    assert len(seen) == 9
    assert seen[-1] == 1.0
    assert seen[0] == pytest.approx(0.996 + 0.004 / 9)


def test_targets_are_layer_normalised_without_affine():
    model = tiny_jepa()
    embeddings = model.target_embeddings(torch.rand(3, 1, 16, 16))
    torch.testing.assert_close(embeddings.mean(dim=-1), torch.zeros(3, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(embeddings.std(dim=-1, unbiased=False), torch.ones(3, 16), atol=1e-3, rtol=0)


def test_forward_shapes_and_target_positions():
    model = tiny_jepa()
    images = torch.rand(5, 1, 16, 16)
    output = model(images, generator=torch.Generator().manual_seed(1))
    num_targets, target_size = output.masks.target_indices.shape[1:]
    assert output.predictions.shape == (5, num_targets * target_size, 32)
    assert output.targets.shape == output.predictions.shape
    embeddings = model.target_embeddings(images)
    block, image = 2, 3
    indices = output.masks.target_indices[image, block]
    block_targets = output.targets[image, block * target_size : (block + 1) * target_size]
    torch.testing.assert_close(block_targets, embeddings[image, indices])


def test_context_excludes_targets():
    sampler = MultiBlockMaskSampler()
    masks = sampler.sample(64, torch.Generator().manual_seed(0))
    for image in range(64):
        context = set(masks.context_indices[image].tolist())
        targets = set(masks.target_indices[image].flatten().tolist())
        assert context.isdisjoint(targets)
        assert len(context) >= sampler.min_context


def test_target_blocks_are_rectangles():
    sampler = MultiBlockMaskSampler()
    masks = sampler.sample(16, torch.Generator().manual_seed(2))
    for block in masks.target_indices.flatten(0, 1):
        rows, cols = block // 7, block % 7
        height = rows.max() - rows.min() + 1
        width = cols.max() - cols.min() + 1
        assert height * width == len(block)
        assert len(set(block.tolist())) == len(block)


def test_equal_generators_give_equal_masks():
    sampler = MultiBlockMaskSampler()
    first = sampler.sample(8, torch.Generator().manual_seed(3))
    second = sampler.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(first.context_indices, second.context_indices)
    assert torch.equal(first.target_indices, second.target_indices)


def test_every_patch_can_be_target_and_context_on_4x4():
    sampler = MultiBlockMaskSampler(grid_size=(4, 4), min_context=2)
    generator = torch.Generator().manual_seed(0)
    in_target = torch.zeros(16, dtype=torch.bool)
    in_context = torch.zeros(16, dtype=torch.bool)
    drawn = 0
    while drawn < 10_000:
        masks = sampler.sample(500, generator)
        in_target[masks.target_indices.flatten()] = True
        in_context[masks.context_indices.flatten()] = True
        drawn += 500
    assert in_target.all(), in_target.view(4, 4)
    assert in_context.all(), in_context.view(4, 4)


EXTREME_SAMPLERS = [
    dict(num_targets=1, target_scale=(0.01, 0.01), target_aspect=(0.1, 10.0)),
    dict(num_targets=8, target_scale=(0.3, 0.5), context_scale=(0.85, 1.0), min_context=1),
    dict(num_targets=4, target_scale=(1.0, 1.0), min_context=1),
    dict(num_targets=20, target_scale=(0.2, 0.2), min_context=3, max_attempts=5),
    dict(num_targets=2, target_scale=(0.05, 0.9), target_aspect=(0.2, 5.0), context_scale=(0.1, 1.0)),
    dict(num_targets=4, context_scale=(0.1, 0.1), min_context=1),
]


@pytest.mark.parametrize("grid", [(4, 4), (7, 7)])
@pytest.mark.parametrize("parameters", EXTREME_SAMPLERS)
def test_sampler_returns_or_raises_on_extreme_parameters(grid, parameters):
    try:
        sampler = MultiBlockMaskSampler(grid_size=grid, **parameters)
    except ValueError as error:
        assert "min_context" in str(error) or "must" in str(error)
        return
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        try:
            masks = sampler.sample(64, generator)
        except ValueError as error:
            assert f"{sampler.max_attempts} attempts" in str(error)
            continue
        assert masks.context_indices.shape[1] >= sampler.min_context


@pytest.mark.parametrize(
    "parameters, message",
    [
        (dict(num_targets=0), "num_targets"),
        (dict(target_scale=(0.0, 0.2)), "target_scale"),
        (dict(target_scale=(0.3, 0.2)), "target_scale"),
        (dict(context_scale=(0.5, 1.2)), "context_scale"),
        (dict(target_aspect=(2.0, 1.0)), "target_aspect"),
        (dict(min_context=0), "min_context"),
        (dict(min_context=49), "min_context"),
        (dict(max_attempts=0), "max_attempts"),
        (dict(context_scale=(0.1, 0.1), min_context=5), "cannot fit"),
    ],
)
def test_invalid_sampler_parameters_raise(parameters, message):
    with pytest.raises(ValueError, match=message):
        MultiBlockMaskSampler(**parameters)


def test_tiny_model_overfits_one_batch_without_collapse():
    seed_everything(0)
    model = tiny_jepa()
    images = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, spreads = [], []
    for step in range(60):
        output = model(images, generator=torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        model.after_optimizer_step(step + 1, 60)
        losses.append(output.loss.item())
        spreads.append(output.stats["target_std"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert min(spreads) > model.collapse_threshold


def test_pixel_decoder_leaves_jepa_unchanged():
    model = tiny_jepa()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    data = ImageDataset(torch.rand(32, 1, 16, 16), torch.zeros(32, dtype=torch.int64), ["x"], "tiny", "train")
    decoder, error = train_pixel_decoder(model, data, epochs=1, batch_size=16, show_progress=False)
    assert error > 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert decoder(torch.randn(2, 5, 32)).shape == (2, 5, 16)


def test_reconstruct_gives_four_panels():
    model = tiny_jepa().train()
    data = ImageDataset(torch.rand(32, 1, 16, 16), torch.zeros(32, dtype=torch.int64), ["x"], "tiny", "train")
    decoder, _ = train_pixel_decoder(model, data, epochs=1, batch_size=16, show_progress=False)
    images = torch.rand(3, 1, 16, 16)
    result = model.reconstruct(images, decoder, torch.Generator().manual_seed(0))
    assert model.training
    for panel in (result.masked, result.reconstruction, result.pasted, result.mask):
        assert panel.shape == (3, 1, 16, 16)
    visible = result.mask == 0
    torch.testing.assert_close(result.pasted[visible], images[visible])
    assert result.mask.sum() > 0


def test_training_warns_when_spread_falls_below_threshold(capsys):
    model = tiny_jepa()
    model.collapse_threshold = 10.0  # any real spread is below this
    data = ImageDataset(torch.rand(32, 1, 16, 16), torch.zeros(32, dtype=torch.int64), ["x"], "tiny", "train")
    history = train(model, data, None, TrainConfig(epochs=2, batch_size=16, warmup_epochs=1, precision="float32"),
                    show_progress=False)
    output = capsys.readouterr().out
    assert output.count("warning: in epoch") == 2
    assert "collapsing" in output
    assert len(history["train_target_std"]) == 2


def test_training_stays_quiet_above_threshold(capsys):
    model = tiny_jepa()
    model.collapse_threshold = 0.0
    data = ImageDataset(torch.rand(32, 1, 16, 16), torch.zeros(32, dtype=torch.int64), ["x"], "tiny", "train")
    train(model, data, None, TrainConfig(epochs=1, batch_size=16, warmup_epochs=1, precision="float32"),
          show_progress=False)
    assert "warning" not in capsys.readouterr().out
