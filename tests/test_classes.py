"""Tests of the ViT and MAE building blocks in classes.py."""

import pytest
import torch

from classes import (
    MAE,
    Attention,
    Decoder,
    FeedForward,
    Transformer,
    ViT,
    count_visible_patches,
    masked_patch_mse,
    random_masking,
    sincos_position_embedding,
)


def small_mae(**overrides):
    config = dict(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64, decoder_dim=32, decoder_depth=1,
                  decoder_heads=2, decoder_dim_head=16, decoder_mlp_dim=64)
    config.update(overrides)
    return MAE(**config)


def test_feed_forward_shape():
    assert FeedForward(dim=16, hidden_dim=32)(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_attention_shape_and_weights():
    attention = Attention(dim=16, heads=2, dim_head=8)
    x = torch.randn(3, 7, 16)
    out, weights = attention(x, return_attention=True)
    assert attention(x).shape == (3, 7, 16)
    assert weights.shape == (3, 2, 7, 7)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 2, 7))


def test_attention_weights_match_fused_kernel():
    attention = Attention(dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(3, 7, 16)
    explicit, _ = attention(x, return_attention=True)
    torch.testing.assert_close(attention(x), explicit, rtol=1e-5, atol=1e-5)


def test_attention_bfloat16_cpu_path_matches_float32():
    attention = Attention(dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(3, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = attention(x)
    assert low_precision.dtype == torch.bfloat16
    torch.testing.assert_close(low_precision.float(), attention(x), rtol=0.05, atol=0.05)


def test_transformer_returns_one_map_per_block():
    transformer = Transformer(dim=16, depth=3, heads=2, dim_head=8, mlp_dim=32)
    out, maps = transformer(torch.randn(2, 5, 16), return_attention=True)
    assert out.shape == (2, 5, 16)
    assert len(maps) == 3


def test_sincos_embedding_shape_dtype_and_uniqueness():
    table = sincos_position_embedding(7, 7, 64)
    assert table.shape == (49, 64)
    assert table.dtype == torch.float32
    assert len(torch.unique(table, dim=0)) == 49


def test_sincos_embedding_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(7, 7, 30)


@pytest.mark.parametrize("use_cls_token, tokens", [(True, 50), (False, 49)])
def test_vit_feature_shapes(use_cls_token, tokens):
    vit = ViT(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64, use_cls_token=use_cls_token)
    images = torch.rand(2, 1, 28, 28)
    assert vit.forward_features(images).shape == (2, tokens, 32)
    assert vit(images).shape == (2, 32)


def test_vit_classifier_head_shape():
    vit = ViT(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64, num_classes=10)
    assert vit(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_vit_attention_maps():
    vit = ViT(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)
    maps = vit.attention_maps(torch.rand(2, 1, 28, 28))
    assert len(maps) == 2
    assert maps[0].shape == (2, 2, 50, 50)


@pytest.mark.parametrize("image_size, patch_size", [(28, 5), (28, 3), ((28, 30), 4)])
def test_vit_patch_size_must_divide_image(image_size, patch_size):
    with pytest.raises(ValueError, match="does not divide") as error:
        ViT(image_size=image_size, patch_size=patch_size)
    assert str(patch_size) in str(error.value)


def test_vit_rejects_images_of_another_size():
    vit = ViT(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\).*\(2, 1, 32, 32\)"):
        vit(torch.rand(2, 1, 32, 32))


def test_vit_rejects_wrong_channel_count():
    vit = ViT(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)
    with pytest.raises(ValueError, match="channels"):
        vit(torch.rand(2, 3, 28, 28))


def test_patchify_round_trip():
    vit = ViT(image_size=(8, 12), patch_size=4, channels=3, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)
    images = torch.rand(2, 3, 8, 12)
    patches = vit.patchify(images)
    assert patches.shape == (2, 6, 48)
    torch.testing.assert_close(vit.unpatchify(patches), images)


@pytest.mark.parametrize(
    "num_patches, ratio, hidden",
    [(16, 0.75, 12), (49, 0.75, 37), (49, 0.5, 25), (64, 0.9, 58), (4, 0.0, 0), (49, 0.95, 47)],
)
def test_random_masking_exact_counts(num_patches, ratio, hidden):
    patch_mask = random_masking(5, num_patches, ratio, "cpu")
    assert patch_mask.mask.sum(dim=1).tolist() == [hidden] * 5
    assert patch_mask.keep_indices.shape == (5, num_patches - hidden)


def test_random_masking_formula():
    for num_patches in (4, 16, 49, 196):
        for step in range(0, 19):
            ratio = step * 0.05
            visible = int(num_patches * (1 - ratio))
            if visible < 1:
                continue
            assert count_visible_patches(num_patches, ratio) == visible


def test_mask_marks_exactly_the_hidden_patches():
    patch_mask = random_masking(4, 16, 0.75, "cpu")
    for row in range(4):
        visible = set(patch_mask.keep_indices[row].tolist())
        hidden = {index for index in range(16) if patch_mask.mask[row, index] == 1}
        assert visible.isdisjoint(hidden)
        assert visible | hidden == set(range(16))


def test_masks_differ_across_images_and_calls_without_generator():
    first = random_masking(8, 49, 0.75, "cpu").mask
    second = random_masking(8, 49, 0.75, "cpu").mask
    assert not torch.equal(first, second)
    assert len(torch.unique(first, dim=0)) > 1


def test_masks_equal_with_equal_generators():
    first = random_masking(8, 49, 0.75, "cpu", torch.Generator().manual_seed(3))
    second = random_masking(8, 49, 0.75, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.keep_indices, second.keep_indices)


def test_restore_indices_put_visible_patches_back():
    patches = torch.arange(16.0).view(1, 16, 1).expand(3, 16, 1)
    patch_mask = random_masking(3, 16, 0.5, "cpu")
    shuffled_order = torch.argsort(patch_mask.restore_indices, dim=1)
    shuffled = torch.gather(patches, 1, shuffled_order.unsqueeze(-1))
    restored = torch.gather(shuffled, 1, patch_mask.restore_indices.unsqueeze(-1))
    assert torch.equal(restored, patches)
    kept = torch.gather(patches, 1, patch_mask.keep_indices.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(kept, patch_mask.keep_indices.float())


def test_decoder_places_encoded_tokens_at_their_patches():
    decoder = Decoder(grid_size=(2, 2), encoder_dim=4, patch_dim=4, has_cls_token=False, dim=4, depth=0)
    decoder.project = torch.nn.Identity()
    decoder.transformer = torch.nn.Identity()
    decoder.to_pixels = torch.nn.Identity()
    decoder.pos_embedding.zero_()
    decoder.mask_token.data.fill_(-1.0)
    patch_mask = random_masking(2, 4, 0.5, "cpu", torch.Generator().manual_seed(0))
    encoded = patch_mask.keep_indices.float().unsqueeze(-1).expand(-1, -1, 4)  # token value = its patch index
    output = decoder(encoded, patch_mask.restore_indices)[..., 0]  # [B, N]
    for row in range(2):
        for patch in range(4):
            expected = -1.0 if patch_mask.mask[row, patch] == 1 else float(patch)
            assert output[row, patch].item() == expected


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan")])
def test_invalid_masking_ratio_raises(ratio):
    with pytest.raises(ValueError, match="masking_ratio"):
        random_masking(2, 16, ratio, "cpu")


def test_ratio_leaving_no_visible_patch_raises():
    with pytest.raises(ValueError, match="hides all 16 patches"):
        random_masking(2, 16, 0.95, "cpu")


def test_mae_rejects_invalid_ratio_at_construction_and_per_call():
    with pytest.raises(ValueError, match="masking_ratio"):
        small_mae(masking_ratio=1.0)
    with pytest.raises(ValueError, match="masking_ratio"):
        small_mae()(torch.rand(2, 1, 28, 28), masking_ratio=-0.1)


def test_mae_output_shapes():
    output = small_mae()(torch.rand(3, 1, 28, 28))
    assert output.predictions.shape == (3, 49, 16)
    assert output.mask.shape == (3, 49)
    assert output.loss.shape == ()
    assert output.mask.sum().item() == 3 * 37


def test_mae_per_call_ratio_overrides_default():
    output = small_mae()(torch.rand(2, 1, 28, 28), masking_ratio=0.5)
    assert output.mask.sum(dim=1).tolist() == [25, 25]


def test_mae_cls_token_never_masked():
    model = small_mae()
    seen = {}

    def record(module, inputs, output):
        seen["tokens"] = inputs[0]

    model.encoder.transformer.register_forward_hook(record)
    model(torch.rand(2, 1, 28, 28))
    assert seen["tokens"].shape[1] == 12 + 1
    cls_token = model.encoder.cls_token.expand(2, -1, -1)
    torch.testing.assert_close(seen["tokens"][:, :1], cls_token)


def test_mae_encoder_sees_only_visible_patches():
    model = small_mae(use_cls_token=False)
    images = torch.rand(1, 1, 28, 28)
    generator_seed = 5
    output = model(images, generator=torch.Generator().manual_seed(generator_seed))
    hidden = output.mask[0].bool()
    changed = images.clone()
    changed_patches = model.encoder.patchify(changed)
    changed_patches[0, hidden] = 1.0  # alter only the hidden patches
    changed = model.encoder.unpatchify(changed_patches)
    again = model(changed, generator=torch.Generator().manual_seed(generator_seed))
    torch.testing.assert_close(again.predictions, output.predictions)


def test_mae_loss_ignores_visible_predictions():
    patches = torch.rand(2, 16, 4)
    predictions = torch.rand(2, 16, 4)
    mask = random_masking(2, 16, 0.75, "cpu").mask
    base = masked_patch_mse(predictions, patches, mask)
    changed = predictions + 5.0 * (1 - mask).unsqueeze(-1)
    assert masked_patch_mse(changed, patches, mask).item() == pytest.approx(base.item())


def test_mae_loss_changes_with_hidden_predictions():
    patches = torch.rand(2, 16, 4)
    predictions = torch.rand(2, 16, 4)
    mask = random_masking(2, 16, 0.75, "cpu").mask
    base = masked_patch_mse(predictions, patches, mask)
    changed = predictions + 0.5 * mask.unsqueeze(-1)
    assert masked_patch_mse(changed, patches, mask).item() != pytest.approx(base.item())


def test_mae_loss_averages_pixels_then_hidden_patches():
    patches = torch.zeros(1, 4, 2)
    predictions = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 5.0], [0.0, 0.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    # per-patch errors 1, 2, (25 visible), 0 -> mean over hidden = 1
    assert masked_patch_mse(predictions, patches, mask).item() == pytest.approx(1.0)


def test_mae_loss_zero_when_nothing_masked():
    output = small_mae()(torch.rand(2, 1, 28, 28), masking_ratio=0.0)
    assert output.loss.item() == 0.0
    assert output.mask.sum().item() == 0


def test_mae_backward_reaches_every_parameter():
    model = small_mae()
    model(torch.rand(2, 1, 28, 28)).loss.backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert missing == []


def test_norm_pix_loss_targets_are_normalised():
    model = small_mae(norm_pix_loss=True)
    targets = model.targets(torch.rand(2, 49, 16))
    torch.testing.assert_close(targets.mean(dim=-1), torch.zeros(2, 49), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.std(dim=-1, unbiased=False), torch.ones(2, 49), atol=1e-3, rtol=0)


def test_reconstruct_undoes_norm_pix_loss():
    model = small_mae(norm_pix_loss=True)
    images = torch.rand(2, 1, 28, 28)
    patches = model.encoder.patchify(images)
    # a decoder that predicts the normalised targets exactly
    model.decoder.forward = lambda encoded, restore: model.targets(patches)
    result = model.reconstruct(images, generator=torch.Generator().manual_seed(0))
    assert result.pixel_statistics_restored
    torch.testing.assert_close(result.reconstruction, images, atol=1e-4, rtol=0)


def test_reconstruct_outputs_and_restores_mode():
    model = small_mae().train()
    images = torch.rand(3, 1, 28, 28)
    result = model.reconstruct(images, masking_ratio=0.5)
    assert model.training
    for image in (result.masked, result.reconstruction, result.pasted):
        assert image.shape == (3, 1, 28, 28)
        assert image.min() >= 0
        assert image.max() <= 1
    assert result.mask.shape == (3, 1, 28, 28)
    visible = result.mask == 0
    torch.testing.assert_close(result.pasted[visible], images[visible])
    assert not result.pixel_statistics_restored


def test_reconstruct_accepts_cpu_batch_of_other_dtype():
    model = small_mae()
    result = model.reconstruct(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    assert result.reconstruction.dtype == torch.float32


def test_everything_float32_after_to():
    model = small_mae().to("cpu")
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(tensor.dtype == torch.float32 for tensor in tensors)
    output = model(torch.rand(2, 1, 28, 28))
    assert output.predictions.dtype == torch.float32
    assert output.mask.dtype == torch.float32


def test_mae_config_rebuilds_same_architecture():
    model = small_mae(norm_pix_loss=True)
    rebuilt = MAE(**model.config)
    assert rebuilt.config == model.config
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
