"""Checkpoints that are either complete and intact or refused.

A checkpoint is a folder `step-<n>/` in the run folder holding `model.safetensors` (weights), `trainer.pt`
(optimizer, scheduler, RNG states, step, the config) and `manifest.json` (the size and sha256 of both). It is
written into a temporary folder and renamed into place, then the run's `latest` file is replaced atomically, so a
crash leaves either the previous checkpoint or the new one, never a half-written one under a real name. Loading
checks the manifest first and raises `CheckpointError` naming the file and what is wrong; nothing is loaded from
a checkpoint that fails.
"""

import hashlib
import json
import os
import shutil
from typing import List, Optional

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

FILES = ("model.safetensors", "trainer.pt")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupted."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_atomically(path: str, text: str):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, trainer_state: dict, keep: int = 2,
                    only: Optional[List[str]] = None) -> str:
    """Writes `run_dir/step-<step>/` atomically, points `run_dir/latest` at it, keeps the last `keep` ones.
    `only`: the names of the parameters to store (a model whose other weights come from elsewhere)."""
    name = f"step-{step:08d}"
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash during an earlier save
    os.makedirs(tmp)
    if only is None:
        save_model(model, os.path.join(tmp, FILES[0]))  # handles the tied embedding / head weights
    else:
        params = dict(model.named_parameters())
        save_file({name: params[name].detach().contiguous() for name in only}, os.path.join(tmp, FILES[0]))
    torch.save(trainer_state, os.path.join(tmp, FILES[1]))
    manifest = {"step": step, "files": {f: {"size": os.path.getsize(os.path.join(tmp, f)),
                                            "sha256": _sha256(os.path.join(tmp, f))} for f in FILES}}
    _replace_atomically(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step (a rerun of a finished run)
    os.rename(tmp, final)
    _replace_atomically(os.path.join(run_dir, "latest"), name)
    old = sorted(d for d in os.listdir(run_dir) if d.startswith("step-") and d != name)
    for d in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(run_dir, d))
    return final


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The folder `run_dir/latest` names, or None when the run has no checkpoint yet."""
    pointer = os.path.join(run_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run_dir, f.read().strip())


def verify_checkpoint(path: str) -> dict:
    """The manifest of `path`, after checking every file's presence, size and sha256 against it."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path!r}: no {MANIFEST}: partial or not a checkpoint; not loaded")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r}: unreadable {MANIFEST} ({e}); not loaded") from e
    for name in FILES:
        file, expected = os.path.join(path, name), files.get(name)
        if expected is None or not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path!r}: {name} missing (from the folder or the manifest); not loaded")
        size = os.path.getsize(file)
        if size != expected["size"]:
            raise CheckpointError(f"checkpoint {path!r}: {name} has {size} bytes, the manifest says "
                                  f"{expected['size']}: truncated or partial; not loaded")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path!r}: {name} sha256 differs from the manifest: corrupted; "
                                  "not loaded")
    return files


def load_checkpoint(path: str, model: torch.nn.Module, partial: bool = False) -> dict:
    """Verifies `path`, loads its weights into `model` and returns the trainer state. `partial`: the checkpoint
    holds some of the model's parameters (saved with `only`); each must exist in the model with its shape."""
    verify_checkpoint(path)
    if not partial:
        load_model(model, os.path.join(path, FILES[0]))
    else:
        params, stored = dict(model.named_parameters()), load_file(os.path.join(path, FILES[0]))
        for name, value in stored.items():  # all checked before any is copied
            if name not in params or params[name].shape != value.shape:
                got = tuple(params[name].shape) if name in params else "no such parameter"
                raise CheckpointError(f"checkpoint {path!r}: {name} {tuple(value.shape)} does not fit the model "
                                      f"({got}); not loaded")
        with torch.no_grad():
            for name, value in stored.items():
                params[name].copy_(value)
    return torch.load(os.path.join(path, FILES[1]), weights_only=True)


def read_trainer_state(path: str) -> dict:
    """The verified trainer state alone (config, step), before a model exists to load weights into."""
    verify_checkpoint(path)
    return torch.load(os.path.join(path, FILES[1]), weights_only=True)
