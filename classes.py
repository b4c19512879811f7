"""Vision Transformer, Masked Autoencoder and I-JEPA models, written from scratch.

- `ViT`: the Vision Transformer of Dosovitskiy et al. 2021, "An Image is Worth
  16x16 Words", with fixed 2-D sine-cosine position embeddings.
- `MAE`: the Masked Autoencoder of He et al. 2022, "Masked Autoencoders Are
  Scalable Vision Learners": the encoder sees only the visible patches and a
  light `Decoder` predicts the pixels of the hidden ones.
- `JEPA`: I-JEPA of Assran et al. 2023, "Self-Supervised Learning from Images
  with a Joint-Embedding Predictive Architecture": a `Predictor` predicts the
  embeddings that a slowly moving target encoder gives to hidden blocks, with
  blocks drawn by `MultiBlockMaskSampler`. `PixelDecoder` renders those
  embeddings as pixels for figures.

Images are float32 tensors of shape (B, C, H, W) with values in [0, 1].
Shapes in comments use B for the batch, N for the number of patches, T for the
number of tokens a transformer sees, D for a width and P for the pixel values
in one patch (channels * patch_height * patch_width).
"""

import copy
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn


def pair(value, name="size"):
    """Return `value` as a (height, width) tuple of positive ints; one int means a square."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair; got {value!r}")
    for item in values:
        check_int(name, item, minimum=1)
    return values


def check_int(name, value, minimum=1):
    """Raise ValueError unless `value` is an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}; got {value!r}")


