"""Tests of the mask-ratio redraw function and the widget panel, without a browser."""

import matplotlib.pyplot as plt
import pytest
import torch

from slider import MaskRatioExplorer, draw_reconstructions
from test_classes import small_mae


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return small_mae().eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_redraw_gives_one_figure_and_leaves_none_open(model, images, ratio):
    plt.close("all")
    figure, mse = draw_reconstructions(model, images[:8], ratio)
    assert plt.get_fignums() == [figure.number]
    assert mse > 0
    plt.close(figure)
    assert plt.get_fignums() == []


def test_redraw_at_ratio_zero_has_zero_error(model, images):
    figure, mse = draw_reconstructions(model, images[:8], 0.0)
    plt.close(figure)
    assert mse == 0.0


def test_equal_seeds_give_equal_masks(model, images):
    first = model.reconstruct(images[:8], 0.5, torch.Generator().manual_seed(4))
    second = model.reconstruct(images[:8], 0.5, torch.Generator().manual_seed(4))
    other = model.reconstruct(images[:8], 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.pasted, second.pasted)
    assert not torch.equal(first.mask, other.mask)


def test_slider_bounds_step_and_update_mode(model, images):
    explorer = MaskRatioExplorer(model, images)
    assert explorer.ratio.min == 0.0
    assert explorer.ratio.max == 0.95
    assert explorer.ratio.step == 0.05
    assert explorer.ratio.continuous_update is False
    assert explorer.image_set.continuous_update is False


def test_every_slider_value_leaves_a_visible_patch(model, images):
    explorer = MaskRatioExplorer(model, images)
    steps = round((explorer.ratio.max - explorer.ratio.min) / explorer.ratio.step)
    for step in range(steps + 1):
        ratio = explorer.ratio.min + step * explorer.ratio.step
        output = model(images[:2], masking_ratio=ratio)
        assert (output.mask == 0).sum(dim=1).min() >= 1


def test_five_slider_changes_leave_one_picture(model, images):
    plt.close("all")
    explorer = MaskRatioExplorer(model, images)
    for ratio in (0.1, 0.3, 0.5, 0.7, 0.9):
        explorer.ratio.value = ratio
    assert explorer.redraw_count == 5
    assert len(explorer.output.outputs) == 1
    assert plt.get_fignums() == []
    assert "0.90" in explorer.mse.value


def test_new_mask_button_changes_the_seed(model, images):
    explorer = MaskRatioExplorer(model, images)
    explorer.redraw()
    seed, first_mse = explorer.seed, explorer.last_mse
    explorer.new_mask.click()
    assert explorer.seed == seed + 1
    assert explorer.last_mse != first_mse
    assert len(explorer.output.outputs) == 1


def test_image_set_selects_other_images(model, images):
    explorer = MaskRatioExplorer(model, images, labels=torch.arange(24))
    explorer.image_set.value = 2
    shown, labels = explorer.shown_images()
    assert torch.equal(shown, images[16:24])
    assert labels.tolist() == list(range(16, 24))
    assert explorer.image_set.max == 2


def test_too_few_images_raise(model, images):
    with pytest.raises(ValueError, match="images_per_view"):
        MaskRatioExplorer(model, images[:4])
