"""The data pipeline: a deterministic split by file, batches that depend only on (seed, step, micro), token files
memory-mapped, the embedded stdlib corpus."""

import numpy as np
import pytest
import torch

from ipl_layers.models.data import SEPARATOR, eval_batches, is_validation, load_splits, train_batch


def corpus(tmp_path, files=20):
    for i in range(files):
        (tmp_path / f"m{i}.txt").write_bytes(f"<file {i}>".encode() * 30)
    return str(tmp_path)


def test_split_is_by_file_and_deterministic(tmp_path):
    root = corpus(tmp_path)
    train, val, byte_level = load_splits(root, 0.3)
    again = load_splits(root, 0.3)
    assert byte_level and np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    for i in range(20):  # every file lands whole in the split its path's hash names, and only there
        text, in_val = f"<file {i}>".encode() * 30, is_validation(f"m{i}.txt", 0.3)
        assert (text in val.tobytes()) == in_val and (text in train.tobytes()) != in_val
    assert train[-1] == SEPARATOR and val[-1] == SEPARATOR


def test_validation_hash_is_stable_and_near_the_fraction():
    picks = [is_validation(f"pkg/mod{i}.py", 0.1) for i in range(2000)]
    assert 0.07 < sum(picks) / 2000 < 0.13
    assert is_validation("os.py", 0.05) == is_validation("os.py", 0.05)  # no salted hash() inside
    assert is_validation("pkg/mod.py", 0.5) == is_validation("pkg\\mod.py".replace("\\", "/"), 0.5)


def test_batches_depend_only_on_seed_step_micro():
    tokens = np.arange(5000, dtype=np.uint16)
    a = train_batch(tokens, seed=1, step=7, micro=0, batch_size=4, seq_len=33)
    assert a.shape == (4, 33) and a.dtype == torch.int64
    assert torch.equal(a, train_batch(tokens, 1, 7, 0, 4, 33))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 32, dtype=torch.int64))  # contiguous windows
    for other in ((2, 7, 0), (1, 8, 0), (1, 7, 1)):
        assert not torch.equal(a, train_batch(tokens, *other, 4, 33))
    first, second = eval_batches(tokens, 6, 100, 4), eval_batches(tokens, 6, 100, 4)
    assert [b.shape[0] for b in first] == [4, 2] and all(torch.equal(x, y) for x, y in zip(first, second))
    assert first[0][0, 0] == 0 and first[-1][-1, -1] == 4999  # spread over the whole split


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_are_memory_mapped_with_a_tail_validation_split(tmp_path, suffix):
    tokens = np.arange(1000, dtype=np.uint16) % 700
    path = tmp_path / f"tokens{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    train, val, byte_level = load_splits(str(path), 0.1)
    assert not byte_level and isinstance(train, np.memmap)
    assert np.array_equal(train, tokens[:900]) and np.array_equal(val, tokens[900:])


def test_mistakes_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(str(tmp_path / "missing.txt"), 0.1)
    with pytest.raises(ValueError, match="empty train or validation split"):
        load_splits(corpus(tmp_path, files=1), 0.05)
    with pytest.raises(ValueError, match="seq_len: expected fewer than the 10 train tokens"):
        train_batch(np.zeros(10, np.uint8), 0, 0, 0, 1, 10)


def test_embedded_stdlib_corpus():
    train, val, byte_level = load_splits(None, 0.05)
    assert byte_level and train.dtype == np.uint8
    assert len(train) > 1_000_000 and 0.01 < len(val) / (len(train) + len(val)) < 0.15
    assert b"def " in val[:100_000].tobytes()
