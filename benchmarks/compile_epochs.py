"""Train one of the notebooks' models with `training.train`, eager and under torch.compile, and print the wall times.

throughput.py times steady-state steps. This script measures whether
compiling pays off over whole epochs, compile time and test-set evaluation
included, for the notebooks' MAE, JEPA or supervised ViT. Both runs start
from the same seed at the precision that `resolve_precision("auto", ...)`
picks:

    MIM_DATA_DIR=/path/to/datasets python benchmarks/compile_epochs.py --model jepa --epochs 2
"""

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classes import JEPA, MAE, ViT  # noqa: E402
from data import load_dataset  # noqa: E402
from throughput import MAE_CONFIG  # noqa: E402  (the configuration that the benchmark times)
from training import TrainConfig, train  # noqa: E402


# the notebooks' encoder shape: the benchmark's configuration without the MAE's decoder settings
ENCODER_SHAPE = {key: MAE_CONFIG[key] for key in ("dim", "depth", "heads", "dim_head", "mlp_dim")}


def build_model(name, pixels):
    """Build the notebooks' MAE, JEPA or supervised ViT from the current random state."""
    if name == "mae":
        return MAE(**MAE_CONFIG, use_cls_token=False, **pixels)
    if name == "jepa":
        return JEPA(**ENCODER_SHAPE, **pixels)
    return ViT(**ENCODER_SHAPE, **pixels, use_cls_token=False, num_classes=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mae", "jepa", "vit"), default="mae",
                        help="the notebooks' MAE, JEPA or supervised ViT (default mae)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="keep only the first images of the MNIST training split (default: all 60,000)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="keep only the first images of the MNIST test split (default: all 10,000)")
    args = parser.parse_args()
    for name in ("epochs", "train_size", "test_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {value}")

    train_set = load_dataset("mnist", "train", limit=args.train_size)
    test_set = load_dataset("mnist", "test", limit=args.test_size)
    pixels = dict(pixel_mean=train_set.images.mean().item(), pixel_std=train_set.images.std().item())
    print(f"PyTorch {torch.__version__}, torch.get_num_threads(): {torch.get_num_threads()}, "
          f"{len(train_set):,} training and {len(test_set):,} test images, {args.epochs} epochs per run, "
          f"model {args.model}")

    for use_compile in (False, True):
        torch.manual_seed(0)
        model = build_model(args.model, pixels)
        lr = 1e-3 if args.model == "vit" else 1.5e-3  # the notebooks' learning rates
        config = TrainConfig(epochs=args.epochs, lr=lr, warmup_epochs=1, seed=0, compile=use_compile)
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            history = train(model, train_set, test_set, config, show_progress=False)
        seconds = time.perf_counter() - started
        steps = ", ".join(f"{value:.1f}" for value in history["seconds"])
        losses = ", ".join(f"{value:.4f}" for value in history["test_loss"])
        print(f"{'compile' if use_compile else 'eager':<8} {seconds:7.1f} s in training.train; "
              f"training steps per epoch: {steps} s; test loss per epoch: {losses}")


if __name__ == "__main__":
    main()