def check_dropout(value):
    """Raise ValueError unless `value` is a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"dropout must be in [0, 1); got {value!r}")


def check_transformer_sizes(prefix="", **sizes):
    """Raise ValueError naming the first of `sizes` (depth may be 0, the rest at least 1) that is invalid."""
    for name, value in sizes.items():
        check_int(prefix + name, value, minimum=0 if name == "depth" else 1)


def sincos_position_embedding(grid_height, grid_width, dim):
    """Build fixed 2-D sine-cosine position embeddings, one row per patch.

    A quarter of the features encode the row and a quarter the column, each as
    sin and cos at `dim / 4` frequencies from 1 down to 1/10000. Built in
    float32, so the table is valid on Apple MPS, which has no float64.

    Returns a float32 tensor of shape (grid_height * grid_width, dim), rows in
    row-major patch order.
    """
    if dim % 4 != 0:
        raise ValueError(
            f"dim must be divisible by 4 for 2-D sine-cosine position embeddings; got {dim}"
        )
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float32),
        torch.arange(grid_width, dtype=torch.float32),
        indexing="ij",
    )
    row_angles = rows.reshape(-1, 1) * frequencies  # [N, D/4]
    col_angles = cols.reshape(-1, 1) * frequencies  # [N, D/4]
    return torch.cat(
        [row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1
    )  # [N, D]


def init_weights(module):
    """Initialise linear layers with Xavier-uniform weights and zero biases, as the MAE does."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class FeedForward(nn.Module):
    """Pre-norm two-layer MLP of a transformer block: LayerNorm, Linear, GELU, Linear.

    x: (B, T, dim) -> (B, T, dim)
    """

    def __init__(self, *, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with one fused query-key-value projection.

    x: (B, T, dim) -> (B, T, dim). The attention itself runs in
    `torch.nn.functional.scaled_dot_product_attention`, which picks a fused
    kernel, except for bfloat16 on a CPU, where the explicit softmax form is
    faster. With `return_attention=True` the weights are computed explicitly,
    for plots, and returned as a second output of shape (B, heads, T, T).
    """

    def __init__(self, *, dim, heads=4, dim_head=32, dropout=0.0):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner_dim)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x, return_attention=False):
        x = self.norm(x)

        # one matrix multiply for queries, keys and values of every head
        qkv = self.to_qkv(x)  # [B, T, 3 * heads * dim_head]
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.heads)

        dropout = self.dropout if self.training else 0.0
        if return_attention:
            weights = attention_weights(q, k)  # [B, heads, T, T]
            out = weights @ v
        elif q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # NOTE: in PyTorch 2.14 the CPU kernel of scaled_dot_product_attention
            # ran 3 to 7 times slower in bfloat16 than this explicit form for
            # sequences of 13 to 50 tokens (measured on a 2-core AMD EPYC)
            out = F.dropout(attention_weights(q, k), dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # [B, heads, T, d]

        out = self.to_out(rearrange(out, "b h t d -> b t (h d)"))  # [B, T, dim]
        if return_attention:
            return out, weights
        return out


def attention_weights(q, k):
    """Return softmax(q k^T / sqrt(d)): (B, heads, T, d) x 2 -> (B, heads, T, T)."""
    scale = q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)


class Transformer(nn.Module):
    """A stack of pre-norm blocks (attention, then MLP, each with a residual) and a final LayerNorm.

    x: (B, T, dim) -> (B, T, dim). With `return_attention=True` it also returns
    the list of attention weights of every block, each (B, heads, T, T).
    """

    def __init__(self, *, dim, depth, heads, dim_head, mlp_dim, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Attention(dim=dim, heads=heads, dim_head=dim_head, dropout=dropout),
                    FeedForward(dim=dim, hidden_dim=mlp_dim, dropout=dropout),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, return_attention=False):
        attention_maps = []
        for attention, feed_forward in self.layers:
            if return_attention:
                update, weights = attention(x, return_attention=True)
                attention_maps.append(weights)
            else:
                update = attention(x)
            x = x + update
            x = x + feed_forward(x)
        x = self.norm(x)
        if return_attention:
            return x, attention_maps
        return x


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021) with fixed sine-cosine positions.

    The image is cut into non-overlapping patches, each patch is flattened and
    projected to `dim` features, the 2-D position embedding is added, an
    optional cls token is prepended, and a `Transformer` mixes the tokens.

    - `forward(img)`: (B, C, H, W) -> logits (B, num_classes) when the model has
      a head, else the pooled features (B, dim).
    - `forward_features(img)`: (B, C, H, W) -> all tokens (B, 1 + N, dim) with the
      cls token first, or (B, N, dim) without one.
    - `encode(patches, keep_indices)`: the same from flattened patches, keeping
      only the patches listed in `keep_indices`; this is what the MAE and the
      JEPA context encoder call.

    `pool="mean"` averages the patch tokens; `pool="cls"` takes the cls token.
    `num_classes=None` builds an encoder without a classification head.
    `pixel_mean` and `pixel_std` standardise the pixels inside the model
    (for MNIST 0.1307 and 0.3081), so images stay in [0, 1] everywhere else.
    """

    fixed_shapes = True  # every batch of one size has the same tensor shapes (see training.resolve_compile)

    def __init__(
        self,
        *,
        image_size=28,
        patch_size=4,
        channels=1,
        dim=128,
        depth=4,
        heads=4,
        dim_head=32,
        mlp_dim=512,
        num_classes=None,
        use_cls_token=True,
        pool="mean",
        dropout=0.0,
        pixel_mean=0.0,
        pixel_std=1.0,
    ):
        super().__init__()
        image_height, image_width = pair(image_size, "image_size")
        patch_height, patch_width = pair(patch_size, "patch_size")
        check_int("channels", channels)
        check_transformer_sizes(dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim)
        check_dropout(dropout)
        if num_classes is not None:
            check_int("num_classes", num_classes)
        if not pixel_std > 0:
            raise ValueError(f"pixel_std must be positive; got {pixel_std!r}")
        if image_height % patch_height != 0 or image_width % patch_width != 0:
            raise ValueError(
                f"patch size {patch_height}x{patch_width} does not divide image size "
                f"{image_height}x{image_width}; choose a patch size whose sides divide the image's"
            )
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls'; got {pool!r}")
        if pool == "cls" and not use_cls_token:
            raise ValueError("pool='cls' needs a cls token; set use_cls_token=True or pool='mean'")

        self.image_size = (image_height, image_width)
        self.patch_size = (patch_height, patch_width)
        self.channels = channels
        self.grid_size = (image_height // patch_height, image_width // patch_width)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_dim = channels * patch_height * patch_width
        self.dim = dim
        self.pool = pool
        self.use_cls_token = use_cls_token
        self.config = dict(
            image_size=image_size,
            patch_size=patch_size,
            channels=channels,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            mlp_dim=mlp_dim,
            num_classes=num_classes,
            use_cls_token=use_cls_token,
            pool=pool,
            dropout=dropout,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std

        self.to_patches = Rearrange(
            "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_height, p2=patch_width
        )
        self.from_patches = Rearrange(
            "b (h w) (p1 p2 c) -> b c (h p1) (w p2)",
            h=self.grid_size[0],
            p1=patch_height,
            p2=patch_width,
        )
        self.patch_embedding = nn.Linear(self.patch_dim, dim)
        self.register_buffer(
            "pos_embedding", sincos_position_embedding(*self.grid_size, dim), persistent=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls_token else None
        self.transformer = Transformer(
            dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout
        )
        self.head = nn.Linear(dim, num_classes) if num_classes is not None else None

        self.apply(init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    @property
    def input_shape(self):
        """The (channels, height, width) of the images the model was built for."""
        return (self.channels, *self.image_size)

    def patchify(self, img):
        """Cut images into flattened patches: (B, C, H, W) -> (B, N, P).

        Raises ValueError if the images do not have the shape the model was built for.
        """
        expected = self.input_shape
        if img.dim() != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(channels, height, width), got {tuple(img.shape)}; resize the images or build "
                f"the model with image_size={tuple(img.shape[-2:])} and channels matching the data"
            )
        return self.to_patches(img)

    def unpatchify(self, patches):
        """Reassemble flattened patches into images: (B, N, P) -> (B, C, H, W)."""
        return self.from_patches(patches)

    def encode(self, patches, keep_indices=None):
        """Embed patches, keep those in `keep_indices`, and run the transformer.

        patches: (B, N, P). keep_indices: (B, n) patch indices or None for all.
        Returns (B, 1 + n, dim) with the cls token first, or (B, n, dim) without one.
        """
        positions = self.pos_embedding  # [N, D]
        if keep_indices is not None:
            # gather the raw patches (P values each) before the projection to D
            index = keep_indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
            patches = torch.gather(patches, 1, index)  # [B, n, P]
            positions = positions[keep_indices]  # [B, n, D]
        # standardise the pixels, so that a patch's content weighs as much as its position
        patches = (patches - self.pixel_mean) / self.pixel_std
        tokens = self.patch_embedding(patches) + positions  # [B, n, D]

        if self.cls_token is not None:
            cls_tokens = self.cls_token.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls_tokens, tokens], dim=1)  # [B, 1 + n, D]
        return self.transformer(tokens)

    def forward_features(self, img):
        """Return every output token: (B, C, H, W) -> (B, [1 +] N, dim)."""
        return self.encode(self.patchify(img))

    def pool_tokens(self, tokens):
        """Pool transformer outputs to one vector per image: (B, [1 +] N, dim) -> (B, dim)."""
        if self.pool == "cls":
            return tokens[:, 0]
        patch_tokens = tokens[:, 1:] if self.cls_token is not None else tokens
        return patch_tokens.mean(dim=1)

    def forward(self, img):
        pooled = self.pool_tokens(self.forward_features(img))  # [B, D]
        if self.head is None:
            return pooled
        return self.head(pooled)  # [B, num_classes]

    def attention_maps(self, img):
        """Return the attention weights of every block, each (B, heads, T, T), for plots."""
        patches = (self.patchify(img) - self.pixel_mean) / self.pixel_std
        tokens = self.patch_embedding(patches) + self.pos_embedding
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        _, maps = self.transformer(tokens, return_attention=True)
        return maps


class Decoder(nn.Module):
    """The MAE's light decoder: fills the hidden positions with a mask token and predicts pixels.

    It projects the encoder's tokens to its own width, appends one shared,
    learned mask token per hidden patch, puts every token back at its patch's
    position, adds its own sine-cosine position embedding and runs a narrow
    `Transformer`. A linear head maps each patch token to its P pixel values.

    encoded: (B, [1 +] n_visible, encoder_dim); restore_indices: (B, N)
    -> predicted patches (B, N, P).
    """

    def __init__(
        self,
        *,
        grid_size,
        encoder_dim,
        patch_dim,
        has_cls_token,
        dim=128,
        depth=2,
        heads=4,
        dim_head=32,
        mlp_dim=512,
    ):
        super().__init__()
        self.has_cls_token = has_cls_token
        self.project = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "pos_embedding", sincos_position_embedding(*grid_size, dim), persistent=False
        )
        self.transformer = Transformer(
            dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim
        )
        self.to_pixels = nn.Linear(dim, patch_dim)

        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded, restore_indices):
        x = self.project(encoded)  # [B, T, D]
        if self.has_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        batch_size, num_patches = restore_indices.shape

        # visible tokens first, then one mask token per hidden patch, in shuffled order
        num_hidden = num_patches - x.shape[1]
        mask_tokens = self.mask_token.expand(batch_size, num_hidden, -1)
        x = torch.cat([x, mask_tokens], dim=1)  # [B, N, D]

        # undo the shuffle so that token i is patch i again
        index = restore_indices.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, index) + self.pos_embedding  # [B, N, D]

        if self.has_cls_token:
            x = torch.cat([cls_token, x], dim=1)  # [B, 1 + N, D]
        x = self.transformer(x)
        if self.has_cls_token:
            x = x[:, 1:]
        return self.to_pixels(x)  # [B, N, P]


