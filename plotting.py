"""Figures of the notebooks: patches, loss curves, the four MAE panels, JEPA masks and evaluation plots.

Every function returns a matplotlib Figure and leaves it to the caller to
show, save or close it. `save_figure` writes a PNG and creates its folder.
"""

from pathlib import Path

import matplotlib.pyplot as plt
import torch

PANEL_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")

# colour of hidden patches in the "masked" panel (RGB in [0, 1])
HIDDEN_PATCH_COLOR = (0.55, 0.65, 0.85)


def save_figure(figure, path, dpi=120):
    """Save `figure` as an image at `path`, creating its folder, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def to_numpy_image(image):
    """Turn one image tensor (C, H, W) into an array for imshow: (H, W) grey or (H, W, 3) colour."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        return image[0].numpy()
    return image.permute(1, 2, 0).numpy()


def color_hidden_patches(masked, mask):
    """Return RGB images (B, H, W, 3) with visible pixels in grey and hidden patches in a flat colour.

    masked: (B, C, H, W) in [0, 1]; mask: (B, 1, H, W), 1 where hidden.
    """
    masked = masked.detach().float().cpu()
    if masked.shape[1] == 1:
        masked = masked.expand(-1, 3, -1, -1)
    color = torch.tensor(HIDDEN_PATCH_COLOR).view(1, 3, 1, 1)
    hidden = mask.detach().float().cpu()
    rgb = masked * (1 - hidden) + color * hidden
    return rgb.permute(0, 2, 3, 1).numpy()


def plot_patch_grid(image, patch_size, title="image cut into patches"):
    """Draw one image (C, H, W) with lines between its patches."""
    figure, axis = plt.subplots(figsize=(3, 3))
    axis.imshow(to_numpy_image(image), cmap="gray", vmin=0, vmax=1)
    height, width = image.shape[-2:]
    for position in range(patch_size, height, patch_size):
        axis.axhline(position - 0.5, color="tab:orange", linewidth=0.8)
    for position in range(patch_size, width, patch_size):
        axis.axvline(position - 0.5, color="tab:orange", linewidth=0.8)
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])
    return figure


def plot_history(history, keys=("train_loss", "test_loss"), title="loss", ylabel="loss", log_scale=False):
    """Plot per-epoch curves from a training history, one line per key present."""
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for key in keys:
        if key in history:
            axis.plot(history["epoch"], history[key], marker="o", markersize=3, label=key.replace("_", " "))
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    if log_scale:
        axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def plot_reconstructions(images, reconstruction, labels=None, class_names=None, title=None):
    """Draw the four panels (original, masked, reconstruction, reconstruction + visible) for a batch.

    images: (B, C, H, W) originals; reconstruction: a `classes.Reconstruction`
    of the same batch. One column per image, one row per panel. When the model
    was trained with normalised pixel targets, the title notes that the panels
    were mapped back to pixels with each patch's own statistics.
    """
    rows = [
        [to_numpy_image(image) for image in images],
        list(color_hidden_patches(reconstruction.masked, reconstruction.mask)),
        [to_numpy_image(image) for image in reconstruction.reconstruction],
        [to_numpy_image(image) for image in reconstruction.pasted],
    ]
    count = len(images)
    figure, axes = plt.subplots(4, count, figsize=(1.3 * count + 1.2, 5.6), squeeze=False)
    for row, (panel_title, panel_images) in enumerate(zip(PANEL_TITLES, rows)):
        for column, image in enumerate(panel_images):
            axis = axes[row, column]
            axis.imshow(image, cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(panel_title, fontsize=8)
            if row == 0 and labels is not None:
                label = int(labels[column])
                axis.set_title(class_names[label] if class_names else str(label), fontsize=8)

    heading = title or "MAE reconstructions"
    if reconstruction.pixel_statistics_restored:
        heading += "\n(normalised-pixel predictions mapped back with each patch's true mean and std)"
    figure.suptitle(heading, fontsize=10)
    figure.tight_layout()
    return figure


def plot_mse_by_ratio(ratios, errors, title="test masked-patch MSE by masking ratio"):
    """Plot masked-patch MSE against masking ratio; `errors` maps a name to a list of MSEs."""
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, values in errors.items():
        axis.plot(ratios, values, marker="o", markersize=3, label=name)
    axis.set_xlabel("masking ratio")
    axis.set_ylabel("MSE over hidden patches")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def plot_jepa_masks(jepa, images, seed=0):
    """Draw, for each image, the context the JEPA's encoder sees and its target blocks.

    One column per image: the image with non-context patches dimmed, then one
    panel per target block with that block outlined in colour.
    """
    masks = jepa.mask_sampler.sample(len(images), torch.Generator().manual_seed(seed))
    grid_height, grid_width = jepa.context_encoder.grid_size
    patch_height, patch_width = jepa.context_encoder.patch_size
    num_targets = masks.target_indices.shape[1]
    figure, axes = plt.subplots(1 + num_targets, len(images), figsize=(1.4 * len(images) + 1, 1.4 * (1 + num_targets)),
                                squeeze=False)
    colors = plt.cm.tab10.colors
    for column, image in enumerate(images):
        picture = to_numpy_image(image)
        context = torch.zeros(grid_height * grid_width)
        context[masks.context_indices[column]] = 1.0
        shade = context.view(grid_height, grid_width).repeat_interleave(patch_height, 0).repeat_interleave(patch_width, 1)
        axes[0, column].imshow(picture * (0.25 + 0.75 * shade.numpy()), cmap="gray", vmin=0, vmax=1)
        for block in range(num_targets):
            axis = axes[1 + block, column]
            axis.imshow(picture, cmap="gray", vmin=0, vmax=1)
            for index in masks.target_indices[column, block].tolist():
                row, col = divmod(index, grid_width)
                axis.add_patch(plt.Rectangle((col * patch_width - 0.5, row * patch_height - 0.5), patch_width,
                                             patch_height, color=colors[block % len(colors)], alpha=0.55))
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0, 0].set_ylabel("context", fontsize=8)
    for block in range(num_targets):
        axes[1 + block, 0].set_ylabel(f"target {block + 1}", fontsize=8)
    figure.suptitle("JEPA masks: the context (bright) and the target blocks to predict", fontsize=10)
    figure.tight_layout()
    return figure


