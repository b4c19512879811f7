"""Time full MAE training steps of this project against vit-pytorch's MAE, in one process.

The script runs these sections in order and prints each one's results:

1. A header: date, versions, CPU model, core count and PyTorch threads.
2. The notebooks' default MAE trained by `training.train`: seconds per MNIST
   epoch, extrapolated from a few hundred steps, and the peak resident memory.
3. This machine's float32 and bfloat16 matrix-multiply rates, the
   denominators of the model-FLOP utilisation (MFU).
4. Both MAEs built at one configuration, their token counts, and the one
   adaptation that vit-pytorch's MAE needs to run with its own ViT.
5. The model FLOPs of one training step per image, from FlopCounterMode.
6. Full training steps (forward, backward, AdamW step, zero_grad) of every
   implementation and setting, timed in alternating rounds.
7. The loss curves of every setting against float32 eager from one seed.
8. On a CUDA machine only, the same timings on the GPU.

Run it from the repository root after installing benchmarks/requirements.txt:

    python benchmarks/throughput.py           # the full measurement, an estimated 15 minutes on 2 cores
    python benchmarks/throughput.py --tiny    # a smoke run that proves the script works
    python benchmarks/throughput.py --help    # every option, with its unit
"""

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import io
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classes import MAE, count_visible_patches  # noqa: E402
from data import ImageDataset, load_dataset  # noqa: E402
from training import (TrainConfig, autocast, build_optimizer, resolve_compile, resolve_precision,  # noqa: E402
                      train)

try:
    from vit_pytorch import ViT as ReferenceViT
    from vit_pytorch.mae import MAE as ReferenceMAE
except ImportError as error:
    sys.exit(
        f"error: vit-pytorch, which provides the reference MAE, is not installed ({error}); "
        f"run: pip install -r benchmarks/requirements.txt"
    )

MNIST_TRAIN_IMAGES = 60_000
NOTEBOOK_MAE_EPOCHS = 13  # the MAE epochs of both notebooks, which decide whether "auto" compiles

# The configuration both MAEs are built with: 28x28 one-channel images in 4x4
# patches, a 128-wide encoder of depth 4 and a 128-wide decoder of depth 2,
# 4 heads of 32 features everywhere, MLPs 4 times as wide as their blocks.
IMAGE_SIZE = 28
CHANNELS = 1
MAE_CONFIG = dict(
    image_size=IMAGE_SIZE,
    patch_size=4,
    channels=CHANNELS,
    dim=128,
    depth=4,
    heads=4,
    dim_head=32,
    mlp_dim=512,
    decoder_dim=128,
    decoder_depth=2,
    decoder_heads=4,
    decoder_dim_head=32,
    decoder_mlp_dim=512,
    masking_ratio=0.75,
)

# setting name -> (autocast dtype or None, whether the model runs under torch.compile)
SETTINGS = {
    "float32": (None, False),
    "bfloat16": (torch.bfloat16, False),
    "compile": (None, True),
    "compile-bfloat16": (torch.bfloat16, True),
}

# Option defaults of a full run and of a --tiny run. An option given on the command line wins.
FULL_DEFAULTS = dict(
    batch_size=256,
    warmup_steps=3,
    steps=20,
    rounds=5,
    loss_steps=50,
    epoch_steps=200,
    matmul_size=2048,
    compile_backend="inductor",
)
TINY_DEFAULTS = dict(
    batch_size=16,
    warmup_steps=2,
    steps=2,
    rounds=2,
    loss_steps=4,
    epoch_steps=3,
    matmul_size=256,
    compile_backend="eager",
)

# Largest relative difference between a setting's loss curve and float32 eager's that passes.
DEFAULT_LOSS_TOLERANCE = 0.05


# ----------------------------------------------------------------------------
# command line and header


