"""Tests of data loading from the shared directory, its errors, and batch slicing."""

import os
from unittest import mock

import pytest
import torch

import data
from data import check_data_dir, iterate_batches, load_dataset, move_to_device


@pytest.mark.parametrize("name, split, size", [("mnist", "test", 10000), ("fashion-mnist", "test", 10000), ("mnist", "train", 60000)])
def test_load_from_data_dir(data_dir, name, split, size):
    dataset = load_dataset(name, split, data_dir)
    assert len(dataset) == size
    assert dataset.images.shape == (size, 1, 28, 28)
    assert dataset.images.dtype == torch.float32
    assert dataset.labels.dtype == torch.int64
    assert dataset.images.min() >= 0.0
    assert dataset.images.max() <= 1.0
    assert sorted(dataset.labels.unique().tolist()) == list(range(10))


def test_mnist_statistics_match_the_data_set(data_dir):
    images = load_dataset("mnist", "train", data_dir).images
    assert images.mean().item() == pytest.approx(0.1307, abs=5e-4)
    assert images.std().item() == pytest.approx(0.3081, abs=5e-4)


def test_loading_writes_nothing(data_dir):
    before = sorted(str(path) for path in data_dir.rglob("*"))
    load_dataset("fashion-mnist", "test", data_dir)
    assert sorted(str(path) for path in data_dir.rglob("*")) == before


def test_limit_keeps_first_images(data_dir):
    full = load_dataset("mnist", "test", data_dir)
    small = load_dataset("mnist", "test", data_dir, limit=100)
    assert torch.equal(small.images, full.images[:100])


@pytest.mark.parametrize("limit", [0, -5, 1.5, True])
def test_invalid_limit_raises(data_dir, limit):
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist", "test", data_dir, limit=limit)


def test_limit_above_split_size_raises(data_dir):
    with pytest.raises(ValueError, match="at most 10000"):
        load_dataset("mnist", "test", data_dir, limit=10001)


def test_class_names_of_fashion_mnist(data_dir):
    dataset = load_dataset("FashionMNIST", "test", data_dir, limit=10)
    assert dataset.name == "fashion-mnist"
    assert dataset.class_names[9] == "Ankle boot"


def test_unknown_dataset_name_raises():
    with pytest.raises(ValueError, match="unknown data set 'cifar10'.*fashion-mnist"):
        load_dataset("cifar10")


@pytest.mark.parametrize("suffix", ["MNIST", "MNIST/raw", "FashionMNIST", "FashionMNIST/raw"])
def test_data_dir_one_level_too_deep_is_explained(data_dir, suffix):
    with pytest.raises(ValueError, match="pass") as error:
        check_data_dir(data_dir / suffix)
    assert str(data_dir) in str(error.value)


def test_failed_download_names_the_four_files(tmp_path):
    def refuse(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    with mock.patch("torchvision.datasets.mnist.download_and_extract_archive", side_effect=refuse):
        with pytest.raises(RuntimeError) as error:
            load_dataset("mnist", "train", tmp_path)
    message = str(error.value)
    for file_name in data.RAW_FILES:
        assert str(tmp_path / "MNIST" / "raw" / file_name) in message
    assert "MIM_DATA_DIR" in message


def test_default_data_dir_from_environment(tmp_path):
    with mock.patch.dict(os.environ, {"MIM_DATA_DIR": str(tmp_path)}):
        assert data.default_data_dir() == tmp_path


def test_iterate_batches_slices_every_image_once():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    labels = torch.arange(10)
    batches = list(iterate_batches(images, labels, 4, torch.Generator().manual_seed(0)))
    assert [len(batch) for batch, _ in batches] == [4, 4, 2]
    seen = torch.cat([batch.flatten() for batch, _ in batches])
    assert sorted(seen.tolist()) == list(range(10))
    for batch, label_batch in batches:
        assert torch.equal(batch.flatten().long(), label_batch)


def test_iterate_batches_without_generator_keeps_order_and_drop_last():
    images = torch.arange(10.0)
    batches = [batch for batch, _ in iterate_batches(images, None, 4, drop_last=True)]
    assert [batch.tolist() for batch in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_iterate_batches_rejects_batch_size_zero():
    with pytest.raises(ValueError, match="batch_size"):
        list(iterate_batches(torch.zeros(3), None, 0))


def test_move_to_device_keeps_cpu_data(data_dir):
    dataset = load_dataset("mnist", "test", data_dir, limit=8)
    assert move_to_device(dataset, "cpu").images.device.type == "cpu"
