"""Device choice, seeding and the training loop shared by every model of the project.

`train` fits an MAE, a JEPA or a classifier ViT on tensors held in memory with
AdamW and a linear warm-up followed by a cosine learning-rate decay. After
every epoch it records the losses in a history, evaluates on the test set and,
when given a path, writes a checkpoint that `train(..., resume_from=path)`
continues from.
"""

import contextlib
import math
import os
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from checkpoints import load_checkpoint, load_model_state, make_checkpoint, save_checkpoint
from classes import PixelDecoder, ViT
from data import iterate_batches

DEVICE_VARIABLE = "MIM_DEVICE"
_announced_devices = set()


def choose_device(name=None):
    """Pick the device to train on: `name`, else `$MIM_DEVICE`, else CUDA, then Apple MPS, then the CPU.

    The choice is printed once per device. Raises ValueError for a device
    name that PyTorch does not know or whose backend is not available here.
    """
    requested = name or os.environ.get(DEVICE_VARIABLE) or None
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise ValueError(
                f"unknown device {requested!r} ({error}); use 'cpu', 'cuda', 'cuda:1' or 'mps'"
            ) from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} was requested but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {requested!r} was requested but Apple MPS is not available here")
        source = "requested"
    elif torch.cuda.is_available():
        device, source = torch.device("cuda"), "CUDA is available"
    elif torch.backends.mps.is_available():
        device, source = torch.device("mps"), "Apple MPS is available"
    else:
        device, source = torch.device("cpu"), "no CUDA or MPS device found"

    if str(device) not in _announced_devices:
        _announced_devices.add(str(device))
        print(f"Using device {device} ({source}; set {DEVICE_VARIABLE} to override)")
    return device


def setting(name, default):
    """Return the integer in environment variable `name`, or `default` when it is unset or empty.

    The notebooks read their sizes this way, so tests can shrink a run
    without editing the notebook. Raises ValueError for a value that is not
    a positive integer.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name} must be a positive integer; got {text!r}")
    return value


def describe_hardware(device):
    """Return a short description of `device` for reports, such as "2-core CPU (AMD EPYC)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model_name}), {torch.get_num_threads()} PyTorch threads"


def seed_everything(seed):
    """Seed Python's, PyTorch's (CPU, CUDA and MPS) and, if installed, NumPy's random generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def cpu_supports_bfloat16():
    """Return whether this CPU has native bfloat16 instructions (AVX512-BF16 or AMX-BF16).

    Without them oneDNN emulates bfloat16 and autocast makes training slower.
    Only Linux exposes the flags, in /proc/cpuinfo; elsewhere this returns False.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision, device):
    """Turn "auto", "float32" or "bfloat16" into the dtype of autocast on `device` (None: no autocast).

    "auto" picks bfloat16 on CUDA devices that support it and on CPUs with
    native bfloat16 instructions, and float32 elsewhere (Apple MPS included).
    """
    device = torch.device(device)
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16'; got {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_supports_bfloat16():
        return torch.bfloat16
    return None


# Below this many optimizer steps "auto" trains eagerly. On a 2-core CPU,
# compiling the notebooks' MAE took about 50 s with an empty inductor cache
# and 12 s with a warm one. Compiled steps ran about 12 % faster in the
# benchmark, so at batch 256 compiling pays back after about 2,000 steps.
# NOTE: over whole notebook runs the gain varied from -4 % to +13 % per epoch.
COMPILE_MIN_STEPS = 2000


def can_compile(device):
    """Return whether torch.compile's default backend can build kernels for `device` on this machine.

    It needs a C++ compiler for a CPU and Triton for a CUDA GPU. Only Linux
    is accepted: the project measured compile there and nowhere else.
    """
    device = torch.device(device)
    if platform.system() != "Linux":
        return False
    if device.type == "cpu":
        return any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def resolve_compile(setting, device, total_steps, fixed_shapes=True):
    """Turn the compile setting ("auto", True or False) into whether `train` uses torch.compile.

    "auto" compiles only a model with `fixed_shapes`, which the MAE and the
    ViT have. The JEPA's masks change shape every batch, which makes
    torch.compile recompile. "auto" also needs a run of at least
    COMPILE_MIN_STEPS optimizer steps, because a shorter run spends more time
    compiling than it saves, and a Linux CPU or CUDA GPU where `can_compile`
    holds. Apple MPS and other systems stay eager, as they were never measured.
    """
    if setting is True or setting is False:
        return setting
    if setting != "auto":
        raise ValueError(f"compile must be 'auto', True or False; got {setting!r}")
    return fixed_shapes and total_steps >= COMPILE_MIN_STEPS and can_compile(device)


