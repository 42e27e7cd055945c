"""Checkpoints: a resumed run equals the uninterrupted one bit for bit (CPU); a corrupted, truncated or partial
checkpoint is refused with a clear error and nothing of it is loaded."""

import json
import os

import pytest
import torch

from ipl_layers.models.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ipl_layers.models.train import build_model, train
from ipl_layers.models.train_config import parse_config


def run(args, out, **kwargs):
    return train(parse_config(args + [f"--out_dir={out}"]), **kwargs)


def test_resume_equals_the_uninterrupted_run(tiny_train_args, tmp_path):
    tiny_train_args = tiny_train_args + ["--grad_accum=2"]  # accumulation inside the resumed steps too
    full = run(tiny_train_args, tmp_path / "full")
    first = run(tiny_train_args, tmp_path / "sliced", stop_at=3)  # preempted after step 3 (saved there)
    second = run(tiny_train_args, tmp_path / "sliced", resume=True)
    assert len(full["losses"]) == 6 and first["step"] == 3 and second["step"] == 6
    assert first["losses"] + second["losses"] == full["losses"]  # exact float equality, step by step
    assert second["val_loss"] == full["val_loss"]
    assert full["losses"][-1] < full["losses"][0]
    records = [json.loads(line) for line in open(tmp_path / "sliced" / "log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_finished_run_rerun_only_evaluates(tiny_train_args, tmp_path):
    done = run(tiny_train_args, tmp_path)
    again = run(tiny_train_args, tmp_path, resume=True)
    assert again["step"] == 6 and again["losses"] == [] and again["val_loss"] == done["val_loss"]


def test_resume_is_explicit_and_checks_the_config(tiny_train_args, tmp_path):
    run(tiny_train_args, tmp_path, stop_at=2)
    with pytest.raises(ValueError, match="holds a checkpoint .*pass --resume"):
        run(tiny_train_args, tmp_path)
    with pytest.raises(ValueError, match="--resume: seed = 1 differs from the checkpoint's 0"):
        run(tiny_train_args + ["--seed=1"], tmp_path, resume=True)


def corrupt_flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("file, damage, message", [
    ("model.safetensors", corrupt_flip, "model.safetensors sha256 differs from the manifest: corrupted"),
    ("trainer.pt", corrupt_truncate, "trainer.pt has .* bytes, the manifest says .*: truncated"),
    ("manifest.json", os.remove, "no manifest.json: partial"),
    ("trainer.pt", os.remove, "trainer.pt missing"),
])
def test_damaged_checkpoints_are_refused(tiny_train_args, tmp_path, file, damage, message):
    run(tiny_train_args, tmp_path, stop_at=2)
    checkpoint = latest_checkpoint(str(tmp_path))
    damage(tmp_path / os.path.basename(checkpoint) / file)
    model = build_model(parse_config(tiny_train_args))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(checkpoint, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    with pytest.raises(CheckpointError, match="not loaded"):
        run(tiny_train_args, tmp_path, resume=True)


def test_only_complete_checkpoints_are_named(tiny_train_args, tmp_path):
    run(tiny_train_args, tmp_path / "run")
    names = sorted(os.listdir(tmp_path / "run"))
    assert names == ["latest", "log.jsonl", "step-00000004", "step-00000006"]  # the last 2 kept, no temp folder
    assert open(tmp_path / "run" / "latest").read() == "step-00000006"