def parse_args(argv=None):
    """Parse the command line. Options left unset take the full or the --tiny default."""
    parser = argparse.ArgumentParser(
        description=(
            "Time full MAE training steps (forward, backward, AdamW step, zero_grad) of this "
            "project against vit-pytorch's MAE at the same configuration, count model FLOPs, "
            "and check that the loss curves of faster settings agree with float32 eager."
        ),
    )

    def default_text(name):
        return f"default {FULL_DEFAULTS[name]}, or {TINY_DEFAULTS[name]} with --tiny"

    parser.add_argument(
        "--tiny",
        action="store_true",
        help="run every section at a tiny size (batch 16, a few steps, the 'eager' compile backend) "
        "to check that the script works; the timings it prints mean nothing",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        metavar="SETTING",
        default=list(SETTINGS),
        help="settings of this project's MAE to time, one or more of: float32 (eager), bfloat16 "
        "(eager, bfloat16 autocast), compile (torch.compile, float32), compile-bfloat16 "
        "(torch.compile with bfloat16 autocast); default: all four",
    )
    parser.add_argument("--batch-size", type=int, help=f"images per training step ({default_text('batch_size')})")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"untimed training steps per implementation and setting before the rounds; the first "
        f"one includes compilation ({default_text('warmup_steps')})",
    )
    parser.add_argument("--steps", type=int, help=f"timed training steps per round ({default_text('steps')})")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"rounds; each round times every implementation and setting in turn ({default_text('rounds')})",
    )
    parser.add_argument(
        "--loss-steps",
        type=int,
        help=f"training steps of the loss-curve comparison ({default_text('loss_steps')})",
    )
    parser.add_argument(
        "--loss-tolerance",
        type=float,
        default=DEFAULT_LOSS_TOLERANCE,
        help=f"largest relative difference from the float32 eager loss curve that passes, as a "
        f"fraction (default {DEFAULT_LOSS_TOLERANCE})",
    )
    parser.add_argument(
        "--epoch-steps",
        type=int,
        help=f"training steps timed to extrapolate the seconds per MNIST epoch ({default_text('epoch_steps')})",
    )
    parser.add_argument(
        "--matmul-size",
        type=int,
        help=f"side n of the n x n matrices whose product measures the CPU's peak rate "
        f"({default_text('matmul_size')})",
    )
    parser.add_argument(
        "--compile-backend",
        help=f"torch.compile backend of the compile settings; 'eager' only traces the graph and "
        f"is fast to warm up ({default_text('compile_backend')})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="PyTorch intra-op threads (torch.set_num_threads); default: PyTorch's own choice",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="directory that contains MNIST/raw; default: $MIM_DATA_DIR, else ./data. Without the "
        "files the script uses synthetic images",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the masks (default 0)")
    args = parser.parse_args(argv)

    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch_size", "warmup_steps", "steps", "rounds", "loss_steps", "epoch_steps", "matmul_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    if not args.loss_tolerance > 0:
        parser.error(f"--loss-tolerance must be positive; got {args.loss_tolerance}")
    return args


def cpu_model_name():
    """Return the CPU model from /proc/cpuinfo, or what `platform` reports where that file is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_header(args):
    """Print the date, the software versions and the CPU that the figures below belong to."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print("MAE training-step benchmark: this project's MAE against vit-pytorch's MAE")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"Python {platform.python_version()}, PyTorch {torch.__version__}, "
          f"vit-pytorch {importlib.metadata.version('vit-pytorch')}")
    print(f"CPU: {cpu_model_name()}, {os.cpu_count()} logical cores ({usable} usable by this process), "
          f"PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch.get_num_threads(): {torch.get_num_threads()}")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        print(f"load average over the last minute: {load:.2f}")
        if load >= 1:
            print("warning: other processes kept about a core or more busy during the last minute, so the "
                  "timings below are likely too low and vary more; measure on a quiet machine")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (the GPU section runs last)")
    print(f"sizes: batch {args.batch_size}, {args.warmup_steps} warm-up steps, {args.rounds} rounds of "
          f"{args.steps} timed steps, {args.loss_steps} loss-curve steps, {args.epoch_steps} epoch steps"
          + ("  [--tiny: a smoke run, the timings mean nothing]" if args.tiny else ""))


# ----------------------------------------------------------------------------
# data