class PatchMask(NamedTuple):
    """A random split of every image's patches into visible and hidden ones.

    keep_indices: (B, n_visible) indices of the visible patches, in shuffled order.
    mask: (B, N) float32, 1 where a patch is hidden and 0 where it is visible.
    restore_indices: (B, N) the permutation that undoes the shuffle.
    """

    keep_indices: torch.Tensor
    mask: torch.Tensor
    restore_indices: torch.Tensor


def count_visible_patches(num_patches, masking_ratio):
    """Return how many of `num_patches` stay visible at `masking_ratio`: int(N * (1 - ratio)).

    Raises ValueError unless 0 <= masking_ratio < 1 and at least one patch stays visible.
    """
    if isinstance(masking_ratio, bool) or not isinstance(masking_ratio, numbers.Real):
        raise TypeError(f"masking_ratio must be a real number; got {masking_ratio!r}")
    if not 0 <= masking_ratio < 1:
        raise ValueError(
            f"masking_ratio must be in [0, 1) so that at least one patch stays visible; "
            f"got {masking_ratio}"
        )
    num_visible = int(num_patches * (1 - masking_ratio))
    if num_visible < 1:
        max_ratio = 1 - 1 / num_patches
        raise ValueError(
            f"masking_ratio {masking_ratio} hides all {num_patches} patches; "
            f"use a ratio of at most {max_ratio:.4f} so that at least one patch stays visible"
        )
    return num_visible


# torch.compile cannot trace a torch.Generator, so masks are drawn outside compiled graphs
@torch.compiler.disable
def random_masking(batch_size, num_patches, masking_ratio, device, generator=None):
    """Draw an independent random mask for each image by sorting uniform noise.

    Exactly N - int(N * (1 - masking_ratio)) patches of each image are hidden.
    A `torch.Generator` makes the masks reproducible; without one they come from
    the global random state and differ across images and calls.
    """
    num_visible = count_visible_patches(num_patches, masking_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device)
    # sort a contiguous tensor: sort and argsort on Apple MPS have read strided
    # input in storage order (pytorch/pytorch#175187)
    noise = noise.to(device).contiguous()

    shuffle_indices = torch.argsort(noise, dim=1)  # ascending: the first num_visible are kept
    restore_indices = torch.argsort(shuffle_indices, dim=1)
    keep_indices = shuffle_indices[:, :num_visible]

    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :num_visible] = 0
    mask = torch.gather(mask, 1, restore_indices)  # [B, N] in patch order
    return PatchMask(keep_indices, mask, restore_indices)


