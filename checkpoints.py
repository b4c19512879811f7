"""Checkpoints that are written atomically and can never run code when loaded.

A checkpoint is a dict of tensors and plain Python values (str, int, float,
bool, None, lists, tuples, dicts), saved with `torch.save` and read back with
`torch.load(weights_only=True)`, which rejects anything else. It contains the
model's class name and constructor arguments, so `build_model` can rebuild the
model without the code that trained it. For resuming, it also contains the
optimizer and scheduler state, the epoch, the random-number generator states
and the history.
"""

import os
import pickle
import tempfile
from pathlib import Path

import torch

from classes import JEPA, MAE, PixelDecoder, ViT

CHECKPOINT_FORMAT = "mim-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "model_class", "model_config", "model_state")

# class name stored in a checkpoint -> class that rebuilds it from its config
MODEL_CLASSES = {"JEPA": JEPA, "MAE": MAE, "PixelDecoder": PixelDecoder, "ViT": ViT}


def register_model_class(model_class):
    """Let checkpoints store and rebuild `model_class` (which must have a `config` dict)."""
    MODEL_CLASSES[model_class.__name__] = model_class
    return model_class


def clone_to_cpu(value):
    """Copy every tensor in a nested structure of dicts, lists and tuples to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: clone_to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_to_cpu(item) for item in value)
    return value


def make_checkpoint(model, **training_state):
    """Build a checkpoint dict of CPU tensors and plain values for `model`.

    Keyword arguments (optimizer_state, scheduler_state, epoch, history,
    rng_state, train_config, ...) are stored next to the model as they are,
    after copying their tensors to the CPU.
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(
            f"cannot checkpoint a {name}: only {sorted(MODEL_CLASSES)} can be rebuilt from a "
            f"checkpoint; register the class with checkpoints.register_model_class"
        )
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_class": name,
        "model_config": dict(model.config),
        "model_state": clone_to_cpu(model.state_dict()),
    }
    checkpoint.update(clone_to_cpu(training_state))
    return checkpoint


def save_checkpoint(path, checkpoint):
    """Write `checkpoint` to `path` atomically.

    The data goes to a temporary file in the same directory, which is flushed
    to disk and then renamed over `path` with `os.replace`. An interruption or
    error therefore leaves either the old file or the new one, never a
    truncated file; the temporary file is removed on error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file readable by its owner only; give it the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_name, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint of this project with `weights_only=True` and check its layout.

    `map_location` moves every tensor, so a file saved on CUDA or MPS loads on
    a CPU-only machine. Raises FileNotFoundError for a missing file and
    ValueError for a file that is truncated, is not a PyTorch file, contains
    objects other than tensors and plain values, or is not a checkpoint of
    this project.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{str(path)!r} is not a checkpoint of this project: it contains objects other than "
            f"tensors and plain values, which weights_only loading rejects so that a file can "
            f"never run code ({unpickler_reason(error)})"
        ) from error
    except Exception as error:  # noqa: BLE001 - a damaged file can fail in any of the unpickler's steps
        raise ValueError(
            f"{str(path)!r} could not be read as a checkpoint: the file is truncated or is not a "
            f"PyTorch file ({error}); train again or use another checkpoint"
        ) from error

    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is a PyTorch file but not a checkpoint of this project "
            f"(no 'format': {CHECKPOINT_FORMAT!r} entry)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks the entries {missing}")
    if checkpoint["version"] > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {checkpoint['version']}, newer than the "
            f"{CHECKPOINT_VERSION} this code reads; update the code"
        )
    return checkpoint


def unpickler_reason(error):
    """Return the line of a weights_only UnpicklingError that names the rejected object."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line
    return lines[0] if lines else type(error).__name__


def load_model_state(model, state, source="checkpoint"):
    """Load a state dict into `model`, raising ValueError that lists missing and unexpected keys."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source} does not match the {type(model).__name__} model: "
            f"missing keys {list(result.missing_keys)}, unexpected keys {list(result.unexpected_keys)}"
        )


def build_model(checkpoint, device="cpu"):
    """Rebuild the model stored in a checkpoint dict and load its weights."""
    name = checkpoint["model_class"]
    if name not in MODEL_CLASSES:
        raise ValueError(
            f"checkpoint contains a model of class {name!r}, which this code cannot rebuild; "
            f"known classes: {sorted(MODEL_CLASSES)}"
        )
    model = MODEL_CLASSES[name](**checkpoint["model_config"])
    load_model_state(model, checkpoint["model_state"], source=f"checkpoint of model class {name}")
    return model.to(device)


def load_model(path, device="cpu"):
    """Read a checkpoint file and return its model on `device`, in eval mode."""
    return build_model(load_checkpoint(path, map_location="cpu"), device).eval()
