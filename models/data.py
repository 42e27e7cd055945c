"""Training data as one flat token array per split, and batches that are a pure function of (seed, step).

Sources:
- the default: a byte-level corpus of the running interpreter's standard-library `.py` files (no download),
  split into train/validation by file, on a hash of the file's path relative to the stdlib root, so the split is
  the same on every run and machine with that Python;
- text files (a file or a folder of files): bytes, split by file the same way;
- a pre-tokenized `.npy` (any integer dtype) or `.bin` (raw `token_dtype`, uint16 by default as nanoGPT writes
  them) token file, memory-mapped: the last `val_fraction` of its tokens is the validation split.

Documents are joined with a 0 byte (NUL never occurs in source text), so byte models see document boundaries.
With a tokenizer (tokenizer.py) the same text sources and the same split by file give token arrays instead.
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


def text_sources(data: Optional[str]) -> Tuple[str, List[str]]:
    """(root, relative paths) of the text `data` names: None -> the stdlib's `.py` files, a folder -> its files,
    a file -> itself; the paths sorted, so the order is fixed."""
    if data is None:
        root = sysconfig.get_paths()["stdlib"]
        return root, _text_files(root, ".py")
    if not os.path.exists(data):
        raise FileNotFoundError(f"data: expected a text file, a folder of text files or a .npy/.bin token file, "
                                f"got {data!r}, which does not exist")
    if os.path.isdir(data):
        return data, _text_files(data, None)
    return os.path.dirname(data), [os.path.basename(data)]


def split_by_file(files: List[str], documents: List[np.ndarray], val_fraction: float, separator: int,
                  root: str) -> Tuple[np.ndarray, np.ndarray]:
    """(train, validation): each file's tokens followed by `separator`, in the split its path's hash names."""
    parts = {False: [], True: []}
    for relative, tokens in zip(files, documents):
        parts[is_validation(relative, val_fraction)] += [tokens, np.array([separator], dtype=tokens.dtype)]
    if not parts[False] or not parts[True]:
        raise ValueError(f"data: {len(files)} files under {root!r} give an empty train or validation split "
                         f"(val_fraction = {val_fraction}); add files or change val_fraction")
    return np.concatenate(parts[False]), np.concatenate(parts[True])


def tail_split(tokens: np.ndarray, val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """(train, validation) of one token sequence: its last `val_fraction` is the validation split."""
    cut = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:cut], tokens[cut:]


def _token_file(path: str, token_dtype: str, val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    tokens = np.load(path, mmap_mode="r") if path.endswith(".npy") else np.memmap(path, dtype=token_dtype, mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"data: {path!r}: expected a 1-D integer token array, got {tokens.dtype} {tokens.shape}")
    return tail_split(tokens, val_fraction)


def load_splits(data: Optional[str], val_fraction: float, token_dtype: str = "uint16"):
    """(train, validation, byte_level): two 1-D integer arrays and whether a token is a byte (bits per byte)."""
    if data is not None and data.endswith((".npy", ".bin")) and os.path.exists(data):
        return (*_token_file(data, token_dtype, val_fraction), False)
    root, files = text_sources(data)
    documents = [np.fromfile(os.path.join(root, relative), dtype=np.uint8) for relative in files]
    if data is not None and os.path.isfile(data):  # one file: no files to split by, so its tail is validation
        return (*tail_split(documents[0], val_fraction), True)
    return (*split_by_file(files, documents, val_fraction, SEPARATOR, root), True)


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
