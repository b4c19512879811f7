"""Property-based tests: random valid MAE configurations train, random invalid ones raise ValueError."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classes import MAE

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_configs(draw):
    patch_height = draw(st.integers(1, 6))
    patch_width = draw(st.integers(1, 6))
    grid_height = draw(st.integers(1, 5))
    grid_width = draw(st.integers(1, 5))
    num_patches = grid_height * grid_width
    ratio = draw(st.floats(0.0, 1.0, exclude_max=True))
    if int(num_patches * (1 - ratio)) < 1:
        ratio = 0.0
    return dict(
        image_size=(grid_height * patch_height, grid_width * patch_width),
        patch_size=(patch_height, patch_width),
        channels=draw(st.integers(1, 3)),
        dim=4 * draw(st.integers(1, 8)),
        depth=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 3)),
        dim_head=draw(st.integers(1, 8)),
        mlp_dim=draw(st.integers(1, 24)),
        use_cls_token=draw(st.booleans()),
        decoder_dim=4 * draw(st.integers(1, 6)),
        decoder_depth=draw(st.integers(1, 2)),
        decoder_heads=draw(st.integers(1, 2)),
        decoder_dim_head=draw(st.integers(1, 8)),
        decoder_mlp_dim=draw(st.integers(1, 16)),
        masking_ratio=ratio,
        norm_pix_loss=draw(st.booleans()),
    )


@SETTINGS
@given(config=valid_configs(), batch_size=st.integers(1, 3))
def test_valid_config_trains_with_finite_loss(config, batch_size):
    model = MAE(**config)
    height, width = config["image_size"]
    images = torch.rand(batch_size, config["channels"], height, width)
    output = model(images)
    output.loss.backward()

    num_patches = model.encoder.num_patches
    patch_pixels = config["channels"] * config["patch_size"][0] * config["patch_size"][1]
    hidden = num_patches - int(num_patches * (1 - config["masking_ratio"]))
    assert math.isfinite(output.loss.item())
    assert output.predictions.shape == (batch_size, num_patches, patch_pixels)
    assert output.mask.shape == (batch_size, num_patches)
    assert output.mask.sum(dim=1).tolist() == [hidden] * batch_size
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


INVALID_CHANGES = {
    "patch size not dividing the image": lambda draw: dict(image_size=draw(st.sampled_from([29, 30, 31])), patch_size=4),
    "masking ratio of 1 or more": lambda draw: dict(masking_ratio=draw(st.floats(1.0, 10.0))),
    "negative masking ratio": lambda draw: dict(masking_ratio=draw(st.floats(-10.0, -1e-6))),
    "ratio hiding every patch": lambda draw: dict(image_size=8, patch_size=4, masking_ratio=draw(st.floats(0.76, 0.99))),
    "width not divisible by 4": lambda draw: dict(dim=draw(st.sampled_from([2, 5, 6, 7, 10]))),
    "decoder width not divisible by 4": lambda draw: dict(decoder_dim=draw(st.sampled_from([3, 6, 9]))),
    "non-positive size": lambda draw: {
        draw(st.sampled_from(["dim", "heads", "dim_head", "mlp_dim", "channels", "decoder_heads", "decoder_mlp_dim"])):
            draw(st.integers(-5, 0))
    },
    "negative depth": lambda draw: {draw(st.sampled_from(["depth", "decoder_depth"])): draw(st.integers(-5, -1))},
    "non-integer size": lambda draw: {draw(st.sampled_from(["dim", "depth", "patch_size"])): draw(st.sampled_from([4.5, "4", None]))},
    "image size of zero": lambda draw: dict(image_size=(0, 28)),
}


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(sorted(INVALID_CHANGES)))
def test_invalid_config_raises_value_error(data, kind):
    config = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, decoder_dim=16, decoder_depth=1,
                  decoder_heads=2, decoder_dim_head=8, decoder_mlp_dim=32)
    config.update(INVALID_CHANGES[kind](data.draw))
    with pytest.raises(ValueError):
        MAE(**config)


@SETTINGS
@given(
    channels=st.integers(1, 4),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
)
def test_images_of_another_shape_raise_value_error(channels, height, width):
    model = MAE(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, decoder_dim=16, decoder_depth=1,
                decoder_heads=2, decoder_dim_head=8, decoder_mlp_dim=32)
    images = torch.rand(2, channels, height, width)
    if (channels, height, width) == (1, 28, 28):
        assert model(images).predictions.shape == (2, 49, 16)
        return
    with pytest.raises(ValueError, match="expected images of shape"):
        model(images)
