"""`ipl-train --tokenizer=DIR`: text tokenized by a local transformers tokenizer with the byte path's split by file,
the vocabulary taken from it, the tokens cached in the run folder, the tokenizer recorded for `ipl-eval`."""

import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from ipl_layers.models.checkpoint import read_trainer_state
from ipl_layers.models.data import is_validation
from ipl_layers.models.evaluate import per_position_loss
from ipl_layers.models.tokenizer import load_tokenizer, tokenized_splits
from ipl_layers.models.train import build_model, train
from ipl_layers.models.train_config import parse_config


def data_dir(args):
    return next(a.partition("=")[2] for a in args if a.startswith("--data="))


def test_a_tokenizer_run_trains_records_its_tokenizer_and_evaluates(tiny_train_args, tiny_tokenizer, tmp_path):
    out = tmp_path / "run"
    result = train(parse_config(tiny_train_args + [f"--tokenizer={tiny_tokenizer}", f"--out_dir={out}"]))
    assert not result["byte_level"] and np.isfinite(result["val_loss"])
    state = read_trainer_state(str(out / "step-00000006"))
    assert state["config"]["tokenizer"] == tiny_tokenizer and len(state["tokenizer_sha256"]) == 64
    config = parse_config(tiny_train_args + [f"--tokenizer={tiny_tokenizer}"])
    assert build_model(config).config.vocab_size == 300  # the tokenizer's, not the byte vocabulary
    assert len([f for f in os.listdir(out) if f.startswith("tokens-")]) == 2  # train and validation, cached

    curve = per_position_loss(str(out / "step-00000006"), seq_len=40, sequences=2)
    assert curve.shape == (40,) and np.isfinite(curve).all()
    assert len([f for f in os.listdir(out) if f.startswith("tokens-")]) == 2  # the eval read the run's cache

    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")  # the folder no longer holds the run's tokenizer
    with pytest.raises(ValueError, match="tokenizer: .* differs from the tokenizer .*step-00000006.* trained with"):
        per_position_loss(str(out / "step-00000006"), seq_len=40, sequences=2)
    with pytest.raises(ValueError, match="tokenizer: .* differs from the tokenizer"):
        train(parse_config(tiny_train_args + [f"--tokenizer={tiny_tokenizer}", f"--out_dir={out}"]), resume=True)


def test_split_by_file_joined_by_eos_and_cached(tiny_train_args, tiny_tokenizer, tmp_path):
    corpus = data_dir(tiny_train_args)
    train_tokens, val_tokens = tokenized_splits(corpus, 0.25, tiny_tokenizer, str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer, local_files_only=True)
    eos = tokenizer.eos_token_id
    files = sorted(os.listdir(corpus))
    for split, tokens in ((False, train_tokens), (True, val_tokens)):
        expected = [t for f in files if is_validation(f, 0.25) == split
                    for t in tokenizer.encode(open(os.path.join(corpus, f)).read(), add_special_tokens=False) + [eos]]
        assert tokens.tolist() == expected
    again = tokenized_splits(corpus, 0.25, tiny_tokenizer, str(tmp_path / "cache"))
    assert all(isinstance(a, np.memmap) and np.array_equal(a, b) for a, b in zip(again, (train_tokens, val_tokens)))
    with open(os.path.join(corpus, files[0]), "a") as f:
        f.write("x = 1\n")  # new contents: a new cache entry, not the stale one
    changed = tokenized_splits(corpus, 0.25, tiny_tokenizer, str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 4
    assert len(changed[0]) + len(changed[1]) > len(train_tokens) + len(val_tokens)


def test_one_text_file_splits_at_its_tail(tiny_tokenizer, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(40)))
    train_tokens, val_tokens = tokenized_splits(str(path), 0.25, tiny_tokenizer)
    whole = load_tokenizer(tiny_tokenizer).encode(path.read_text(), add_special_tokens=False)
    assert train_tokens.tolist() + val_tokens.tolist() == whole
    assert len(val_tokens) == int(len(whole) * 0.25)


def test_mistakes_are_named(tiny_train_args, tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer: expected a local folder .* got '.*nowhere', which does "
                                                "not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer: expected a folder AutoTokenizer.from_pretrained"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="tokenizer: expected text data to tokenize, got data = 'tokens.bin'"):
        parse_config(["--data=tokens.bin", f"--tokenizer={tiny_tokenizer}"])
    with pytest.raises(ValueError, match=r"model.vocab_size: the tokenizer '.*' \(300 tokens\) needs >= 300, got 256"):
        build_model(parse_config([f"--tokenizer={tiny_tokenizer}", "--model.vocab_size=256"]))
    padded = build_model(parse_config(tiny_train_args + [f"--tokenizer={tiny_tokenizer}", "--model.vocab_size=320"]))
    assert padded.config.vocab_size == 320  # a larger vocabulary (padded to a multiple of 64) is allowed
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "a.txt").write_bytes(b"ok\xff")
    with pytest.raises(ValueError, match="data: 'a.txt': expected UTF-8 text for the tokenizer, .* at offset 2"):
        tokenized_splits(str(tmp_path / "binary"), 0.5, tiny_tokenizer)