def plot_feature_map(points, labels, class_names, title="test features"):
    """Scatter 2-D points (N, 2), one colour per class, with a legend of class names."""
    points, labels = points.detach().cpu(), labels.detach().cpu()
    figure, axis = plt.subplots(figsize=(6, 5))
    colors = plt.cm.tab10.colors
    for label, name in enumerate(class_names):
        chosen = labels == label
        axis.scatter(points[chosen, 0], points[chosen, 1], s=2, alpha=0.5, color=colors[label % 10], label=name)
    axis.set_xlabel("first principal component")
    axis.set_ylabel("second principal component")
    axis.set_title(title)
    axis.legend(markerscale=5, fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def plot_confusion_matrix(matrix, class_names, title="confusion matrix"):
    """Draw a confusion matrix of counts (rows: true class, columns: predicted class)."""
    matrix = matrix.detach().cpu()
    figure, axis = plt.subplots(figsize=(6, 5.2))
    image = axis.imshow(matrix, cmap="Blues")
    size = len(class_names)
    axis.set_xticks(range(size), class_names, rotation=45, ha="right", fontsize=7)
    axis.set_yticks(range(size), class_names, fontsize=7)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    threshold = matrix.max().item() / 2
    for row in range(size):
        for column in range(size):
            count = int(matrix[row, column])
            axis.text(column, row, str(count), ha="center", va="center", fontsize=6,
                      color="white" if count > threshold else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title(title)
    figure.tight_layout()
    return figure


def plot_jepa_history(history, collapse_threshold):
    """Draw the JEPA's loss and its embedding spread side by side, with the collapse threshold marked."""
    figure, (loss_axis, spread_axis) = plt.subplots(1, 2, figsize=(10, 3.2))
    for key in ("train_loss", "test_loss"):
        loss_axis.plot(history["epoch"], history[key], marker="o", markersize=3, label=key.replace("_", " "))
    loss_axis.set_title("JEPA: smooth-L1 loss on target embeddings")
    loss_axis.set_ylabel("loss")
    for key in ("train_target_std", "test_target_std"):
        if key in history:
            spread_axis.plot(history["epoch"], history[key], marker="o", markersize=3,
                             label=key.replace("_target_std", "").replace("_", " "))
    spread_axis.axhline(collapse_threshold, color="tab:red", linestyle="--", linewidth=1,
                        label=f"collapse warning ({collapse_threshold})")
    spread_axis.set_title("embedding spread: std across the batch")
    spread_axis.set_ylabel("standard deviation")
    for axis in (loss_axis, spread_axis):
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return figure
