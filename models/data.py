"""Training data as one flat token array per split, and batches that are a pure function of (seed, step).

Sources:
- the default: a byte-level corpus of the running interpreter's standard-library `.py` files (no download),
  split into train/validation by file, on a hash of the file's path relative to the stdlib root, so the split is
  the same on every run and machine with that Python;
- text files (a file or a folder of files): bytes, split by file the same way;
- a pre-tokenized `.npy` (any integer dtype) or `.bin` (raw `token_dtype`, uint16 by default as nanoGPT writes
  them) token file, memory-mapped: the last `val_fraction` of its tokens is the validation split.

Documents are joined with a 0 byte (NUL never occurs in source text), so byte models see document boundaries.
A batch is drawn from `numpy.random.default_rng([seed, step, micro])`: the data position is just the step, which
makes resuming exact without saving any sampler state, and any rank can draw its own rows of the global batch.
"""

import hashlib
import os
import sysconfig
from typing import List, Optional, Tuple

import numpy as np
import torch

SEPARATOR = 0
BYTE_VOCAB = 256
# tests, tooling and vendored packages: large, repetitive and not "the standard library" a model should read
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """True for the files of the validation split: a stable hash (not Python's salted `hash`) of the path."""
    digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < val_fraction


def _text_files(root: str, suffix: Optional[str]) -> List[str]:
    """Relative paths of the files under `root` (ending with `suffix` when given), sorted: the order is fixed."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if suffix is None or f.endswith(suffix)]
    return sorted(found)


def _byte_splits(root: str, files: List[str], val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    parts = {False: [], True: []}
    for relative in files:
        with open(os.path.join(root, relative), "rb") as f:
            parts[is_validation(relative, val_fraction)] += [f.read(), bytes([SEPARATOR])]
    if not parts[False] or not parts[True]:
        raise ValueError(f"data: {len(files)} files under {root!r} give an empty train or validation split "
                         f"(val_fraction = {val_fraction}); add files or change val_fraction")
    return tuple(np.frombuffer(b"".join(parts[v]), dtype=np.uint8) for v in (False, True))


def _token_file(path: str, token_dtype: str, val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    tokens = np.load(path, mmap_mode="r") if path.endswith(".npy") else np.memmap(path, dtype=token_dtype, mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"data: {path!r}: expected a 1-D integer token array, got {tokens.dtype} {tokens.shape}")
    cut = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:cut], tokens[cut:]


def load_splits(data: Optional[str], val_fraction: float, token_dtype: str = "uint16"):
    """(train, validation, byte_level): two 1-D integer arrays and whether a token is a byte (bits per byte)."""
    if data is None:
        root = sysconfig.get_paths()["stdlib"]
        return (*_byte_splits(root, _text_files(root, ".py"), val_fraction), True)
    if not os.path.exists(data):
        raise FileNotFoundError(f"data: expected a text file, a folder of text files or a .npy/.bin token file, "
                                f"got {data!r}, which does not exist")
    if data.endswith((".npy", ".bin")):
        return (*_token_file(data, token_dtype, val_fraction), False)
    if os.path.isdir(data):
        return (*_byte_splits(data, _text_files(data, None), val_fraction), True)
    # one text file: no files to split by, so its tail is the validation split, as for a token file
    tokens = np.fromfile(data, dtype=np.uint8)
    cut = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:cut], tokens[cut:], True


def _rows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + length], dtype=np.int64) for s in starts]))


def train_batch(tokens: np.ndarray, seed: int, step: int, micro: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """[batch_size, seq_len] token ids at random offsets, the same for the same (seed, step, micro)."""
    if len(tokens) <= seq_len:
        raise ValueError(f"seq_len: expected fewer than the {len(tokens)} train tokens, got {seq_len}")
    starts = np.random.default_rng([seed, step, micro]).integers(0, len(tokens) - seq_len, batch_size)
    return _rows(tokens, starts, seq_len)


def eval_batches(tokens: np.ndarray, num_sequences: int, seq_len: int, batch_size: int) -> List[torch.Tensor]:
    """`num_sequences` windows spread evenly over the validation split, in batches: the same set at every eval."""
    if len(tokens) < seq_len:
        raise ValueError(f"seq_len: expected at most the {len(tokens)} validation tokens, got {seq_len}")
    starts = np.linspace(0, len(tokens) - seq_len, num_sequences).astype(np.int64)
    return [_rows(tokens, starts[i:i + batch_size], seq_len) for i in range(0, num_sequences, batch_size)]
