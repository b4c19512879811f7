"""Tests of device choice, seeding, the learning-rate schedule and the training loop."""

import math
import os
from unittest import mock

import pytest
import torch

import training
from classes import MAE, ViT
from data import ImageDataset
from training import (
    TrainConfig,
    build_optimizer,
    choose_device,
    learning_rate_factor,
    resolve_compile,
    resolve_precision,
    seed_everything,
    train,
)


def tiny_mae():
    return MAE(image_size=8, patch_size=4, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32,
               decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_dim_head=8, decoder_mlp_dim=32)


def tiny_dataset(size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (size,), generator=generator)
    return ImageDataset(images, labels, ["a", "b", "c"], "tiny", "train")


def quiet_config(**overrides):
    config = dict(epochs=2, batch_size=16, warmup_epochs=1, precision="float32", eval_batch_size=32)
    config.update(overrides)
    return TrainConfig(**config)


@pytest.fixture(autouse=True)
def forget_announced_devices():
    training._announced_devices.clear()


def test_device_prefers_cuda(capsys):
    with mock.patch("torch.cuda.is_available", return_value=True), \
         mock.patch("torch.backends.mps.is_available", return_value=True), \
         mock.patch.dict(os.environ, {}, clear=True):
        assert choose_device().type == "cuda"
    assert "cuda" in capsys.readouterr().out


def test_device_falls_back_to_mps():
    with mock.patch("torch.cuda.is_available", return_value=False), \
         mock.patch("torch.backends.mps.is_available", return_value=True), \
         mock.patch.dict(os.environ, {}, clear=True):
        assert choose_device().type == "mps"


def test_device_falls_back_to_cpu():
    with mock.patch("torch.cuda.is_available", return_value=False), \
         mock.patch("torch.backends.mps.is_available", return_value=False), \
         mock.patch.dict(os.environ, {}, clear=True):
        assert choose_device().type == "cpu"


def test_device_environment_variable_overrides():
    with mock.patch("torch.cuda.is_available", return_value=True), \
         mock.patch.dict(os.environ, {"MIM_DEVICE": "cpu"}):
        assert choose_device().type == "cpu"


def test_device_printed_once(capsys):
    with mock.patch.dict(os.environ, {"MIM_DEVICE": "cpu"}):
        choose_device()
        choose_device()
    assert capsys.readouterr().out.count("Using device") == 1


def test_unavailable_device_request_raises():
    with mock.patch("torch.cuda.is_available", return_value=False):
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


def test_unknown_device_name_raises():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        choose_device("gpu0")


def test_seed_everything_repeats_random_draws():
    seed_everything(7)
    first = torch.rand(3)
    seed_everything(7)
    assert torch.equal(torch.rand(3), first)