def synthetic_images(count, seed):
    """Make `count` smooth 28x28 images in [0, 1]: each the sum of three random Gaussian blobs.

    They stand in for MNIST where its files are missing, so that the MAE still
    has structure to learn in the loss-curve comparison.
    """
    generator = torch.Generator().manual_seed(seed)
    axis = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    rows, cols = axis.view(1, 1, -1, 1), axis.view(1, 1, 1, -1)
    images = torch.zeros(count, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    for _ in range(3):
        centre = torch.rand(count, 2, generator=generator) * IMAGE_SIZE
        width = 1.5 + 3 * torch.rand(count, generator=generator)
        squared_distance = (rows - centre[:, 0].view(-1, 1, 1, 1)) ** 2 + (cols - centre[:, 1].view(-1, 1, 1, 1)) ** 2
        images += torch.exp(-squared_distance / (2 * width.view(-1, 1, 1, 1) ** 2))
    return images.clamp(0, 1)


def load_images(args, count):
    """Return the first `count` MNIST training images, or synthetic ones where MNIST is missing, and their source."""
    try:
        dataset = load_dataset("mnist", "train", data_dir=args.data_dir, limit=min(count, MNIST_TRAIN_IMAGES),
                               download=False)
    except RuntimeError as error:
        # load_dataset wraps torchvision's own error, which names what is missing
        cause = error.__cause__ or error
        print(f"MNIST could not be read ({cause}); using synthetic images of three Gaussian blobs instead. "
              f"Pass --data-dir or set MIM_DATA_DIR to the directory that contains MNIST/raw")
        return synthetic_images(count, args.seed), "synthetic"
    images = dataset.images
    if len(images) < count:
        images = images.repeat(math.ceil(count / len(images)), 1, 1, 1)[:count]
    return images, "MNIST"


def split_batches(images, batch_size, count):
    """Return `count` consecutive batches of `batch_size` images, wrapping around `images`."""
    batches = []
    for index in range(count):
        start = (index * batch_size) % (len(images) - batch_size + 1)
        batches.append(images[start:start + batch_size])
    return batches


# ----------------------------------------------------------------------------
# models


def build_ours(use_cls_token):
    """Build this project's MAE at the benchmark configuration."""
    return MAE(**MAE_CONFIG, use_cls_token=use_cls_token)


def build_reference():
    """Build vit-pytorch's MAE at the benchmark configuration and return it with a note on the adaptation.

    vit-pytorch 1.26.14's ViT stores its position embedding as a 2-D
    (num_patches + 1, dim) parameter, but its MAE indexes it as 3-D with
    `pos_embedding[:, 1:(num_patches + 1)]` when pool='cls' (the ViT's
    default), so the MAE's forward raises a shape error. This function first
    tries the MAE as released. Only if that raises does it replace the parameter
    with a (1, num_patches + 1, dim) view of the same values. That slice then
    picks the rows of the patch positions, as the MAE means, and nothing else
    changes.
    The ViT's own forward is checked to give identical outputs before and after.
    """
    config = MAE_CONFIG
    if config["decoder_mlp_dim"] != 4 * config["decoder_dim"]:
        raise ValueError("vit-pytorch's MAE fixes the decoder MLP at 4 x decoder_dim; keep MAE_CONFIG that way")

    def build_vit():
        return ReferenceViT(
            image_size=config["image_size"],
            patch_size=config["patch_size"],
            num_classes=0,  # no classification head: the MAE never calls it
            dim=config["dim"],
            depth=config["depth"],
            heads=config["heads"],
            dim_head=config["dim_head"],
            mlp_dim=config["mlp_dim"],
            channels=config["channels"],
        )

    def wrap(encoder):
        return ReferenceMAE(
            encoder=encoder,
            decoder_dim=config["decoder_dim"],
            masking_ratio=config["masking_ratio"],
            decoder_depth=config["decoder_depth"],
            decoder_heads=config["decoder_heads"],
            decoder_dim_head=config["decoder_dim_head"],
        )

    probe = torch.rand(2, config["channels"], config["image_size"], config["image_size"])
    vit = build_vit()
    try:
        with torch.no_grad():
            wrap(copy.deepcopy(vit))(probe)
    except RuntimeError as error:
        failure = str(error)
    else:
        return wrap(vit), "vit-pytorch's MAE ran with its own ViT as released; nothing was adapted"

    with torch.no_grad():
        before = vit(probe)
        flat = vit.pos_embedding
        vit.pos_embedding = torch.nn.Parameter(flat.detach().unsqueeze(0))
        after = vit(probe)
    if not torch.equal(before, after):
        raise RuntimeError("vit-pytorch's ViT.forward changed its output after the position-embedding view")
    note = (
        f"adapted vit-pytorch's MAE: its ViT (pool='cls') stores pos_embedding as 2-D {tuple(flat.shape)}, "
        f"but MAE.forward slices it as 3-D with pos_embedding[:, 1:(num_patches + 1)] and raised "
        f"\"{failure}\". The ViT's pos_embedding parameter was replaced by a "
        f"{tuple(vit.pos_embedding.shape)} view of the same values, so the slice adds the patch "
        f"positions as intended; the arithmetic is unchanged and ViT.forward gives identical outputs "
        f"with the view"
    )
    return wrap(vit), note


def our_loss(model, images, generator):
    return model(images, generator=generator).loss


def reference_loss(model, images, generator):
    # vit-pytorch's MAE draws its masks from the global random state and returns the loss itself
    return model(images)


def describe_token_counts():
    """Return lines stating how many tokens each encoder and decoder processes, and which of ours matches the reference."""
    num_patches = (MAE_CONFIG["image_size"] // MAE_CONFIG["patch_size"]) ** 2
    ratio = MAE_CONFIG["masking_ratio"]
    # vit-pytorch hides int(ratio * N) patches; this project keeps int(N * (1 - ratio)) visible
    reference_visible = num_patches - int(ratio * num_patches)
    ours_visible = count_visible_patches(num_patches, ratio)
    rows = [
        ("reference (vit-pytorch, no cls token)", reference_visible, num_patches),
        ("ours, use_cls_token=True (default)", ours_visible + 1, num_patches + 1),
        ("ours, use_cls_token=False", ours_visible, num_patches),
    ]
    lines = [f"{num_patches} patches per image; reference hides {num_patches - reference_visible}, "
             f"ours hides {num_patches - ours_visible}"]
    for name, encoder_tokens, decoder_tokens in rows:
        lines.append(f"  {name:<40} encoder tokens {encoder_tokens:>3}, decoder tokens {decoder_tokens:>3}")
    _, reference_encoder, reference_decoder = rows[0]
    for name, encoder_tokens, decoder_tokens in rows[1:]:
        matches = [part for part, ours, theirs in
                   (("encoder", encoder_tokens, reference_encoder), ("decoder", decoder_tokens, reference_decoder))
                   if ours == theirs]
        lines.append(f"  {name} matches the reference's token count in: {', '.join(matches) or 'neither'}")
    return lines


# ----------------------------------------------------------------------------
# FLOPs and peak rates


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """Count the FLOPs of softmax(q k^T) v: two batched matmuls, 2 * 2 * B * heads * Tq * Tk * d."""
    batch, heads, query_tokens, head_dim = query_shape
    key_tokens = key_shape[-2]
    return 4 * batch * heads * query_tokens * key_tokens * head_dim


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """Count the backward FLOPs of attention: the gradients of both matmuls, twice the forward."""
    return 2 * attention_flops(query_shape, key_shape, value_shape)


# PyTorch 2.14's FlopCounterMode counts the CUDA kernels of scaled_dot_product_attention
# but not the CPU one that our MAE calls, which would drop our attention matmuls while the
# reference's explicit matmuls count. These formulas count the CPU kernel as the explicit
# form counts: the model FLOPs, without the scores that the kernel recomputes in backward.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
}


def count_step_flops(model, loss_fn, images, generator):
    """Return the FLOPs of one training step's forward and backward, as FlopCounterMode counts them."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss = loss_fn(model, images, generator)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype, size, device, repeats=5):
    """Return the best rate in GFLOP/s of an n x n by n x n product in `dtype` on `device`, n = `size`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.rand(size, size, generator=generator).to(device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: library initialisation and kernel choice
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


# ----------------------------------------------------------------------------
# training steps and their timing


@dataclass
class Candidate:
    """One implementation in one setting, with its own model, optimizer and timings."""

    label: str
    implementation: str  # "ours" or "reference"
    setting: str  # a key of SETTINGS
    module: torch.nn.Module  # the model whose parameters train
    step_model: Callable  # `module`, or its torch.compile wrapper
    loss_fn: Callable
    autocast_dtype: torch.dtype | None
    flops_per_image: float
    optimizer: torch.optim.Optimizer | None = None
    first_step_seconds: float = math.nan
    images_per_second: list = field(default_factory=list)

    @property
    def compiled(self):
        return SETTINGS[self.setting][1]

    def median_rate(self):
        return statistics.median(self.images_per_second)


def make_candidate(label, implementation, setting, module, loss_fn, flops_per_image, compile_backend):
    autocast_dtype, compiled = SETTINGS[setting]
    step_model = torch.compile(module, backend=compile_backend) if compiled else module
    candidate = Candidate(label, implementation, setting, module, step_model, loss_fn, autocast_dtype, flops_per_image)
    candidate.optimizer = build_optimizer(module, TrainConfig())
    return candidate


def training_step(candidate, images, generator):
    """Run one full training step: forward, backward, AdamW step, zero_grad. Return the loss."""
    with autocast(images.device, candidate.autocast_dtype):
        loss = candidate.loss_fn(candidate.step_model, images, generator)
    loss.backward()
    candidate.optimizer.step()
    candidate.optimizer.zero_grad(set_to_none=True)
    return loss


def time_steps(candidate, batches, steps, generator):
    """Return the seconds that `steps` training steps take, the device synchronised at both ends."""
    device = batches[0].device
    synchronize(device)
    started = time.perf_counter()
    for step in range(steps):
        training_step(candidate, batches[step % len(batches)], generator)
    synchronize(device)
    return time.perf_counter() - started


def warm_up(candidates, batches, warmup_steps, generator):
    """Run the untimed warm-up steps of every candidate, storing how long each first step took."""
    for candidate in candidates:
        candidate.first_step_seconds = time_steps(candidate, batches, 1, generator)
        if warmup_steps > 1:
            time_steps(candidate, batches, warmup_steps - 1, generator)


def time_rounds(candidates, batches, steps, rounds, generator):
    """Time `steps` steps of every candidate per round, rotating the order each round."""
    batch_size = len(batches[0])
    for round_index in range(rounds):
        shift = round_index % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            seconds = time_steps(candidate, batches, steps, generator)
            candidate.images_per_second.append(steps * batch_size / seconds)


def print_rates(candidates, peaks, reference_for):
    """Print images/s, the ratios to the reference, MFLOP per image, GFLOP/s and MFU of every candidate.

    `peaks` maps an autocast dtype (None for float32) to the measured matmul
    rate in GFLOP/s. `reference_for` maps it to the reference candidate of the
    same precision. Each of ours gets two ratios: to the reference in float32
    eager, as people run it, and to the reference at the same precision.
    """
    header = (f"  {'implementation, setting':<44} {'images/s':>9} {'min':>8} {'max':>8} {'spread':>7} "
              f"{'/ref f32':>8} {'/ref same':>9} {'MFLOP/img':>10} {'GFLOP/s':>8} {'MFU':>7}")
    print(header)
    float32_reference = reference_for.get(None)
    for candidate in candidates:
        rate = candidate.median_rate()
        low, high = min(candidate.images_per_second), max(candidate.images_per_second)
        ratio_float32 = ratio_same = "-"
        if candidate.implementation == "ours":
            if float32_reference:
                ratio_float32 = f"{rate / float32_reference.median_rate():.2f}"
            same = reference_for.get(candidate.autocast_dtype)
            if same:
                ratio_same = f"{rate / same.median_rate():.2f}"
        gflops = rate * candidate.flops_per_image / 1e9
        mfu = gflops / peaks[candidate.autocast_dtype]
        print(f"  {candidate.label:<44} {rate:>9.0f} {low:>8.0f} {high:>8.0f} {(high - low) / rate:>7.1%} "
              f"{ratio_float32:>8} {ratio_same:>9} {candidate.flops_per_image / 1e6:>10.2f} {gflops:>8.1f} {mfu:>7.1%}")
    print("  images/s is the median over rounds, min and max are over rounds, spread is (max - min) / median.")
    print("  /ref f32 divides by the reference's median images/s in float32 eager mode; /ref same by the")
    print("  reference's in eager mode at the same precision.")
    print("  MFU divides GFLOP/s by the matmul rate measured above at the setting's precision "
          "(float32 or bfloat16).")


# ----------------------------------------------------------------------------
# sections


def measure_notebook_epoch(args, images):
    """Time the notebooks' default MAE in `training.train` and print seconds per MNIST epoch and peak memory.

    The notebooks build the MAE of `MAE_CONFIG` without a cls token and with
    pixels standardised by the training images' mean and standard deviation,
    and train it with batch 256 at the precision `resolve_precision("auto", ...)`
    picks, compiled when `resolve_compile("auto", ...)` compiles their 13-epoch
    run. This section runs `training.train` for two epochs of `--epoch-steps`
    steps each, in one call so that torch.compile compiles once. The first
    epoch, which includes any compiling, is a warm-up; the second is timed and
    extrapolated to 60,000 images.
    """
    print("\n== notebooks' default MAE in training.train: seconds per MNIST epoch ==")
    device = torch.device("cpu")
    dtype = resolve_precision("auto", device)
    notebook_steps = NOTEBOOK_MAE_EPOCHS * math.ceil(MNIST_TRAIN_IMAGES / args.batch_size)
    compiled = resolve_compile("auto", device, notebook_steps, MAE.fixed_shapes)
    count = args.epoch_steps * args.batch_size
    labels = torch.zeros(count, dtype=torch.int64)  # an MAE ignores labels
    subset = ImageDataset(images[:count], labels, [], "mnist", "train")
    config = TrainConfig(epochs=2, batch_size=args.batch_size, lr=1.5e-3, warmup_epochs=1, seed=args.seed,
                         precision="auto", compile=compiled)

    rss_before = resident_set_size()
    torch.manual_seed(args.seed)
    model = MAE(**MAE_CONFIG, use_cls_token=False, pixel_mean=images.mean().item(), pixel_std=images.std().item())
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        history = train(model, subset, None, config, show_progress=False)
    for line in log.getvalue().splitlines():
        print(f"  training.train: {line}")

    warmup_seconds, seconds = history["seconds"]
    rate = history["images_per_second"][-1]
    print(f"precision: {dtype or torch.float32} (training.resolve_precision('auto', 'cpu'))")
    print(f"torch.compile: {'yes' if compiled else 'no'} (training.resolve_compile('auto', 'cpu') for the "
          f"notebooks' {notebook_steps:,}-step MAE run)")
    print(f"epoch time: {MNIST_TRAIN_IMAGES / rate:.1f} s per epoch of {MNIST_TRAIN_IMAGES:,} images at "
          f"{rate:.0f} images/s, extrapolated from the second of two epochs of {args.epoch_steps} steps "
          f"({count:,} images) in training.train; test-set evaluation is not included")
    print(f"warm-up epoch: {warmup_seconds:.1f} s against {seconds:.1f} s for the timed one "
          f"(any compiling happens in the warm-up)")
    print_peak_memory(rss_before)


def resident_set_size():
    """Return the current resident set size in bytes from psutil, or None where psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def print_peak_memory(rss_before):
    """Print the process's peak resident set size so far, from resource.getrusage."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports ru_maxrss in KiB, macOS in bytes
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    print(f"peak memory: {peak_bytes / 2**20:.0f} MiB peak resident set size of this process so far "
          f"(resource.getrusage ru_maxrss), which includes Python, PyTorch and the loaded images; "
          f"this section runs first, so no other model counts")
    if rss_before is not None:
        print(f"             {rss_before / 2**20:.0f} MiB resident before the model was built (psutil)")


def measure_peaks(args, device):
    """Measure and print the float32 and bfloat16 matmul rates, and return them keyed by autocast dtype."""
    size = args.matmul_size
    peaks = {
        None: matmul_rate(torch.float32, size, device),
        torch.bfloat16: matmul_rate(torch.bfloat16, size, device),
    }
    print(f"float32 matmul:  {peaks[None]:8.1f} GFLOP/s (best of 5 products of {size}x{size} matrices)")
    print(f"bfloat16 matmul: {peaks[torch.bfloat16]:8.1f} GFLOP/s (same size)")
    return peaks


def build_candidates(args, reference_model, reference_flops, our_flops):
    """Build every implementation and setting to time. All of ours start from the same weights.

    Returns the candidates and the initial state of our cls-token MAE, which the
    loss-curve comparison restores.
    """
    torch.manual_seed(args.seed)
    ours = build_ours(use_cls_token=True)
    initial_state = copy.deepcopy(ours.state_dict())
    torch.manual_seed(args.seed)
    ours_without_cls = build_ours(use_cls_token=False)

    candidates = [make_candidate("reference, float32 eager", "reference", "float32", reference_model,
                                 reference_loss, reference_flops, args.compile_backend)]
    if any(SETTINGS[setting][0] is not None for setting in args.settings):
        candidates.append(make_candidate("reference, bfloat16 eager", "reference", "bfloat16",
                                         copy.deepcopy(reference_model), reference_loss, reference_flops,
                                         args.compile_backend))
    for setting in args.settings:
        label = {"float32": "float32 eager", "bfloat16": "bfloat16 eager"}.get(setting, setting)
        candidates.append(make_candidate(f"ours (cls token), {label}", "ours", setting, copy.deepcopy(ours),
                                         our_loss, our_flops[True], args.compile_backend))
        if setting in ("float32", "bfloat16"):
            # the notebooks' setting: no cls token
            candidates.append(make_candidate(f"ours (no cls token), {label}", "ours", setting,
                                             copy.deepcopy(ours_without_cls), our_loss, our_flops[False],
                                             args.compile_backend))
    return candidates, initial_state


def print_compile_times(candidates, args):
    """Print each compiled setting's compile time: its first step less a warmed-up step."""
    for candidate in candidates:
        if not candidate.compiled:
            continue
        step_seconds = args.batch_size / candidate.median_rate()
        print(f"compile time, {candidate.label}: about {candidate.first_step_seconds - step_seconds:.1f} s "
              f"(first step {candidate.first_step_seconds:.1f} s less a warmed-up step of {step_seconds:.2f} s; "
              f"backend {args.compile_backend!r})")


def compare_loss_curves(args, candidates, initial_state, batches):
    """Train every setting of ours for `--loss-steps` steps from one seed and print the largest relative gap to float32.

    Every run starts from `initial_state`, trains on the same batches and draws
    its masks from a generator with the same seed. The learning rate is constant.
    Returns True when every setting is within `--loss-tolerance`.
    """
    print(f"\n== loss curves: {args.loss_steps} steps from seed {args.seed}, compared with float32 eager ==")
    runs = {}
    for candidate in candidates:
        if candidate.implementation != "ours" or not candidate.module.config["use_cls_token"]:
            continue
        candidate.module.load_state_dict(initial_state)
        candidate.optimizer = build_optimizer(candidate.module, TrainConfig())
        generator = torch.Generator().manual_seed(args.seed + 1)
        runs[candidate.setting] = [training_step(candidate, batch, generator).item() for batch in batches]

    if "float32" not in runs:
        baseline = make_candidate("float32 eager", "ours", "float32", build_ours(use_cls_token=True),
                                  our_loss, 0.0, args.compile_backend)
        baseline.module.load_state_dict(initial_state)
        generator = torch.Generator().manual_seed(args.seed + 1)
        runs["float32"] = [training_step(baseline, batch, generator).item() for batch in batches]

    baseline = runs["float32"]
    print(f"float32 eager loss: first {baseline[0]:.4f}, last {baseline[-1]:.4f}")
    print(f"tolerance: {args.loss_tolerance:.1%} largest relative difference |loss - float32 loss| / float32 loss")
    all_within = True
    for setting, losses in runs.items():
        if setting == "float32":
            continue
        gaps = [abs(loss - reference) / abs(reference) for loss, reference in zip(losses, baseline)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        within = gaps[worst] <= args.loss_tolerance
        all_within = all_within and within
        print(f"  {setting:<17} last loss {losses[-1]:.4f}, max relative difference {gaps[worst]:.2%} at step "
              f"{worst + 1}: {'within' if within else 'OUTSIDE'} tolerance")
    return all_within


def run_gpu_section(args, images, our_flops, reference_flops, device):
    """Time ours and the reference in float32 and bfloat16 on a CUDA `device`, and print rates and MFU."""
    print(f"\n== GPU: {torch.cuda.get_device_name(device)} ==")
    size = 1024 if args.tiny else 8192
    peaks = {
        None: matmul_rate(torch.float32, size, device, repeats=10),
        torch.bfloat16: matmul_rate(torch.bfloat16, size, device, repeats=10),
    }
    print(f"float32 matmul:  {peaks[None]:9.1f} GFLOP/s; bfloat16 matmul: {peaks[torch.bfloat16]:9.1f} GFLOP/s "
          f"(best of 10 products of {size}x{size} matrices; torch.get_float32_matmul_precision() is "
          f"{torch.get_float32_matmul_precision()!r}, and only 'high' or 'medium' let float32 use TF32)")

    reference_model, _ = build_reference()
    torch.manual_seed(args.seed)
    ours = build_ours(use_cls_token=True)
    candidates = []
    for setting in ("float32", "bfloat16"):
        candidates.append(make_candidate(f"reference, {setting} eager", "reference", setting,
                                         copy.deepcopy(reference_model).to(device), reference_loss,
                                         reference_flops, args.compile_backend))
        candidates.append(make_candidate(f"ours (cls token), {setting} eager", "ours", setting,
                                         copy.deepcopy(ours).to(device), our_loss, our_flops[True],
                                         args.compile_backend))

    batches = [batch.to(device) for batch in split_batches(images, args.batch_size, 8)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    torch.cuda.reset_peak_memory_stats(device)
    warm_up(candidates, batches, args.warmup_steps, generator)
    time_rounds(candidates, batches, args.steps, args.rounds, generator)
    reference_for = {c.autocast_dtype: c for c in candidates if c.implementation == "reference"}
    print_rates(candidates, peaks, reference_for)
    print(f"  MFLOP/img: counted on the CPU; peak GPU memory allocated: "
          f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (torch.cuda.max_memory_allocated)")
    notebook_dtype = resolve_precision("auto", device)
    notebook = next(c for c in candidates if c.implementation == "ours" and c.autocast_dtype == notebook_dtype)
    print(f"epoch time on the GPU: about {MNIST_TRAIN_IMAGES / notebook.median_rate():.1f} s per epoch of "
          f"{MNIST_TRAIN_IMAGES:,} images, extrapolated from the median rate of {notebook.label}, the "
          f"precision resolve_precision('auto', 'cuda') picks")


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print_header(args)

    image_count = max(args.epoch_steps, args.loss_steps, 8) * args.batch_size
    images, source = load_images(args, image_count)
    print(f"images: {len(images):,} from {source}")

    measure_notebook_epoch(args, images)

    print("\n== matrix-multiply rates of this machine (CPU) ==")
    cpu = torch.device("cpu")
    peaks = measure_peaks(args, cpu)

    print("\n== models ==")
    reference_model, note = build_reference()
    print(note)
    for line in describe_token_counts():
        print(line)

    print("\n== model FLOPs of one training step (forward + backward), FlopCounterMode ==")
    batches = split_batches(images, args.batch_size, max(8, args.loss_steps))
    generator = torch.Generator().manual_seed(args.seed)
    reference_flops = count_step_flops(reference_model, reference_loss, batches[0], generator) / args.batch_size
    our_flops = {
        cls_token: count_step_flops(build_ours(cls_token), our_loss, batches[0], generator) / args.batch_size
        for cls_token in (True, False)
    }
    print(f"  reference:            {reference_flops / 1e6:8.2f} MFLOP per image")
    print(f"  ours (cls token):     {our_flops[True] / 1e6:8.2f} MFLOP per image")
    print(f"  ours (no cls token):  {our_flops[False] / 1e6:8.2f} MFLOP per image")
    print("  the optimizer step is not counted; attention counts as two batched matmuls in every implementation")

    print(f"\n== training steps: {args.rounds} rounds of {args.steps} steps at batch {args.batch_size}, "
          f"after {args.warmup_steps} warm-up steps ==")
    candidates, initial_state = build_candidates(args, reference_model, reference_flops, our_flops)
    warmup_started = time.perf_counter()
    warm_up(candidates, batches[:8], args.warmup_steps, generator)
    print(f"warm-up of every implementation and setting took {time.perf_counter() - warmup_started:.1f} s; "
          f"the timings below exclude it")
    time_rounds(candidates, batches[:8], args.steps, args.rounds, generator)
    reference_for = {c.autocast_dtype: c for c in candidates if c.implementation == "reference"}
    print_rates(candidates, peaks, reference_for)
    print_compile_times(candidates, args)

    loss_ok = compare_loss_curves(args, candidates, initial_state, batches[:args.loss_steps])

    if torch.cuda.is_available():
        run_gpu_section(args, images, our_flops, reference_flops, torch.device("cuda"))

    print(f"\nloss curves {'agree' if loss_ok else 'DISAGREE'} within {args.loss_tolerance:.1%}")


if __name__ == "__main__":
    main()
