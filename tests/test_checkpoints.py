"""Tests of checkpoint files: round trip, atomic writes, safe loading, resume, interruption and failure."""

import contextlib
import os
from unittest import mock

import pytest
import torch
from torch import serialization

import checkpoints
from checkpoints import build_model, load_checkpoint, load_model, make_checkpoint, save_checkpoint
from classes import JEPA, MAE
from test_training import quiet_config, tiny_dataset, tiny_mae
from training import seed_everything, train


def test_round_trip_restores_model_and_config(tmp_path):
    model = tiny_mae()
    path = save_checkpoint(tmp_path / "model.pt", make_checkpoint(model, epoch=3, history={"loss": [1.0]}))
    checkpoint = load_checkpoint(path)
    rebuilt = build_model(checkpoint)
    assert checkpoint["epoch"] == 3
    assert rebuilt.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_model_returns_eval_mode(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", make_checkpoint(tiny_mae()))
    assert not load_model(path).training


def test_jepa_round_trip(tmp_path):
    model = JEPA(image_size=8, patch_size=2, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, predictor_dim=16,
                 predictor_depth=1, predictor_dim_head=4, min_context=2)
    path = save_checkpoint(tmp_path / "jepa.pt", make_checkpoint(model))
    rebuilt = load_model(path)
    assert torch.equal(rebuilt.target_encoder.patch_embedding.weight, model.target_encoder.patch_embedding.weight)
    assert not any(p.requires_grad for p in rebuilt.target_encoder.parameters())


def test_checkpoint_is_plain_data(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", make_checkpoint(tiny_mae(), history={"a": [1.0]}))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["model_class"] == "MAE"


def test_interrupted_write_keeps_old_file(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, make_checkpoint(tiny_mae(), epoch=1))
    before = path.read_bytes()

    def fail_midway(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise KeyboardInterrupt

    with mock.patch("checkpoints.torch.save", side_effect=fail_midway):
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, make_checkpoint(tiny_mae(), epoch=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_pickle_that_runs_code_is_rejected(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "mim-checkpoint", "payload": RunsCode()}, path)
    with mock.patch("os.system") as system:
        with pytest.raises(ValueError, match="weights_only"):
            load_checkpoint(path)
    system.assert_not_called()


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", make_checkpoint(tiny_mae()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(path)


def test_foreign_pytorch_file_is_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_mae().state_dict(), path)
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_checkpoint(path)


def test_text_file_is_rejected(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    checkpoint = make_checkpoint(tiny_mae())
    checkpoint["model_state"] = {key: value for key, value in checkpoint["model_state"].items() if key.startswith("encoder.")}
    checkpoint["model_state"]["extra.weight"] = torch.zeros(1)
    path = save_checkpoint(tmp_path / "encoder_only.pt", checkpoint)
    with pytest.raises(ValueError) as error:
        load_model(path)
    message = str(error.value)
    assert "missing keys" in message
    assert "decoder.mask_token" in message
    assert "unexpected keys" in message
    assert "extra.weight" in message


@contextlib.contextmanager
def tensors_tagged_as_cuda():
    """Make torch.save record every tensor as stored on cuda:0, as a file saved on a GPU is."""

    def tag(storage):
        return "cuda:0"

    serialization.register_package(1, tag, lambda storage, location: None)
    try:
        yield
    finally:
        serialization._package_registry[:] = [
            entry for entry in serialization._package_registry if entry[1] is not tag
        ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_checkpoint_saved_on_cuda_loads_on_cpu(tmp_path):
    model = tiny_mae()
    with tensors_tagged_as_cuda():
        path = save_checkpoint(tmp_path / "gpu.pt", make_checkpoint(model))
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # a plain load fails on this machine
    loaded = load_model(path)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(loaded.decoder.mask_token, model.decoder.mask_token)


def test_checkpoint_written_every_epoch(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny_mae(), tiny_dataset(), None, quiet_config(epochs=2), checkpoint_path=path, show_progress=False)
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 2
    for key in ("optimizer_state", "scheduler_state", "rng_state", "history", "train_config"):
        assert key in checkpoint, key


def test_resume_matches_straight_run(tmp_path):
    seed_everything(0)
    straight = train(tiny_mae(), tiny_dataset(), tiny_dataset(32, 1), quiet_config(epochs=2), show_progress=False)

    # epoch 1 of the 2-epoch schedule, then a resumed run for epoch 2
    seed_everything(0)
    path = tmp_path / "run.pt"
    first = train(tiny_mae(), tiny_dataset(), tiny_dataset(32, 1), quiet_config(epochs=2), checkpoint_path=path,
                  stop_after_epoch=1, show_progress=False)
    assert first["epoch"] == [1]
    assert load_checkpoint(path)["epoch"] == 1

    resumed_model = tiny_mae()
    resumed = train(resumed_model, tiny_dataset(), tiny_dataset(32, 1), quiet_config(epochs=2), checkpoint_path=path,
                    resume_from=path, show_progress=False)
    assert resumed["epoch"] == [1, 2]
    for key in ("train_loss", "test_loss"):
        for a, b in zip(straight[key], resumed[key]):
            assert a == pytest.approx(b, abs=1e-6), key


def test_resume_rejects_other_model_config(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny_mae(), tiny_dataset(), None, quiet_config(epochs=1), checkpoint_path=path, show_progress=False)
    other = MAE(image_size=8, patch_size=2, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, decoder_dim=16,
                decoder_depth=1, decoder_heads=2, decoder_dim_head=8, decoder_mlp_dim=32)
    with pytest.raises(ValueError, match="differs"):
        train(other, tiny_dataset(), None, quiet_config(epochs=2), resume_from=path, show_progress=False)


def test_ctrl_c_keeps_last_epoch_and_says_where(tmp_path, capsys):
    path = tmp_path / "run.pt"
    model = tiny_mae()
    steps = {"count": 0}
    original_step = torch.optim.AdamW.step

    def interrupt_in_second_epoch(self, *args, **kwargs):
        steps["count"] += 1
        if steps["count"] == 6:  # 4 steps per epoch: the second step of epoch 2
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    with mock.patch("torch.optim.AdamW.step", interrupt_in_second_epoch):
        with pytest.raises(KeyboardInterrupt):
            train(model, tiny_dataset(), None, quiet_config(epochs=3), checkpoint_path=path, show_progress=False)
    output = capsys.readouterr().out
    assert "interrupted in epoch 2" in output
    assert str(path) in output
    assert load_checkpoint(path)["epoch"] == 1


def test_ctrl_c_without_path_saves_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = {"count": 0}
    original_step = torch.optim.AdamW.step

    def interrupt_in_second_epoch(self, *args, **kwargs):
        steps["count"] += 1
        if steps["count"] == 6:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    with mock.patch("torch.optim.AdamW.step", interrupt_in_second_epoch):
        with pytest.raises(KeyboardInterrupt):
            train(tiny_mae(), tiny_dataset(), None, quiet_config(epochs=3), show_progress=False)
    saved = tmp_path / "checkpoints" / "interrupted_mae.pt"
    assert str(saved.relative_to(tmp_path)) in capsys.readouterr().out
    assert load_checkpoint(saved)["epoch"] == 1


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    model = tiny_mae()
    train(model, tiny_dataset(), None, quiet_config(epochs=1), checkpoint_path=path, show_progress=False)
    before = path.read_bytes()

    bad = tiny_dataset()
    bad.images[20] = float("nan")  # lands in some batch of the next run
    with pytest.raises(FloatingPointError) as error:
        train(model, bad, None, quiet_config(epochs=2), checkpoint_path=path, show_progress=False)
    message = str(error.value)
    assert "epoch 1" in message
    assert "step" in message
    assert "last finite loss" in message
    assert path.read_bytes() == before


def test_checkpoint_gets_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "model.pt", make_checkpoint(tiny_mae()))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