def masked_patch_mse(predictions, targets, mask):
    """Mean squared error over hidden patches only.

    The error is averaged over the pixels of each patch, then over the hidden
    patches of the whole batch. Predictions at visible patches do not count,
    and with no hidden patch the result is 0, not NaN.
    predictions, targets: (B, N, P); mask: (B, N) with 1 = hidden.
    """
    per_patch = (predictions.float() - targets.float()).pow(2).mean(dim=-1)  # [B, N]
    hidden = mask.bool()
    total = torch.where(hidden, per_patch, torch.zeros_like(per_patch)).sum()
    return total / hidden.sum().clamp(min=1)


def normalize_patches(patches, eps=1e-6):
    """Normalise every patch to zero mean and unit variance over its own pixels.

    Returns the normalised patches, and the per-patch mean and standard
    deviation (each (B, N, 1)) that undo it.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()
    return (patches - mean) / std, mean, std


class MAEOutput(NamedTuple):
    """What `MAE.forward` returns.

    loss: scalar masked-patch MSE. predictions: (B, N, P), for every patch,
    in normalised units when `norm_pix_loss` is set. mask: (B, N), 1 = hidden.
    """

    loss: torch.Tensor
    predictions: torch.Tensor
    mask: torch.Tensor


class Reconstruction(NamedTuple):
    """Images made by `MAE.reconstruct`, each (B, C, H, W) and clipped to [0, 1].

    masked: the input with hidden patches set to 0. reconstruction: the
    decoder's prediction for every patch. pasted: the reconstruction with the
    visible patches replaced by the input's. mask: (B, 1, H, W), 1 where hidden.
    pixel_statistics_restored: True when the model was trained with
    `norm_pix_loss`, so its per-patch normalised predictions were mapped back
    to pixels with each patch's true mean and standard deviation, taken from
    the original image (hidden patches included), as He et al. do for figures.
    loss: the masked-patch MSE of this batch, in the model's loss units.
    """

    masked: torch.Tensor
    reconstruction: torch.Tensor
    pasted: torch.Tensor
    mask: torch.Tensor
    pixel_statistics_restored: bool
    loss: float


class MAE(nn.Module):
    """Masked Autoencoder (He et al. 2022) around a `ViT` encoder.

    For each image a random `masking_ratio` of the patches is hidden. The
    encoder sees only the visible patches (plus its cls token, which is never
    hidden), the `Decoder` predicts the pixels of every patch, and the loss is
    the mean squared error over the hidden patches only.

    With `norm_pix_loss=True` the target of each patch is that patch normalised
    to zero mean and unit variance, which He et al. report gives better
    representations; `reconstruct` undoes it for display.

    Every constructor argument is a plain Python value, stored in `self.config`,
    so a checkpoint can rebuild the model with `MAE(**config)`.
    """

    fixed_shapes = True  # a fixed masking ratio keeps the same number of visible patches in every batch

    def __init__(
        self,
        *,
        image_size=28,
        patch_size=4,
        channels=1,
        dim=128,
        depth=4,
        heads=4,
        dim_head=32,
        mlp_dim=512,
        use_cls_token=True,
        pixel_mean=0.0,
        pixel_std=1.0,
        decoder_dim=128,
        decoder_depth=2,
        decoder_heads=4,
        decoder_dim_head=32,
        decoder_mlp_dim=512,
        masking_ratio=0.75,
        norm_pix_loss=False,
    ):
        super().__init__()
        self.config = dict(
            image_size=image_size,
            patch_size=patch_size,
            channels=channels,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            mlp_dim=mlp_dim,
            use_cls_token=use_cls_token,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            decoder_dim_head=decoder_dim_head,
            decoder_mlp_dim=decoder_mlp_dim,
            masking_ratio=masking_ratio,
            norm_pix_loss=norm_pix_loss,
        )
        self.encoder = ViT(
            image_size=image_size,
            patch_size=patch_size,
            channels=channels,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            mlp_dim=mlp_dim,
            use_cls_token=use_cls_token,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        check_transformer_sizes(
            "decoder_",
            dim=decoder_dim,
            depth=decoder_depth,
            heads=decoder_heads,
            dim_head=decoder_dim_head,
            mlp_dim=decoder_mlp_dim,
        )
        count_visible_patches(self.encoder.num_patches, masking_ratio)
        self.masking_ratio = masking_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder = Decoder(
            grid_size=self.encoder.grid_size,
            encoder_dim=dim,
            patch_dim=self.encoder.patch_dim,
            has_cls_token=use_cls_token,
            dim=decoder_dim,
            depth=decoder_depth,
            heads=decoder_heads,
            dim_head=decoder_dim_head,
            mlp_dim=decoder_mlp_dim,
        )

    @property
    def input_shape(self):
        """The (channels, height, width) of the images the model was built for."""
        return self.encoder.input_shape

    def targets(self, patches):
        """Return the regression targets for `patches` (B, N, P): the pixels, or per-patch normalised pixels."""
        if self.norm_pix_loss:
            return normalize_patches(patches)[0]
        return patches

    def forward(self, img, masking_ratio=None, generator=None):
        """Hide patches, encode the visible ones, predict every patch, and score the hidden ones.

        img: (B, C, H, W). `masking_ratio` overrides the model's own for this
        call. Returns an `MAEOutput`.
        """
        ratio = self.masking_ratio if masking_ratio is None else masking_ratio
        patches = self.encoder.patchify(img)  # [B, N, P]
        batch_size, num_patches, _ = patches.shape
        patch_mask = random_masking(batch_size, num_patches, ratio, img.device, generator)

        encoded = self.encoder.encode(patches, patch_mask.keep_indices)  # [B, 1 + n, D]
        predictions = self.decoder(encoded, patch_mask.restore_indices)  # [B, N, P]

        loss = masked_patch_mse(predictions, self.targets(patches), patch_mask.mask)
        return MAEOutput(loss, predictions, patch_mask.mask)

    @torch.no_grad()
    def reconstruct(self, img, masking_ratio=None, generator=None):
        """Run the model in eval mode and return a `Reconstruction` of `img` for display.

        `img` may be on any device; it is moved to the model's. The model's
        train or eval mode is restored afterwards.
        """
        device = next(self.parameters()).device
        img = img.to(device=device, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            output = self(img, masking_ratio=masking_ratio, generator=generator)
        finally:
            self.train(was_training)

        patches = self.encoder.patchify(img)
        predictions = output.predictions.float()
        if self.norm_pix_loss:
            _, mean, std = normalize_patches(patches)
            predictions = predictions * std + mean
        hidden = output.mask.unsqueeze(-1)  # [B, N, 1]

        def to_image(p):
            return self.encoder.unpatchify(p).clamp(0, 1)

        patch_mask_image = hidden.expand_as(patches)
        return Reconstruction(
            masked=to_image(patches * (1 - hidden)),
            reconstruction=to_image(predictions),
            pasted=to_image(patches * (1 - hidden) + predictions * hidden),
            mask=self.encoder.unpatchify(patch_mask_image)[:, :1],
            pixel_statistics_restored=self.norm_pix_loss,
            loss=output.loss.item(),
        )


class MultiBlockMasks(NamedTuple):
    """Context and target patches of a batch, drawn by `MultiBlockMaskSampler`.

    context_indices: (B, n_context) patch indices the context encoder sees.
    target_indices: (B, num_targets, n_target) patch indices of each target block.
    """

    context_indices: torch.Tensor
    target_indices: torch.Tensor


def block_size(scale, aspect_ratio, grid_height, grid_width):
    """Return the (height, width) in patches of a block covering `scale` of the grid with height/width `aspect_ratio`."""
    area = scale * grid_height * grid_width
    height = round(math.sqrt(area * aspect_ratio))
    width = round(math.sqrt(area / aspect_ratio))
    return min(max(height, 1), grid_height), min(max(width, 1), grid_width)


class MultiBlockMaskSampler:
    """Multi-block masking of I-JEPA (Assran et al. 2023), sized for small patch grids.

    For every image it places `num_targets` rectangular target blocks and one
    context block, and removes the target patches from the context. Within a
    batch all target blocks share one size, drawn from `target_scale` (fraction
    of the grid) and `target_aspect` (height / width), and all context blocks
    share one size from `context_scale`; only the positions differ between
    images. A block's top-left corner is drawn from every position that keeps
    the block inside the grid, the last row and column included, so every
    patch can land in a target and in a context.

    The defaults suit a 7x7 grid (28x28 images, 4x4 patches): 4 targets of
    10 to 15 % of the grid each (blocks of 2x2 to 3x3 patches) and a context
    block of 85 to 100 % of the grid. Once the targets are removed and the
    batch is cut to its smallest context, 12 to 33 context patches remain
    (25 on average over 50 batches of 256). I-JEPA's own target sizes for a
    14x14 grid (15 to 20 %) leave 5 to 25 here, 14 on average.
    An image whose context is too small is redrawn at most `max_attempts`
    times, then ValueError is raised, so sampling never loops without bound.
    """

    def __init__(
        self,
        grid_size=(7, 7),
        num_targets=4,
        target_scale=(0.1, 0.15),
        target_aspect=(0.75, 1.5),
        context_scale=(0.85, 1.0),
        min_context=12,
        max_attempts=20,
    ):
        grid_height, grid_width = pair(grid_size)
        num_patches = grid_height * grid_width
        if grid_height < 1 or grid_width < 1:
            raise ValueError(f"grid_size must be positive; got {grid_size}")
        if num_targets < 1:
            raise ValueError(f"num_targets must be at least 1; got {num_targets}")
        for name, (low, high) in (("target_scale", target_scale), ("context_scale", context_scale)):
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1; got {(low, high)}")
        if not 0 < target_aspect[0] <= target_aspect[1]:
            raise ValueError(f"target_aspect must satisfy 0 < low <= high; got {target_aspect}")
        if not 1 <= min_context < num_patches:
            raise ValueError(
                f"min_context must be in [1, {num_patches - 1}] for a {grid_height}x{grid_width} grid; "
                f"got {min_context}"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1; got {max_attempts}")
        smallest_target = min(
            h * w
            for h, w in (
                block_size(target_scale[0], aspect, grid_height, grid_width) for aspect in target_aspect
            )
        )
        largest_context = round(context_scale[1] * num_patches)
        if largest_context - smallest_target < min_context:
            raise ValueError(
                f"blocks cannot fit a {grid_height}x{grid_width} grid: a context block of at most "
                f"{largest_context} patches minus one target block of at least {smallest_target} "
                f"leaves fewer than min_context={min_context} patches; lower target_scale or "
                f"min_context, or raise context_scale"
            )

        self.grid_size = (grid_height, grid_width)
        self.num_patches = num_patches
        self.num_targets = num_targets
        self.target_scale = tuple(target_scale)
        self.target_aspect = tuple(target_aspect)
        self.context_scale = tuple(context_scale)
        self.min_context = min_context
        self.max_attempts = max_attempts

    def config(self):
        """Return the sampler's parameters as plain values."""
        return dict(
            num_targets=self.num_targets,
            target_scale=self.target_scale,
            target_aspect=self.target_aspect,
            context_scale=self.context_scale,
            min_context=self.min_context,
            max_attempts=self.max_attempts,
        )

    def _uniform(self, low, high, generator):
        return low + (high - low) * torch.rand(1, generator=generator).item()

    def _place_blocks(self, count, height, width, batch_size, generator):
        """Place `count` blocks of height x width per image: (B, count, num_patches) bool."""
        grid_height, grid_width = self.grid_size
        # top-left corners range over every position that keeps the block inside the grid
        tops = torch.randint(0, grid_height - height + 1, (batch_size, count, 1, 1), generator=generator)
        lefts = torch.randint(0, grid_width - width + 1, (batch_size, count, 1, 1), generator=generator)
        rows = torch.arange(grid_height).view(1, 1, -1, 1)
        cols = torch.arange(grid_width).view(1, 1, 1, -1)
        inside = (rows >= tops) & (rows < tops + height) & (cols >= lefts) & (cols < lefts + width)
        return inside.flatten(2)  # [B, count, num_patches]

    @torch.compiler.disable
    def sample(self, batch_size, generator=None):
        """Draw masks for a batch and return `MultiBlockMasks` (index tensors on the CPU)."""
        grid_height, grid_width = self.grid_size
        scale = self._uniform(*self.target_scale, generator)
        aspect = math.exp(self._uniform(math.log(self.target_aspect[0]), math.log(self.target_aspect[1]), generator))
        target_height, target_width = block_size(scale, aspect, grid_height, grid_width)
        context_height, context_width = block_size(
            self._uniform(*self.context_scale, generator), 1.0, grid_height, grid_width
        )

        targets = torch.zeros(batch_size, self.num_targets, self.num_patches, dtype=torch.bool)
        context = torch.zeros(batch_size, self.num_patches, dtype=torch.bool)
        pending = torch.ones(batch_size, dtype=torch.bool)
        for _ in range(self.max_attempts):
            count = int(pending.sum())
            new_targets = self._place_blocks(self.num_targets, target_height, target_width, count, generator)
            new_context = self._place_blocks(1, context_height, context_width, count, generator)[:, 0]
            new_context &= ~new_targets.any(dim=1)
            targets[pending] = new_targets
            context[pending] = new_context
            pending = context.sum(dim=1) < self.min_context
            if not pending.any():
                break
        else:
            raise ValueError(
                f"could not leave min_context={self.min_context} context patches in "
                f"{self.max_attempts} attempts on a {grid_height}x{grid_width} grid with "
                f"{self.num_targets} targets of {target_height}x{target_width} and a context block "
                f"of {context_height}x{context_width}; lower num_targets, target_scale or "
                f"min_context, or raise context_scale"
            )

        # Context sizes differ between images, so every image keeps the same number of
        # context patches: the smallest count in the batch, chosen at random among its own.
        num_context = int(context.sum(dim=1).min())
        noise = torch.rand(batch_size, self.num_patches, generator=generator)
        noise[~context] = 2.0  # sorted after every context patch
        context_indices = noise.argsort(dim=1)[:, :num_context].sort(dim=1).values

        # every target block has target_height * target_width patches; argsort puts them first
        target_size = target_height * target_width
        target_indices = (~targets).to(torch.uint8).argsort(dim=2, stable=True)[:, :, :target_size]
        return MultiBlockMasks(context_indices, target_indices)