def test_precision_resolution():
    assert resolve_precision("float32", "cpu") is None
    assert resolve_precision("bfloat16", "cpu") == torch.bfloat16
    assert resolve_precision("auto", "mps") is None
    with mock.patch("training.cpu_supports_bfloat16", return_value=False):
        assert resolve_precision("auto", "cpu") is None
    with mock.patch("training.cpu_supports_bfloat16", return_value=True):
        assert resolve_precision("auto", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("half", "cpu")


def test_compile_resolution_passes_switches_through():
    assert resolve_compile(True, "mps", total_steps=1) is True
    assert resolve_compile(False, "cpu", total_steps=10**6) is False
    with pytest.raises(ValueError, match="compile must be 'auto', True or False; got 'yes'"):
        resolve_compile("yes", "cpu", total_steps=10**6)


def test_compile_auto_conditions():
    long_run = training.COMPILE_MIN_STEPS
    with mock.patch("platform.system", return_value="Linux"), \
         mock.patch("shutil.which", return_value="/usr/bin/g++"):
        assert resolve_compile("auto", "cpu", total_steps=long_run) is True
        assert resolve_compile("auto", "cpu", total_steps=long_run - 1) is False
        assert resolve_compile("auto", "mps", total_steps=long_run) is False
        assert resolve_compile("auto", "cpu", total_steps=long_run, fixed_shapes=False) is False
    with mock.patch("platform.system", return_value="Linux"), mock.patch("shutil.which", return_value=None):
        assert resolve_compile("auto", "cpu", total_steps=long_run) is False
    with mock.patch("platform.system", return_value="Darwin"), \
         mock.patch("shutil.which", return_value="/usr/bin/clang++"):
        assert resolve_compile("auto", "cpu", total_steps=long_run) is False


@pytest.mark.parametrize("setting, compiled", [(True, True), (False, False), ("auto", False)])
def test_train_compiles_when_resolved(setting, compiled, capsys):
    wrapped = []

    def fake_compile(model):
        wrapped.append(model)
        return model

    model = tiny_mae()
    with mock.patch("torch.compile", side_effect=fake_compile):
        train(model, tiny_dataset(32), None, quiet_config(epochs=1, compile=setting), show_progress=False)
    assert wrapped == ([model] if compiled else [])
    assert ("Compiling the training step" in capsys.readouterr().out) == compiled


def test_only_jepa_has_changing_shapes():
    from classes import JEPA

    assert MAE.fixed_shapes
    assert ViT.fixed_shapes
    assert not JEPA.fixed_shapes


def test_learning_rate_warms_up_then_decays():
    factors = [learning_rate_factor(step, 10, 100, 0.01) for step in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in zip(factors[9:], factors[10:]))
    assert learning_rate_factor(100, 10, 100, 0.01) == pytest.approx(0.01)


def test_optimizer_skips_decay_for_biases_norms_and_tokens():
    model = tiny_mae()
    optimizer = build_optimizer(model, TrainConfig())
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, parameter in model.named_parameters():
        expect_decay = name.endswith("weight") and parameter.dim() == 2
        assert (id(parameter) in decayed) == expect_decay, name


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("batch_size", 0), ("epochs", 1.5), ("lr", 0.0), ("lr", float("nan")),
     ("min_lr", -1.0), ("warmup_epochs", 5), ("weight_decay", -0.1), ("beta2", 1.0), ("precision", "fp8"),
     ("compile", "yes")],
)
def test_invalid_train_config_raises_before_training(field, value):
    model = tiny_mae()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=field if field != "precision" else "precision"):
        train(model, tiny_dataset(), None, quiet_config(**{field: value}), show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 16, 16), (1, 8, 12)])
def test_images_of_another_shape_raise_before_training(shape):
    model = tiny_mae()
    before = [p.clone() for p in model.parameters()]
    data = ImageDataset(torch.rand(16, *shape), torch.zeros(16, dtype=torch.int64), ["x"], "tiny", "train")
    with pytest.raises(ValueError, match=r"model was built for \(1, 8, 8\)"):
        train(model, data, None, quiet_config(), show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_empty_training_set_raises():
    empty = ImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64), [], "tiny", "train")
    with pytest.raises(ValueError, match="empty"):
        train(tiny_mae(), empty, None, quiet_config(), show_progress=False)


def test_train_returns_history_per_epoch():
    history = train(tiny_mae(), tiny_dataset(), tiny_dataset(32, seed=1), quiet_config(epochs=3), show_progress=False)
    assert history["epoch"] == [1, 2, 3]
    for key in ("train_loss", "test_loss", "lr", "seconds", "images_per_second"):
        assert len(history[key]) == 3, key
        assert all(math.isfinite(value) for value in history[key])


def test_training_lowers_the_loss():
    seed_everything(0)
    model = tiny_mae()
    dataset = tiny_dataset(32)
    history = train(model, dataset, None, quiet_config(epochs=15, lr=3e-3, warmup_epochs=1), show_progress=False)
    assert history["train_loss"][-1] < 0.7 * history["train_loss"][0]


def test_same_seed_gives_same_history():
    histories = []
    for _ in range(2):
        seed_everything(3)
        histories.append(train(tiny_mae(), tiny_dataset(), tiny_dataset(32, 1), quiet_config(), show_progress=False))
    assert histories[0]["train_loss"] == histories[1]["train_loss"]
    assert histories[0]["test_loss"] == histories[1]["test_loss"]


def test_classifier_vit_trains_with_labels():
    seed_everything(0)
    model = ViT(image_size=8, patch_size=4, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, num_classes=3)
    history = train(model, tiny_dataset(), tiny_dataset(32, 1), quiet_config(), show_progress=False)
    assert "train_accuracy" in history
    assert "test_accuracy" in history


def test_bfloat16_loss_curve_tracks_float32():
    curves = {}
    for precision in ("float32", "bfloat16"):
        seed_everything(0)
        curves[precision] = train(tiny_mae(), tiny_dataset(128), None, quiet_config(epochs=4, precision=precision),
                                  show_progress=False)["train_loss"]
    for full, low in zip(curves["float32"], curves["bfloat16"]):
        assert abs(full - low) <= 0.05 * full