def autocast(device, dtype):
    """Return an autocast context for `dtype` on `device`, or a no-op context when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@dataclass
class TrainConfig:
    """Settings of one training run. Every field is a plain value, so it fits in a checkpoint."""

    epochs: int = 10  # full passes over the training set
    batch_size: int = 256  # images per optimizer step
    lr: float = 1.5e-3  # peak learning rate, reached at the end of the warm-up
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_epochs: float = 1.0  # epochs of linear warm-up from 0 to lr
    weight_decay: float = 0.05  # AdamW decoupled weight decay; biases, norms and tokens get none
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    seed: int = 0  # seeds the shuffling, the masks and the model's initial weights
    precision: str = "auto"  # "auto", "float32" or "bfloat16" (autocast)
    compile: bool | str = "auto"  # "auto", True or False: run the training steps through torch.compile
    eval_batch_size: int = 1024  # images per batch during evaluation

    def validate(self):
        """Raise ValueError naming the first invalid field and its value."""
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1; got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}]; got {self.min_lr!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs={self.epochs}]; got {self.warmup_epochs!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be at least 0; got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)!r}")
        resolve_precision(self.precision, "cpu")
        resolve_compile(self.compile, "cpu", total_steps=0)


def check_image_shape(model, dataset):
    """Raise ValueError before training when the data's images do not have the model's input shape."""
    expected = tuple(model.input_shape)
    found = tuple(dataset.images.shape[1:])
    if found != expected:
        raise ValueError(
            f"the {dataset.split} images have shape (channels, height, width) = {found}, but the "
            f"model was built for {expected}; build the model with channels={found[0]} and "
            f"image_size={found[1:]}, or resize the data"
        )


def build_optimizer(model, config):
    """Return AdamW over the trainable parameters, without weight decay on biases, norms and tokens."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        # matrices of linear layers decay; biases, LayerNorm weights and learned tokens do not
        (decay if parameter.dim() >= 2 and parameter.shape[0] != 1 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def learning_rate_factor(step, warmup_steps, total_steps, min_ratio):
    """Return the learning rate at `step` as a fraction of the peak: linear warm-up, then cosine to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config, steps_per_epoch):
    """Return a LambdaLR that applies `learning_rate_factor` once per optimizer step."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    min_ratio = config.min_lr / config.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, total_steps, min_ratio)
    )


def training_loss(model, images, labels, generator=None):
    """Return the loss of one batch and a dict of scalar statistics to log.

    A classifier `ViT` is scored by cross-entropy against `labels`; every other
    model (MAE, JEPA) by its own objective, with masks drawn from `generator`.
    """
    if isinstance(model, ViT) or isinstance(getattr(model, "_orig_mod", None), ViT):
        logits = model(images)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return F.cross_entropy(logits.float(), labels), {"accuracy": accuracy}
    output = model(images, generator=generator)
    return output.loss, dict(getattr(output, "stats", None) or {})