class Predictor(nn.Module):
    """The I-JEPA predictor: a narrow transformer that predicts target embeddings from the context.

    It projects the context tokens to its own width and adds the position
    embedding of each context patch, appends one learned mask token per
    target patch carrying that patch's position embedding, runs a
    `Transformer` over both, and projects the mask tokens back to the
    encoder's width.

    context: (B, n_context, encoder_dim); context_indices: (B, n_context);
    target_indices: (B, n_target) -> predictions (B, n_target, encoder_dim).
    """

    def __init__(self, *, grid_size, encoder_dim, dim=64, depth=3, heads=4, dim_head=16, mlp_dim=256):
        super().__init__()
        self.project_in = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embedding", sincos_position_embedding(*grid_size, dim), persistent=False)
        self.transformer = Transformer(dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim)
        self.project_out = nn.Linear(dim, encoder_dim)

        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, context, context_indices, target_indices):
        x = self.project_in(context) + self.pos_embedding[context_indices]  # [B, n_c, d]
        queries = self.mask_token + self.pos_embedding[target_indices]  # [B, n_t, d]
        x = self.transformer(torch.cat([x, queries], dim=1))  # [B, n_c + n_t, d]
        return self.project_out(x[:, context.shape[1] :])  # [B, n_t, encoder_dim]


