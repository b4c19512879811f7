"""An interactive mask-ratio slider for a trained MAE, and the redraw function behind it.

`draw_reconstructions` makes one four-panel figure at a given masking ratio
and mask seed; it needs no browser. `MaskRatioExplorer` wraps it in an
ipywidgets panel: a slider for the ratio, a button for a new random mask and
a slider that picks which test images are shown. Every change redraws the
figure into one Output widget, replacing the previous picture.
"""

import base64
import io
import os

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from plotting import plot_reconstructions

HEADLESS_VARIABLE = "MIM_HEADLESS"


def draw_reconstructions(model, images, masking_ratio, seed=0, labels=None, class_names=None):
    """Reconstruct `images` at `masking_ratio` with masks drawn from `seed` and return (figure, mse).

    The model runs in eval mode without gradients on its own device; the
    images may be on any device. `mse` is the masked-patch MSE of these
    images at this ratio (0.0 when nothing is hidden). The caller owns the
    figure and should close it.
    """
    generator = torch.Generator().manual_seed(seed)
    reconstruction = model.reconstruct(images, masking_ratio=masking_ratio, generator=generator)
    title = f"masking ratio {masking_ratio:.2f}: masked-patch MSE {reconstruction.loss:.4f}"
    figure = plot_reconstructions(images, reconstruction, labels, class_names, title=title)
    return figure, reconstruction.loss


def figure_output(figure):
    """Render `figure` as a PNG display output, the form an Output widget stores."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return {
        "output_type": "display_data",
        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"), "text/plain": repr(figure)},
        "metadata": {},
    }


class MaskRatioExplorer:
    """Widgets to change the masking ratio, the mask and the images, and watch the MAE fill in.

    The ratio slider runs from 0.0 to 0.95 in steps of 0.05 and redraws only
    when released (`continuous_update=False`), so dragging never queues a
    backlog of redraws. Each redraw replaces the Output widget's picture in
    one update, so the pictures swap without flicker, and closes its figure,
    so neither the cell nor matplotlib's figure list grows.
    """

    def __init__(self, model, images, labels=None, class_names=None, masking_ratio=0.75, images_per_view=8, seed=0):
        if len(images) < images_per_view:
            raise ValueError(f"need at least images_per_view={images_per_view} images; got {len(images)}")
        self.model = model
        self.images = images
        self.labels = labels
        self.class_names = class_names
        self.images_per_view = images_per_view
        self.seed = seed
        self.last_mse = None
        self.redraw_count = 0

        self.ratio = widgets.FloatSlider(
            value=masking_ratio,
            min=0.0,
            max=0.95,
            step=0.05,
            continuous_update=False,
            readout_format=".2f",
            description="mask ratio",
        )
        self.new_mask = widgets.Button(description="new random mask", icon="refresh")
        self.image_set = widgets.IntSlider(
            value=0,
            min=0,
            max=len(images) // images_per_view - 1,
            continuous_update=False,
            description="image set",
        )
        self.mse = widgets.HTML()
        self.output = widgets.Output()

        self.ratio.observe(self._on_change, names="value")
        self.image_set.observe(self._on_change, names="value")
        self.new_mask.on_click(self._on_new_mask)
        self.panel = widgets.VBox(
            [widgets.HBox([self.ratio, self.new_mask, self.image_set]), self.mse, self.output]
        )

    def shown_images(self):
        """Return the images (and labels) of the current image set."""
        start = self.image_set.value * self.images_per_view
        end = start + self.images_per_view
        labels = self.labels[start:end] if self.labels is not None else None
        return self.images[start:end], labels

    def _on_change(self, change):
        self.redraw()

    def _on_new_mask(self, button):
        self.seed += 1
        self.redraw()

    def redraw(self):
        """Draw the current images at the current ratio and mask seed into the Output widget."""
        images, labels = self.shown_images()
        figure, mse = draw_reconstructions(
            self.model, images, self.ratio.value, self.seed, labels, self.class_names
        )
        self.last_mse = mse
        self.mse.value = (
            f"masked-patch MSE of these {len(images)} images at ratio "
            f"{self.ratio.value:.2f}: <b>{mse:.4f}</b> (mask seed {self.seed})"
        )
        # one assignment swaps the old picture for the new one, as clear_output(wait=True)
        # followed by display would, and works the same with or without a live kernel
        self.output.outputs = (figure_output(figure),)
        plt.close(figure)
        self.redraw_count += 1

    def show(self):
        """Display the panel with a first picture.

        When `$MIM_HEADLESS` is set (the Makefile sets it when it executes a
        notebook), a static copy of the first picture is displayed as well,
        so the saved notebook shows a figure where no kernel runs the widgets.
        """
        self.redraw()
        display(self.panel)
        if os.environ.get(HEADLESS_VARIABLE):
            images, labels = self.shown_images()
            figure, _ = draw_reconstructions(
                self.model, images, self.ratio.value, self.seed, labels, self.class_names
            )
            display(figure)
            plt.close(figure)