@torch.no_grad()
def evaluate(model, images, labels=None, batch_size=1024, seed=0, autocast_dtype=None):
    """Return the mean test loss (and statistics) of `model` over `images`, in eval mode.

    The masks come from a generator seeded with `seed`, so every call with the
    same seed scores the same masks and epochs can be compared.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = images.device
    totals, count = {}, 0
    try:
        for image_batch, label_batch in iterate_batches(images, labels, batch_size):
            with autocast(device, autocast_dtype):
                loss, stats = training_loss(model, image_batch, label_batch, generator)
            size = len(image_batch)
            for key, value in {"loss": loss, **stats}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * size
            count += size
    finally:
        model.train(was_training)
    return {key: total / count for key, total in totals.items()}


def call_step_hook(model, step, total_steps):
    """Call the model's `after_optimizer_step(step, total_steps)` if it has one (the JEPA's EMA update)."""
    hook = getattr(model, "after_optimizer_step", None)
    if hook is not None:
        hook(step, total_steps)


def interrupted_checkpoint_path(model):
    """Return where an interrupted run without a checkpoint path saves its last epoch."""
    return Path("checkpoints") / f"interrupted_{type(model).__name__.lower()}.pt"


def train(
    model,
    train_set,
    test_set=None,
    config=None,
    checkpoint_path=None,
    resume_from=None,
    stop_after_epoch=None,
    show_progress=True,
):
    """Train `model` on `train_set` (an `ImageDataset` on the model's device) and return its history.

    The history is a dict of lists with one entry per epoch: "epoch",
    "train_loss", "test_loss", "lr", "seconds" and "images_per_second", plus
    "train_<name>" and "test_<name>" for every statistic the model reports.

    With `checkpoint_path`, a checkpoint is written after every epoch. With
    `resume_from`, training continues from a checkpoint written by this function.
    `stop_after_epoch` ends the run after that epoch while keeping the
    learning-rate schedule of all `config.epochs`, so a long run can be split
    into sessions that together match one straight run.
    Ctrl-C stops training, makes sure the last completed epoch is on disk
    (at `checkpoint_path`, or a default path), prints where, and re-raises.
    A NaN or infinite loss raises FloatingPointError and writes nothing, so
    the last good checkpoint stays as it was.
    """
    config = config or TrainConfig()
    config.validate()
    if len(train_set) == 0:
        raise ValueError("the training set is empty; pass a data set with at least one image")
    check_image_shape(model, train_set)
    if test_set is not None:
        check_image_shape(model, test_set)
    last_epoch = config.epochs if stop_after_epoch is None else stop_after_epoch
    if not 1 <= last_epoch <= config.epochs:
        raise ValueError(
            f"stop_after_epoch must be in [1, epochs={config.epochs}]; got {stop_after_epoch!r}"
        )
    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(config.precision, device)
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch

    torch.manual_seed(config.seed)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    mask_generator = torch.Generator().manual_seed(config.seed + 1)
    history = {}
    start_epoch = 1

    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from, map_location="cpu")
        if checkpoint["model_class"] != type(model).__name__ or checkpoint["model_config"] != model.config:
            raise ValueError(
                f"checkpoint {str(resume_from)!r} contains a {checkpoint['model_class']} with config "
                f"{checkpoint['model_config']}, which differs from the model passed in; build the "
                f"model with that config or start without resume_from"
            )
        load_model_state(model, checkpoint["model_state"], source=f"checkpoint {str(resume_from)!r}")
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        scheduler.load_state_dict(checkpoint["scheduler_state"])
        shuffle_generator.set_state(checkpoint["rng_state"]["shuffle"])
        mask_generator.set_state(checkpoint["rng_state"]["masks"])
        torch.set_rng_state(checkpoint["rng_state"]["torch"])
        history = {key: list(values) for key, values in checkpoint["history"].items()}
        start_epoch = checkpoint["epoch"] + 1
        print(f"Resuming from {resume_from} after epoch {checkpoint['epoch']}")

    steps_to_run = (last_epoch - start_epoch + 1) * steps_per_epoch
    step_model = model
    if resolve_compile(config.compile, device, steps_to_run, getattr(model, "fixed_shapes", False)):
        print(f"Compiling the training step with torch.compile (the first steps of epoch {start_epoch} "
              f"include the compile time; TrainConfig(compile=False) turns it off)")
        step_model = torch.compile(model)
    last_completed = None
    last_finite_loss = None
    epoch = start_epoch
    model.train()
    try:
        for epoch in range(start_epoch, last_epoch + 1):
            started = time.perf_counter()
            totals, count = {}, 0
            batches = iterate_batches(images, labels, config.batch_size, shuffle_generator)
            progress = tqdm(
                batches,
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{config.epochs}",
                leave=False,
                disable=not show_progress,
            )
            for step_in_epoch, (image_batch, label_batch) in enumerate(progress, start=1):
                # forward
                with autocast(device, autocast_dtype):
                    loss, stats = training_loss(step_model, image_batch, label_batch, mask_generator)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"the training loss became {loss_value} at epoch {epoch}, step "
                        f"{step_in_epoch} of {steps_per_epoch}; the last finite loss was "
                        f"{last_finite_loss}. No checkpoint was written for this epoch. Lower the "
                        f"learning rate (lr={config.lr}) or check the input data"
                    )
                last_finite_loss = loss_value

                # backward and step
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                call_step_hook(model, scheduler.last_epoch, total_steps)

                size = len(image_batch)
                for key, value in {"loss": loss_value, **stats}.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * size
                count += size
                progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            progress.close()

            seconds = time.perf_counter() - started
            record = {"epoch": epoch}
            record.update({f"train_{key}": total / count for key, total in totals.items()})
            if test_set is not None:
                test_images, test_labels = test_set.images.to(device), test_set.labels.to(device)
                scores = evaluate(model, test_images, test_labels, config.eval_batch_size, config.seed, autocast_dtype)
                record.update({f"test_{key}": value for key, value in scores.items()})
            record["lr"] = optimizer.param_groups[0]["lr"]
            record["seconds"] = seconds
            record["images_per_second"] = count / seconds
            for key, value in record.items():
                history.setdefault(key, []).append(value)
            print(format_epoch(record, config.epochs))
            warn_if_collapsing(model, record)

            last_completed = make_checkpoint(
                model,
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                epoch=epoch,
                history=history,
                rng_state={
                    "shuffle": shuffle_generator.get_state(),
                    "masks": mask_generator.get_state(),
                    "torch": torch.get_rng_state(),
                },
                train_config=asdict(config),
            )
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, last_completed)
    except KeyboardInterrupt:
        report_interrupt(model, epoch, last_completed, checkpoint_path)
        raise
    return history


def warn_if_collapsing(model, record):
    """Print a warning when a JEPA's target embeddings lost their spread across the batch this epoch."""
    threshold = getattr(model, "collapse_threshold", None)
    spread = record.get("train_target_std")
    if threshold is None or spread is None or spread >= threshold:
        return
    print(
        f"warning: in epoch {record['epoch']} the target embeddings' standard deviation across the "
        f"batch fell to {spread:.4f}, below {threshold}; the model may be collapsing to a constant "
        f"embedding. Lower the learning rate or raise momentum_start."
    )


def report_interrupt(model, epoch, last_completed, checkpoint_path):
    """Make sure the last completed epoch is on disk after Ctrl-C, and print where."""
    if last_completed is None:
        print(f"Training interrupted in epoch {epoch}, before any epoch of this run ended; nothing was saved.")
        return
    path = checkpoint_path
    if path is None:
        path = save_checkpoint(interrupted_checkpoint_path(model), last_completed)
    print(
        f"Training interrupted in epoch {epoch}. The checkpoint of epoch {last_completed['epoch']} "
        f"is at {path}; continue with train(..., resume_from={str(path)!r})."
    )


def format_epoch(record, epochs):
    """Format one epoch's record as a single line for the log."""
    parts = [f"epoch {record['epoch']:>3}/{epochs}"]
    for key, value in record.items():
        if key in ("epoch", "seconds", "images_per_second", "lr"):
            continue
        parts.append(f"{key.replace('_', ' ')} {value:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['seconds']:.1f} s ({record['images_per_second']:.0f} images/s)")
    return "  ".join(parts)


def train_pixel_decoder(jepa, train_set, epochs=2, batch_size=256, lr=1e-3, seed=0, show_progress=True):
    """Fit a `PixelDecoder` that maps the JEPA's frozen target embeddings of each patch to its pixels.

    The JEPA stays in eval mode and runs without gradients, so training the
    decoder never changes it. Returns the decoder (on the JEPA's device) and
    the mean squared pixel error of its last epoch.
    """
    device = next(jepa.parameters()).device
    encoder = jepa.target_encoder
    decoder = PixelDecoder(dim=encoder.dim, patch_dim=encoder.patch_dim).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    images = train_set.images.to(device)
    was_training = jepa.training
    jepa.eval()
    try:
        for epoch in range(1, epochs + 1):
            total, count = 0.0, 0
            batches = iterate_batches(images, None, batch_size, generator)
            steps = math.ceil(len(images) / batch_size)
            for image_batch, _ in tqdm(batches, total=steps, desc=f"pixel decoder {epoch}/{epochs}", leave=False,
                                       disable=not show_progress):
                embeddings = jepa.target_embeddings(image_batch)  # no_grad inside
                loss = F.mse_loss(decoder(embeddings), encoder.patchify(image_batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(image_batch)
                count += len(image_batch)
            print(f"pixel decoder epoch {epoch}/{epochs}  pixel MSE {total / count:.4f}")
    finally:
        jepa.train(was_training)
    return decoder.eval(), total / count