class JEPAOutput(NamedTuple):
    """What `JEPA.forward` returns.

    loss: scalar smooth-L1 distance between predicted and target embeddings.
    predictions, targets: (B, num_targets * n_target, dim), the patches of
    target block k at positions k * n_target to (k + 1) * n_target - 1.
    masks: the `MultiBlockMasks` used. stats: {"target_std": ...}, the
    standard deviation of the target embeddings across the batch (see `JEPA`).
    """

    loss: torch.Tensor
    predictions: torch.Tensor
    targets: torch.Tensor
    masks: MultiBlockMasks
    stats: dict


def ema_momentum(step, total_steps, start=0.996, end=1.0):
    """Return the target encoder's EMA momentum after `step` of `total_steps` optimizer steps.

    It rises linearly from `start` (before the first step) to exactly `end` at
    the last step, whatever the number of epochs or the data size.
    """
    if step >= total_steps:
        return end
    return start + (end - start) * step / total_steps


class JEPA(nn.Module):
    """I-JEPA (Assran et al. 2023): predict the embeddings of hidden blocks from a visible context.

    - The context encoder, a `ViT` without a cls token, sees only the context
      patches of each image.
    - The target encoder is a copy of the context encoder that gets no
      gradients and is not trained by the optimizer. After every optimizer
      step, `after_optimizer_step` moves it towards the context encoder by an
      exponential moving average whose momentum rises from 0.996 to 1.0.
    - Targets are the target encoder's outputs for the whole image,
      layer-normalised over the features without affine parameters, taken at
      the patches of each target block.
    - The `Predictor` maps the context tokens plus position-carrying mask
      tokens to the embeddings of the target patches. It predicts all target
      blocks of an image in one sequence, where I-JEPA runs it once per block;
      mask tokens carry only positions, so they give each other no content.

    The loss is the smooth L1 distance (Huber with beta = 1) between
    predictions and targets, averaged over target patches and features. The
    layer-normalised targets have unit scale, so most errors are below 1,
    where smooth L1 equals half the squared error; large errors early in
    training get a bounded gradient, as in L1, instead of a growing one.

    The stop-gradient on the targets and the slow EMA keep the model from
    collapsing to a constant embedding: the targets cannot move to meet the
    predictions within a step. `stats["target_std"]` tracks the spread of the
    targets across the batch so that a collapse would show: `training.train`
    prints a warning for an epoch whose mean spread is below
    `collapse_threshold`.
    """

    collapse_threshold = 0.05
    # The context and target blocks change size from batch to batch, so
    # torch.compile recompiles for new shapes. On a 2-core CPU that took 137 s
    # to save 9 % of an epoch, so `training.resolve_compile` leaves it eager.
    fixed_shapes = False

    def __init__(
        self,
        *,
        image_size=28,
        patch_size=4,
        channels=1,
        dim=128,
        depth=4,
        heads=4,
        dim_head=32,
        mlp_dim=512,
        pixel_mean=0.0,
        pixel_std=1.0,
        predictor_dim=64,
        predictor_depth=3,
        predictor_heads=4,
        predictor_dim_head=16,
        predictor_mlp_dim=256,
        num_targets=4,
        target_scale=(0.1, 0.15),
        target_aspect=(0.75, 1.5),
        context_scale=(0.85, 1.0),
        min_context=12,
        momentum_start=0.996,
        momentum_end=1.0,
    ):
        super().__init__()
        self.config = dict(
            image_size=image_size,
            patch_size=patch_size,
            channels=channels,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            mlp_dim=mlp_dim,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            predictor_dim=predictor_dim,
            predictor_depth=predictor_depth,
            predictor_heads=predictor_heads,
            predictor_dim_head=predictor_dim_head,
            predictor_mlp_dim=predictor_mlp_dim,
            num_targets=num_targets,
            target_scale=target_scale,
            target_aspect=target_aspect,
            context_scale=context_scale,
            min_context=min_context,
            momentum_start=momentum_start,
            momentum_end=momentum_end,
        )
        check_transformer_sizes(
            "predictor_",
            dim=predictor_dim,
            depth=predictor_depth,
            heads=predictor_heads,
            dim_head=predictor_dim_head,
            mlp_dim=predictor_mlp_dim,
        )
        if not 0 <= momentum_start <= momentum_end <= 1:
            raise ValueError(
                f"momentum must satisfy 0 <= momentum_start <= momentum_end <= 1; "
                f"got {momentum_start} and {momentum_end}"
            )
        self.context_encoder = ViT(
            image_size=image_size,
            patch_size=patch_size,
            channels=channels,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            mlp_dim=mlp_dim,
            use_cls_token=False,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.target_encoder = copy.deepcopy(self.context_encoder)
        self.target_encoder.requires_grad_(False)
        self.predictor = Predictor(
            grid_size=self.context_encoder.grid_size,
            encoder_dim=dim,
            dim=predictor_dim,
            depth=predictor_depth,
            heads=predictor_heads,
            dim_head=predictor_dim_head,
            mlp_dim=predictor_mlp_dim,
        )
        self.mask_sampler = MultiBlockMaskSampler(
            grid_size=self.context_encoder.grid_size,
            num_targets=num_targets,
            target_scale=target_scale,
            target_aspect=target_aspect,
            context_scale=context_scale,
            min_context=min_context,
        )
        self.momentum_start = momentum_start
        self.momentum_end = momentum_end

    @property
    def encoder(self):
        """The encoder whose features are evaluated: the target encoder, as in I-JEPA."""
        return self.target_encoder

    @property
    def input_shape(self):
        """The (channels, height, width) of the images the model was built for."""
        return self.context_encoder.input_shape

    @torch.no_grad()
    def target_embeddings(self, img):
        """Return the layer-normalised target-encoder outputs for whole images: (B, C, H, W) -> (B, N, dim)."""
        tokens = self.target_encoder.forward_features(img)
        return F.layer_norm(tokens.float(), tokens.shape[-1:])

    def forward(self, img, generator=None, masks=None):
        """Sample masks (unless given), predict the target blocks' embeddings and score them.

        img: (B, C, H, W). Returns a `JEPAOutput`.
        """
        patches = self.context_encoder.patchify(img)  # [B, N, P]
        if masks is None:
            masks = self.mask_sampler.sample(patches.shape[0], generator)
        context_indices = masks.context_indices.to(img.device)  # [B, n_c]
        target_indices = masks.target_indices.to(img.device)  # [B, K, n_t]

        # targets: layer-normalised embeddings of the whole image at the patches of every block
        blocks = target_indices.flatten(1)  # [B, K * n_t], block by block
        embeddings = self.target_embeddings(img)  # [B, N, D]
        index = blocks.unsqueeze(-1).expand(-1, -1, embeddings.shape[-1])
        targets = torch.gather(embeddings, 1, index)  # [B, K * n_t, D]

        # the context encoder sees the context patches only; the predictor then fills in
        # all target blocks at once, one mask token per target patch
        context = self.context_encoder.encode(patches, context_indices)  # [B, n_c, D]
        predictions = self.predictor(context, context_indices, blocks)  # [B, K * n_t, D]

        loss = F.smooth_l1_loss(predictions.float(), targets)
        # spread of what the target encoder says about each image: std across the batch of the
        # mean-pooled embeddings, averaged over features; 0 when every image maps to the same output
        target_std = embeddings.mean(dim=1).std(dim=0).mean()
        return JEPAOutput(loss, predictions, targets, masks, {"target_std": target_std})

    @torch.no_grad()
    def reconstruct(self, img, pixel_decoder, generator=None):
        """Show what the predictor predicts, as pixels, in the four panels of an MAE `Reconstruction`.

        The target blocks are drawn as in training, but the context is the whole
        image minus the targets, so every patch is either visible or hidden.
        `pixel_decoder` (a `PixelDecoder` trained on target-encoder embeddings)
        turns the predicted embeddings of hidden patches into pixels; at visible
        patches the reconstruction shows the decoded target-encoder embeddings.
        The model's train or eval mode is restored afterwards.
        """
        device = next(self.parameters()).device
        img = img.to(device=device, dtype=torch.float32)
        patches = self.context_encoder.patchify(img)  # [B, N, P]
        batch_size, num_patches, patch_dim = patches.shape
        sampler = MultiBlockMaskSampler(
            grid_size=self.context_encoder.grid_size,
            num_targets=self.mask_sampler.num_targets,
            target_scale=self.mask_sampler.target_scale,
            target_aspect=self.mask_sampler.target_aspect,
            context_scale=(1.0, 1.0),
            min_context=self.mask_sampler.min_context,
        )
        masks = sampler.sample(batch_size, generator)
        was_training = self.training
        self.eval()
        try:
            output = self(img, masks=masks)
            decoded = pixel_decoder(self.target_embeddings(img)).float()  # [B, N, P]
            predicted = pixel_decoder(output.predictions).float()  # [B, K * n_t, P]
        finally:
            self.train(was_training)

        # write the decoded predictions at the target patches
        blocks = masks.target_indices.to(device).flatten(1)  # [B, K * n_t]
        reconstruction = decoded.clone()
        reconstruction.scatter_(1, blocks.unsqueeze(-1).expand(-1, -1, patch_dim), predicted)
        hidden = torch.zeros(batch_size, num_patches, device=device).scatter_(1, blocks, 1.0)

        hidden = hidden.unsqueeze(-1)  # [B, N, 1]
        unpatchify = self.context_encoder.unpatchify
        return Reconstruction(
            masked=unpatchify(patches * (1 - hidden)).clamp(0, 1),
            reconstruction=unpatchify(reconstruction).clamp(0, 1),
            pasted=unpatchify(patches * (1 - hidden) + reconstruction * hidden).clamp(0, 1),
            mask=unpatchify(hidden.expand_as(patches))[:, :1],
            pixel_statistics_restored=False,
            loss=output.loss.item(),
        )

    @torch.no_grad()
    def after_optimizer_step(self, step, total_steps):
        """Move the target encoder towards the context encoder: target = m * target + (1 - m) * context."""
        momentum = ema_momentum(step, total_steps, self.momentum_start, self.momentum_end)
        self.update_target_encoder(momentum)
        return momentum

    @torch.no_grad()
    def update_target_encoder(self, momentum):
        """Apply one EMA update with the given momentum to every target-encoder parameter."""
        for target, online in zip(self.target_encoder.parameters(), self.context_encoder.parameters()):
            target.mul_(momentum).add_(online.detach(), alpha=1 - momentum)


class PixelDecoder(nn.Module):
    """A small MLP that turns one patch embedding into that patch's pixels, to show what a JEPA predicts.

    It is trained on frozen, layer-normalised target-encoder embeddings of
    whole images (see `training.train_pixel_decoder`) and never changes the
    encoder. embeddings: (..., dim) -> pixels (..., P).
    """

    def __init__(self, *, dim=128, patch_dim=16, hidden_dim=256):
        super().__init__()
        self.config = dict(dim=dim, patch_dim=patch_dim, hidden_dim=hidden_dim)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, patch_dim),
        )
        self.apply(init_weights)

    def forward(self, embeddings):
        return self.net(embeddings)


def count_parameters(module, trainable_only=True):
    """Return the number of (trainable) parameters of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "Attention",
    "Decoder",
    "FeedForward",
    "JEPA",
    "JEPAOutput",
    "MAE",
    "MAEOutput",
    "MultiBlockMaskSampler",
    "MultiBlockMasks",
    "PatchMask",
    "PixelDecoder",
    "Predictor",
    "Reconstruction",
    "Transformer",
    "ViT",
    "count_parameters",
    "count_visible_patches",
    "ema_momentum",
    "masked_patch_mse",
    "random_masking",
    "sincos_position_embedding",
]
