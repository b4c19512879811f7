"""MNIST and Fashion-MNIST as tensors, and batches sliced from them.

The data sets are read once through torchvision and kept as one float32
tensor of images (N, 1, 28, 28) with values in [0, 1] and one int64 tensor of
labels. Training then slices batches from memory instead of collating images
through a per-image transform.

The data directory comes from the `MIM_DATA_DIR` environment variable, or is
`./data`. torchvision downloads a data set into it only when its files are
missing.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets

DATA_DIR_VARIABLE = "MIM_DATA_DIR"

# name used in this project -> (torchvision class, folder torchvision reads under the data directory)
DATASETS = {
    "mnist": (datasets.MNIST, "MNIST"),
    "fashion-mnist": (datasets.FashionMNIST, "FashionMNIST"),
}

CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}

RAW_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


@dataclass
class ImageDataset:
    """Images and labels of one split, held as tensors.

    images: (N, 1, 28, 28) float32 in [0, 1]; labels: (N,) int64.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list
    name: str
    split: str

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        """Return a copy with images and labels on `device`."""
        return ImageDataset(
            self.images.to(device), self.labels.to(device), self.class_names, self.name, self.split
        )


def default_data_dir():
    """Return the data directory: `$MIM_DATA_DIR`, or `./data` when it is unset."""
    return Path(os.environ.get(DATA_DIR_VARIABLE, "data"))


def check_dataset_name(name):
    """Return `name` in the project's spelling, or raise ValueError listing the known names."""
    key = str(name).lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return key


def check_data_dir(data_dir):
    """Raise ValueError if `data_dir` points inside a data set's folder instead of at its parent.

    torchvision looks for `<data_dir>/MNIST/raw/...`, so a path ending in
    `MNIST`, `FashionMNIST` or `raw` that already contains the files is one level
    (or two) too deep, and torchvision would download a second copy below it.
    """
    data_dir = Path(data_dir)
    folder_names = {folder for _, folder in DATASETS.values()}
    if data_dir.name in folder_names and (data_dir / "raw").is_dir():
        raise ValueError(
            f"data directory {str(data_dir)!r} points at the {data_dir.name} folder itself; "
            f"pass its parent {str(data_dir.parent)!r}, which torchvision searches for "
            f"{data_dir.name}/raw/"
        )
    if data_dir.name == "raw" and data_dir.parent.name in folder_names:
        raise ValueError(
            f"data directory {str(data_dir)!r} points at a raw/ folder; pass "
            f"{str(data_dir.parent.parent)!r}, which torchvision searches for "
            f"{data_dir.parent.name}/raw/"
        )


def missing_files_message(name, data_dir, error):
    """Build the error message for a failed download: which four files to put where."""
    folder = Path(data_dir) / DATASETS[name][1] / "raw"
    files = "\n".join(f"  {folder / file_name}" for file_name in RAW_FILES)
    return (
        f"could not download the {name} data set into {str(data_dir)!r} ({error}).\n"
        f"Without network access, copy these four files there (uncompressed, or as .gz):\n"
        f"{files}\n"
        f"or set {DATA_DIR_VARIABLE} to a directory that already holds {DATASETS[name][1]}/raw/."
    )


def load_dataset(name, split="train", data_dir=None, limit=None, download=True):
    """Load one split of MNIST or Fashion-MNIST as an `ImageDataset` on the CPU.

    `limit` keeps only the first `limit` images. torchvision reads the raw
    files in `<data_dir>/<MNIST or FashionMNIST>/raw/` and downloads them only
    when they are missing. If the download fails, the RuntimeError lists the
    files to put there by hand.
    """
    name = check_dataset_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f"limit must be a positive number of images, or None for the whole split; got {limit!r}"
        )
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    check_data_dir(data_dir)

    dataset_class, _ = DATASETS[name]
    try:
        raw = dataset_class(root=str(data_dir), train=(split == "train"), download=download)
    except (RuntimeError, OSError) as error:
        raise RuntimeError(missing_files_message(name, data_dir, error)) from error

    images = raw.data
    labels = raw.targets
    if limit is not None:
        if limit > len(labels):
            raise ValueError(
                f"limit {limit} is larger than the {len(labels)} images of the {name} {split} "
                f"split; pass at most {len(labels)}, or None for all"
            )
        images, labels = images[:limit], labels[:limit]

    images = images.unsqueeze(1).to(torch.float32).div_(255)  # [N, 1, 28, 28] in [0, 1]
    return ImageDataset(images, labels.to(torch.int64), CLASS_NAMES[name], name, split)


def fits_on_device(num_bytes, device):
    """Return whether `num_bytes` of data can stay on `device` next to a model.

    On CUDA the data may take at most a quarter of the free memory. The CPU and
    Apple MPS (unified memory) always fit data of this size.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return num_bytes <= free // 4
    return True


def move_to_device(dataset, device):
    """Return `dataset` on `device` when it fits there, else unchanged on the CPU."""
    num_bytes = dataset.images.numel() * dataset.images.element_size()
    if fits_on_device(num_bytes, device):
        return dataset.to(device)
    return dataset


def iterate_batches(images, labels=None, batch_size=256, generator=None, drop_last=False):
    """Yield (images, labels) batches sliced from tensors, shuffled when a generator is given.

    One gather per epoch puts the data in shuffled order; every batch after that
    is a view. With `drop_last`, a final batch smaller than `batch_size` is skipped.
    `labels` may be None, and then every yielded label batch is None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    if generator is not None:
        order = torch.randperm(len(images), generator=generator).to(images.device)
        images = images[order]
        labels = labels[order.to(labels.device)] if labels is not None else None

    stop = len(images) - len(images) % batch_size if drop_last else len(images)
    for start in range(0, stop, batch_size):
        end = start + batch_size
        yield images[start:end], (labels[start:end] if labels is not None else None)
