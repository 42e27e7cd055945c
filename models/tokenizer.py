"""Text through a `transformers` tokenizer, for `ipl-train --tokenizer=DIR`: the tokenizer comes from a local folder
(the files `save_pretrained` writes; nothing is downloaded), the text from the same sources and the same split by
file as the byte-level data (data.py), each document followed by the tokenizer's eos token.

The token arrays are cached as `.npy` files in a folder the caller names (the run folder), under a hash of the
tokenizer's files, the text's contents and `val_fraction`: a rerun, a resume or `ipl-eval` reads them back instead
of tokenizing again, and a change to any of them makes a new entry instead of reading a stale one.
"""

import hashlib
import json
import os
from typing import List, Optional, Tuple

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ipl_layers.models.data import split_by_file, tail_split, text_sources

# model weights may share the tokenizer's folder (a model's snapshot); they are large and do not tokenize
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the local folder `path`; it must have an eos token to join documents with."""
    if not os.path.isdir(path):
        what = "which does not exist" if not os.path.exists(path) else "which is not a folder"
        raise FileNotFoundError(f"tokenizer: expected a local folder holding a transformers tokenizer (the files "
                                f"save_pretrained writes), got {path!r}, {what}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer: expected a folder AutoTokenizer.from_pretrained(local_files_only=True) "
                         f"loads, got {path!r}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer: {path!r}: expected an eos_token to mark document boundaries, got none; set "
                         "one and save_pretrained again")
    return tokenizer


def tokenizer_digest(path: str) -> str:
    """sha256 of the files in the tokenizer folder (names and contents, weights left out): a checkpoint records
    it, so an eval can tell that the folder no longer holds the tokenizer the run was trained with."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file) and not name.endswith(_WEIGHT_SUFFIXES):
            with open(file, "rb") as f:
                digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def check_tokenizer_unchanged(path: str, recorded: Optional[str], checkpoint: str):
    """Raises when the tokenizer folder's digest differs from the one `checkpoint` recorded."""
    if recorded is not None and tokenizer_digest(path) != recorded:
        raise ValueError(f"tokenizer: {path!r} differs from the tokenizer {checkpoint!r} was trained with (its "
                         "files' sha256 changed); point --tokenizer at the run's tokenizer")


def encode_documents(tokenizer: PreTrainedTokenizerBase, documents: List[bytes], names: List[str]) -> List[np.ndarray]:
    """One token array per UTF-8 document, no special tokens added; uint16 when the vocabulary fits."""
    texts = []
    for name, raw in zip(names, documents):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"data: {name!r}: expected UTF-8 text for the tokenizer, got a byte that is not "
                             f"UTF-8 at offset {e.start}") from e
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    # verbose=False: whole files are longer than model_max_length, which matters to a model's input, not here
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return [np.asarray(i, dtype=dtype) for i in ids]


def _save_atomically(path: str, array: np.ndarray):
    """A crash leaves the complete file or none: the cache is read without checks. The temporary name is the
    process's own, as every rank of a distributed run tokenizes and writes the same entry."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def tokenized_splits(data: Optional[str], val_fraction: float, tokenizer_path: str,
                     cache_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(train, validation) token arrays of the text `data` names (see data.py), through the tokenizer in
    `tokenizer_path`; read from or written to the cache in `cache_dir` when given."""
    tokenizer = load_tokenizer(tokenizer_path)
    root, files = text_sources(data)
    documents = []
    for relative in files:
        with open(os.path.join(root, relative), "rb") as f:
            documents.append(f.read())
    one_file = data is not None and os.path.isfile(data)
    key = hashlib.sha256(json.dumps([tokenizer_digest(tokenizer_path), val_fraction, one_file]).encode())
    for relative, raw in zip(files, documents):
        key.update(relative.encode() + b"\0" + hashlib.sha256(raw).digest())
    paths = [os.path.join(cache_dir, f"tokens-{key.hexdigest()[:16]}-{split}.npy")
             for split in ("train", "validation")] if cache_dir is not None else []
    if paths and all(os.path.isfile(p) for p in paths):
        return tuple(np.load(p, mmap_mode="r") for p in paths)
    encoded = encode_documents(tokenizer, documents, files)
    if one_file:  # no files to split by: its tail is the validation split, as for the bytes of one file
        splits = tail_split(encoded[0], val_fraction)
    else:
        splits = split_by_file(files, encoded, val_fraction, tokenizer.eos_token_id, root)
    for path, tokens in zip(paths, splits):
        os.makedirs(cache_dir, exist_ok=True)
        _save_atomically(path, tokens)
    return splits
