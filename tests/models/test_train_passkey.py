"""Passkey retrieval: prompts of the requested length with the key where asked, greedy decoding through the cache
scored on the digits, and `ipl-eval passkey` on byte-level and tokenizer checkpoints writing its CSV."""

import csv
import functools
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipl_layers.models.evaluate import main as evaluate_main
from ipl_layers.models.passkey import (NEEDLE, QUESTION, _repeated, answer, byte_decode, byte_encode,
                                       passkey_accuracy, passkey_prompt)
from ipl_layers.models.tokenizer import load_tokenizer
from ipl_layers.models.train import train
from ipl_layers.models.train_config import parse_config


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_has_the_length_and_the_key_at_its_depth(depth):
    filler = _repeated(byte_encode)(np.random.default_rng(0), 300)
    prompt = passkey_prompt(filler, "12345", depth, 300, byte_encode)
    needle, question = NEEDLE.format(key="12345").encode(), QUESTION.encode()
    room = 300 - len(needle) - len(question)
    assert len(prompt) == 300 and bytes(prompt).endswith(question)
    at = bytes(prompt).index(needle)
    assert at == round(depth * room)
    assert prompt[:at] == filler[:at] and prompt[at + len(needle):-len(question)] == filler[at:room]


def test_prompt_through_a_tokenizer_counts_its_tokens(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    filler = _repeated(encode)(np.random.default_rng(0), 200)
    prompt = passkey_prompt(filler, "98765", 0.5, 200, encode)
    assert len(prompt) == 200 and "The pass key is 98765. Remember it." in tokenizer.decode(prompt)


def test_prompt_mistakes_are_named():
    filler = _repeated(byte_encode)(np.random.default_rng(0), 100)
    with pytest.raises(ValueError, match="lengths: expected at least 98 tokens .* got 50"):
        passkey_prompt(filler, "12345", 0.5, 50, byte_encode)
    with pytest.raises(ValueError, match=r"depths: expected values in \[0, 1\], got 1.5"):
        passkey_prompt(filler, "12345", 1.5, 100, byte_encode)


class _KeyReader(torch.nn.Module):
    """A byte 'model' that answers as a perfect one would: at the prefill it reads each prompt's key and queues
    " <key>." (or, with `off_by_one`, the key + 1); each call, prefill or decode step, emits the next queued byte.
    The queue is its cache, so a decode loop that drops the cache breaks it."""

    def __init__(self, off_by_one: bool = False):
        super().__init__()
        self.off_by_one = off_by_one

    def forward(self, ids, cache=None, use_cache=True, logits_to_keep=0):
        if cache is None:
            keys = [int(re.search(rb"pass key is (\d+)", bytes(row.tolist())).group(1)) for row in ids]
            cache = [list(f" {key + self.off_by_one}.".encode()) for key in keys]
        logits = F.one_hot(torch.tensor([queue.pop(0) for queue in cache]), 256).float()[:, None]  # [B, 1, 256]
        return SimpleNamespace(logits=logits, cache=cache)


def test_greedy_decoding_and_scoring_read_the_answer():
    assert answer(" 12345. The") == "12345" and answer("12345") == "12345" and answer(" x12345") is None
    assert byte_decode([49, 300, 50]) == "1\ufffd2"  # an id past the bytes cannot join two digits
    kwargs = dict(encode=byte_encode, decode=byte_decode, filler=_repeated(byte_encode), lengths=[120, 200],
                  depths=[0.0, 0.5, 1.0], trials=3, batch_size=2)
    rows = passkey_accuracy(_KeyReader(), **kwargs)
    assert [(r["length"], r["depth"]) for r in rows] == [(120, 0.0), (120, 0.5), (120, 1.0), (200, 0.0),
                                                         (200, 0.5), (200, 1.0)]
    assert all(r["correct"] == 3 and r["accuracy"] == 1.0 for r in rows)
    assert all(r["correct"] == 0 for r in passkey_accuracy(_KeyReader(off_by_one=True), **kwargs))


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_command_on_a_tiny_checkpoint_writes_the_csv(tiny_train_args, tiny_tokenizer, tmp_path, capsys,
                                                     with_tokenizer):
    extra = [f"--tokenizer={tiny_tokenizer}"] if with_tokenizer else []
    train(parse_config(tiny_train_args + extra + ["--steps=2", f"--out_dir={tmp_path / 'run'}"]))
    evaluate_main(["passkey", str(tmp_path / "run"), "--lengths=100,160", "--depths=0,0.5,1", "--trials=2",
                   "--filler=validation"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "eval" / "passkey.csv")))
    assert [(int(r["length"]), float(r["depth"]), int(r["trials"])) for r in rows] == [
        (n, d, 2) for n in (100, 160) for d in (0.0, 0.5, 1.0)]
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["accuracy"]) == int(r["correct"]) / 2 for r in rows)
    assert "length    160:" in capsys.readouterr().out


def test_a_token_file_run_is_refused(tiny_train_args, tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(4000, dtype=np.uint16) % 256)
    train(parse_config(tiny_train_args + [f"--data={tmp_path / 'tokens.npy'}", "--model.vocab_size=256", "--steps=2",
                                          f"--out_dir={tmp_path / 'run'}"]))
    with pytest.raises(ValueError, match="checkpoint: expected a byte-level or --tokenizer run, got .* token file"):
        evaluate_main(["passkey", str(tmp_path / "run")])
